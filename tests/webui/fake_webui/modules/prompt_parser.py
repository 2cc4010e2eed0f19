"""Fake ``modules.prompt_parser.SdConditioning``: a list of prompts carrying the image size."""

from __future__ import annotations


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        self.is_negative_prompt = is_negative_prompt
        self.width = width or 1024
        self.height = height or 1024
