"""One gradio widget per settings field, generated from ``FIELDS`` (R1, R22)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from trainer.settings import Field
from trainer.ui import compat
from trainer.ui.form import choices_of, widget_value


def elem_id(f: Field, pass_index: int = 1) -> str:
    """``tt_<attr>`` for pass 1 and the job keys, ``tt2_<attr>`` for the pass-2 duplicate."""
    return f"{'tt2' if pass_index == 2 else 'tt'}_{f.attr}"


def field_widget(f: Field, *, pass_index: int = 1, value: Any = None, choices: list[str] | None = None,
                 visible: bool = True) -> gr.components.Component:
    """The widget for ``f`` with the table's label and help (``info=``, ending in the JSON key).

    Args:
        f: the field.
        pass_index: 2 for the Difference accordion's copy (other element id).
        value: initial widget value; the field default when None.
        choices: overrides the table's choices (host model lists, narrowed block lists).
        visible: initial visibility.
    """
    value = widget_value(f, f.default) if value is None else value
    common: dict[str, Any] = {"label": f.label, "elem_id": elem_id(f, pass_index), "visible": visible}
    # The label is in words; the exact JSON key (presets, --set, the README table) closes the help.
    key_note = "" if f.section == "job" else f"[{f.key}]"
    rng = f"Range: {f.range_text}." if f.range_text else ""
    info = " ".join(part for part in (f.help, rng, key_note) if part)
    if info:
        common["info"] = info
    if f.widget == "checkbox":
        return gr.Checkbox(value=bool(value), **common)
    if f.widget == "checkboxgroup":
        return gr.CheckboxGroup(choices=choices if choices is not None else choices_of(f), value=value,
                                elem_classes=["tt-blocks"], **common)
    if f.widget == "dropdown":
        # Numbers and models may be typed freely; validate() names a bad value with the choices.
        options = choices if choices is not None else choices_of(f)
        return gr.Dropdown(choices=options, value=value, allow_custom_value=True, **common)
    if f.widget == "textarea":
        return gr.Textbox(value=value, lines=2, max_lines=8, **common)
    if f.widget == "image":
        return compat.image(f.label, elem_id(f, pass_index), visible=visible)
    return gr.Textbox(value=value, lines=1, max_lines=1, **common)
