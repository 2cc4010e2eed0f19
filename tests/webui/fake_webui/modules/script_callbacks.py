"""Fake ``modules.script_callbacks``: records registered callbacks."""

ui_tabs_callbacks: list = []
other_callbacks: list = []


def on_ui_tabs(callback) -> None:
    ui_tabs_callbacks.append(callback)


def on_model_loaded(callback) -> None:
    other_callbacks.append(("model_loaded", callback))


def on_app_started(callback) -> None:
    other_callbacks.append(("app_started", callback))
