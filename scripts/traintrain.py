"""TrainTrain's Web-UI entry: registers the TrainTrain tab, and nothing else.

A1111/Forge import this file by path. Our package is called ``trainer``, a name other extensions may
use too, so it is loaded with care (:func:`load_trainer`): when ``sys.modules["trainer"]`` already
belongs to someone else, ours is imported whole while theirs is set aside, then theirs is put back; our
submodules stay registered under their ``trainer.*`` names (their imports are resolved from
``sys.modules`` first), so our lazy imports keep finding our code.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
import traceback
from pathlib import Path
from types import ModuleType

EXT_DIR = Path(__file__).resolve().parent.parent
PACKAGE = "trainer"
ALIAS = "traintrain_trainer"  # our package object, whatever currently holds the name "trainer"
SKIP = ("__main__", ".bench")
log = logging.getLogger("traintrain")


def _is_ours(module: ModuleType | None) -> bool:
    file = getattr(module, "__file__", None)
    return bool(file) and Path(file).resolve() == (EXT_DIR / PACKAGE / "__init__.py").resolve()


def _ours_loaded() -> list[str]:
    return [k for k, v in sys.modules.items() if (k == PACKAGE or k.startswith(PACKAGE + ".")) and _file_inside(v)]


def _file_inside(module: ModuleType) -> bool:
    file = getattr(module, "__file__", None)
    try:
        return bool(file) and (EXT_DIR / PACKAGE).resolve() in Path(file).resolve().parents
    except OSError:
        return False


def load_trainer() -> ModuleType:
    """Import our ``trainer`` package and return it (also kept as ``sys.modules[ALIAS]``).

    Returns:
        our package module.
    """
    if ALIAS in sys.modules:
        return sys.modules[ALIAS]
    current = sys.modules.get(PACKAGE)
    if current is None:
        sys.path.insert(0, str(EXT_DIR))  # only while importing: our folder holds other top-level names
        try:
            current = importlib.import_module(PACKAGE)
        finally:
            sys.path.remove(str(EXT_DIR))
    if _is_ours(current):
        sys.modules[ALIAS] = current
        return current
    return _load_beside(current)


def _load_beside(foreign: ModuleType) -> ModuleType:
    """Import ours while ``foreign`` is set aside, then put it back under ``trainer``."""
    theirs = {k: v for k, v in sys.modules.items() if k == PACKAGE or k.startswith(PACKAGE + ".")}
    for key in theirs:
        del sys.modules[key]
    sys.path.insert(0, str(EXT_DIR))
    try:
        ours = importlib.import_module(PACKAGE)
        for info in pkgutil.walk_packages(ours.__path__, PACKAGE + "."):
            if info.name.endswith(SKIP):
                continue
            try:
                importlib.import_module(info.name)
            except Exception as err:  # an optional dependency missing disables that module only
                log.debug("TrainTrain: %s not loaded: %s", info.name, err)
    finally:
        sys.path.remove(str(EXT_DIR))
        clashes = sorted(k for k in theirs if k != PACKAGE and k in sys.modules)
        sys.modules.update(theirs)  # theirs keep their names (ours hold direct references); ours keep the rest
    sys.modules[ALIAS] = ours
    print(f"TrainTrain: another extension also has a 'trainer' package ({getattr(foreign, '__file__', '?')}); "
          f"loaded ours beside it{'; shared names ' + ', '.join(clashes) if clashes else ''}")
    return ours


def _submodule(name: str) -> ModuleType:
    """One of our submodules, whoever owns ``trainer`` now."""
    key = f"{PACKAGE}.{name}"
    module = sys.modules.get(key)
    if module is not None and _file_inside(module):
        return module
    if _is_ours(sys.modules.get(PACKAGE)):
        return importlib.import_module(key)
    raise ImportError(f"TrainTrain's {key} is not loaded (another extension's 'trainer' package shadows it)")


def _error_panel(err: BaseException):
    import gradio as gr

    with gr.Blocks() as blocks:
        gr.Markdown(
            "### TrainTrain could not start\n"
            f"`{type(err).__name__}: {err}`\n\n"
            "See the console for the full traceback. Other tabs are unaffected."
        )
    return blocks


# Fields whose value names something on this machine right now (the loaded model, a VAE, a preset file):
# the Web-UI's ui-config.json must neither store nor restore them. A stored Model value (A1111 stores every
# field's value at first launch) would swap that model in for every later job instead of training the one
# loaded; "" is what means "the loaded model".
NOT_IN_UI_CONFIG = ("tt_model", "tt_vae", "tt_preset", "tt_snapshot", "tt_queue_job", "tt_plot_log")


def keep_out_of_ui_config(blocks: object) -> int:
    """Mark the :data:`NOT_IN_UI_CONFIG` fields ``do_not_save_to_config`` (A1111/Forge's opt-out)."""
    marked = 0
    for component in getattr(blocks, "blocks", {}).values():
        if getattr(component, "elem_id", None) in NOT_IN_UI_CONFIG:
            component.do_not_save_to_config = True
            marked += 1
    return marked


def build() -> list[tuple[object, str, str]]:
    """The ``on_ui_tabs`` callback: our tab, or an error panel in its place."""
    try:
        load_trainer()
        host = _submodule("hosts.webui").WebUIHost()
        worker = _submodule("jobs").Worker(host, EXT_DIR / "queue", logs_root=EXT_DIR / "logs", json_root=EXT_DIR / "json")
        blocks = _submodule("ui.tab").build_tab(
            worker, host, presets_dir=EXT_DIR / "presets", json_root=EXT_DIR / "json", logs_root=EXT_DIR / "logs"
        )
        keep_out_of_ui_config(blocks)
    except Exception as err:  # the tab must show why it failed instead of taking the Web-UI down
        traceback.print_exc()
        blocks = _error_panel(err)
    return [(blocks, "TrainTrain", "traintrain")]


def register() -> None:
    """Load our package now (before other extensions may claim ``trainer``) and register the tab."""
    from modules import script_callbacks

    try:
        load_trainer()
    except Exception:  # build() retries and shows the error in the tab
        traceback.print_exc()
    script_callbacks.on_ui_tabs(build)


register()
