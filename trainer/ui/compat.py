"""The one place that knows how gradio 3.41 (A1111), 4.40 (Forge) and 5/6 (standalone) differ.

Everything else in ``trainer/ui`` uses only the parameters common to all four versions and calls
these helpers for the rest (platform reference §6). Always update components with :data:`update`
(``gr.update``): returning a component instance does not update anything on gradio 3.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

GR_MAJOR = int(gr.__version__.split(".")[0])

update = gr.update

#: Event kwargs that hide the loading overlay (polls must not flash every second).
QUIET: dict[str, Any] = {"show_progress": "hidden"}


def js_kwargs(js: str | None) -> dict[str, Any]:
    """Event kwargs that run ``js`` in the browser before the Python handler (``_js`` on 3.x)."""
    if not js:
        return {}
    return {"_js": js} if GR_MAJOR < 4 else {"js": js}


def blocks(css: str | None = None, title: str = "TrainTrain") -> gr.Blocks:
    """A ``gr.Blocks``; on gradio 6 the css goes to :func:`launch_kwargs` instead."""
    if GR_MAJOR >= 6 or css is None:
        return gr.Blocks(title=title, analytics_enabled=False)
    return gr.Blocks(css=css, title=title, analytics_enabled=False)


def launch_kwargs(css: str | None = None, head: str | None = None) -> dict[str, Any]:
    """Extra ``launch()`` kwargs: gradio 6 takes css/head there, older versions in ``Blocks``."""
    kwargs: dict[str, Any] = {}
    if GR_MAJOR >= 6:
        if css:
            kwargs["css"] = css
        if head:
            kwargs["head"] = head
    return kwargs


def blocks_head_kwargs(head: str | None) -> dict[str, Any]:
    """``Blocks(head=)`` exists on 4.x/5.x only (3.41 has no way to add a script)."""
    return {"head": head} if head and 4 <= GR_MAJOR < 6 else {}


def queue(demo: gr.Blocks) -> gr.Blocks:
    """Enable the queue (3.x needs it for ``every=`` polling and generators)."""
    if GR_MAJOR < 4:
        return demo.queue(concurrency_count=4)
    return demo.queue(default_concurrency_limit=4)


def image(label: str, elem_id: str, visible: bool = True, height: int = 150) -> gr.Image:
    """An upload image input delivering a PIL image (``source=`` on 3.x, ``sources=`` on 4+)."""
    import inspect

    kwargs: dict[str, Any] = {"label": label, "elem_id": elem_id, "type": "pil", "visible": visible}
    if "height" in inspect.signature(gr.Image.__init__).parameters:
        kwargs["height"] = height
    if GR_MAJOR < 4:
        kwargs["source"] = "upload"
    else:
        kwargs["sources"] = ["upload", "clipboard"]
    return gr.Image(**kwargs)


def dataframe(headers: Sequence[str], elem_id: str, label: str = "") -> gr.Dataframe:
    """A read-only table with fixed headers (row/column-count kwargs differ by version; we pass none)."""
    kwargs: dict[str, Any] = {"headers": list(headers), "interactive": False, "elem_id": elem_id, "wrap": True}
    if label:
        kwargs["label"] = label
    return gr.Dataframe(**kwargs)


def poll(
    every_s: float,
    fn: Callable[..., Any],
    inputs: list[Any],
    outputs: list[Any],
    demo: gr.Blocks,
) -> None:
    """Call ``fn`` every ``every_s`` seconds while the page is open.

    ``gr.Timer`` where it exists (4.40+); ``load(every=)`` on 3.x. Must be called inside ``demo``.
    """
    if hasattr(gr, "Timer"):
        timer = gr.Timer(every_s)
        timer.tick(fn, inputs=inputs, outputs=outputs, **QUIET)
    else:
        demo.load(fn, inputs=inputs, outputs=outputs, every=every_s, **QUIET)


def gallery(label: str, elem_id: str, columns: int = 4, height: int = 320, visible: bool = True) -> gr.Gallery:
    """A read-only image gallery; ``columns``/``height``/``object_fit`` only where this gradio has them."""
    import inspect

    wanted = {"columns": columns, "height": height, "object_fit": "contain", "allow_preview": True, "interactive": False}
    accepted = inspect.signature(gr.Gallery.__init__).parameters
    extra = {k: v for k, v in wanted.items() if k in accepted}
    return gr.Gallery(label=label, elem_id=elem_id, visible=visible, **extra)


def file_path(value: Any) -> str | None:
    """The path of a ``gr.File``/``gr.Image(type="filepath")`` value: tempfile objects on 3.x, str on 4+."""
    if value is None or value == "":
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, dict):  # FileData-like payloads
        return value.get("path") or value.get("name")
    return getattr(value, "name", None)


def tool_button(text: str, elem_id: str) -> gr.Button:
    """A small inline emoji button that sits in a row next to a dropdown (tooltips: traintrain.js)."""
    return gr.Button(value=text, elem_id=elem_id, elem_classes=["tt-tool"], size="sm", scale=0, min_width=40)
