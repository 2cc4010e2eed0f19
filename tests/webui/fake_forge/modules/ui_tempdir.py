"""Fake Forge Neo ``modules.ui_tempdir``: Neo swaps Gradio's ``save_pil_to_cache`` for this, which writes
every unsaved PIL image (a tab's gallery) into ``opts.temp_dir`` and creates that folder only when the
option is empty. Neo's default is ``<data>/tmp``, created by nothing at start (measured)."""

from __future__ import annotations

import os
import tempfile

from modules import shared


def save_pil_to_file(image, cache_dir=None, format="png"):  # noqa: A002 - Gradio's signature
    folder = shared.opts.temp_dir
    if folder == "":
        folder = cache_dir
        os.makedirs(folder, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(delete=False, suffix=".png", dir=folder)
    image.save(handle, format=format)
    handle.close()
    return handle.name
