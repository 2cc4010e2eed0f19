"""Fake ``modules.ui_loadsave`` (A1111 1.10, Forge): ui-config.json holds a value for every labelled field.

At every start the Web-UI walks each tab's blocks: a field whose key (``<tab>/<label>/value``) is in the
file gets the stored value (a dropdown only if the value is one of its choices); a field without one
has its current value stored, and the file is written at the end of the first launch. A component with
``do_not_save_to_config`` is skipped both ways. Measured in A1111 1.10.1: the Model dropdown's value was
stored at first launch and trained by every later job (``shared/reference/realhosts.md``).
"""

from __future__ import annotations

import json
import os

import gradio as gr

_TRACKED = (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown)


def _choices(component) -> list:
    return [c[0] if isinstance(c, tuple) else c for c in getattr(component, "choices", None) or []]


class UiLoadsave:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.ui_settings: dict = {}
        if os.path.exists(filename):
            with open(filename, encoding="utf8") as handle:
                self.ui_settings = json.load(handle)

    def add_component(self, path: str, component) -> None:
        if type(component) not in _TRACKED or getattr(component, "do_not_save_to_config", False):
            return
        key = f"{path}/value"
        saved = self.ui_settings.get(key)
        if saved is None:
            self.ui_settings[key] = component.value
        elif not isinstance(component, (gr.Dropdown, gr.Radio)) or saved in _choices(component):
            component.value = saved

    def add_block(self, block, path: str = "") -> None:
        children = getattr(block, "children", None)
        if children is not None:
            for child in children:
                self.add_block(child, path)
        elif getattr(block, "label", None) is not None:
            self.add_component(f"{path}/{block.label}", block)

    def dump_defaults(self) -> None:
        with open(self.filename, "w", encoding="utf8") as handle:
            json.dump(self.ui_settings, handle, indent=4)
