"""scripts/traintrain.py (tab registration, foreign `trainer` packages) and install.py (host pins)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# -- scripts/traintrain.py --------------------------------------------------------------------------


@pytest.fixture
def foreign_trainer(tmp_path, monkeypatch):
    """Another extension's `trainer` package already imported, ours set aside; all put back after."""
    pkg = tmp_path / "other_ext" / "trainer"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("WHO = 'foreign'\n")
    (pkg / "errors.py").write_text("WHO = 'foreign errors'\n")
    (pkg / "only_theirs.py").write_text("WHO = 'foreign only'\n")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("trainer", "traintrain_trainer")}
    for key in saved:
        del sys.modules[key]
    monkeypatch.syspath_prepend(str(tmp_path / "other_ext"))
    import trainer.only_theirs  # noqa: F401

    import trainer
    import trainer.errors  # noqa: F401

    assert trainer.WHO == "foreign"
    yield trainer
    for key in [k for k in sys.modules if k.split(".")[0] in ("trainer", "traintrain_trainer")]:
        del sys.modules[key]
    sys.modules.update(saved)


def test_tab_registered_beside_a_foreign_trainer(fake_webui, foreign_trainer, monkeypatch):
    from modules import script_callbacks

    script_callbacks.ui_tabs_callbacks.clear()
    path_before = list(sys.path)
    script = load_file(ROOT / "scripts" / "traintrain.py", "traintrain_script_under_test")
    assert script_callbacks.ui_tabs_callbacks == [script.build]
    assert sys.modules["trainer"] is foreign_trainer  # theirs keeps its name
    assert sys.modules["trainer.errors"].WHO == "foreign errors"
    ours = sys.modules["traintrain_trainer"]
    assert Path(ours.__file__).resolve() == ROOT / "trainer" / "__init__.py"
    webui_mod = script._submodule("hosts.webui")
    assert Path(webui_mod.__file__).resolve() == ROOT / "trainer" / "hosts" / "webui.py"
    runtime = script._submodule("models.webui_runtime")
    assert Path(runtime.SettingsError.__init__.__code__.co_filename).resolve() == ROOT / "trainer" / "errors.py"
    assert runtime.WebUIBundle.__module__ == "trainer.models.webui_runtime"
    assert sys.path == path_before

    calls = {}
    fake_jobs = types.SimpleNamespace(Worker=lambda host, state_dir, **kw: calls.setdefault("worker", (host, state_dir, kw)))

    def build_tab(worker, host, *, presets_dir, json_root, logs_root):
        calls["tab"] = (worker, host, presets_dir, json_root, logs_root)
        return "BLOCKS"

    real = script._submodule
    monkeypatch.setattr(script, "_submodule", lambda n: {"jobs": fake_jobs, "ui.tab": types.SimpleNamespace(build_tab=build_tab)}.get(n) or real(n))
    tabs = script.build()
    assert tabs == [("BLOCKS", "TrainTrain", "traintrain")]
    assert type(calls["tab"][1]).__name__ == "WebUIHost" and calls["tab"][2] == ROOT / "presets"
    assert calls["worker"][2] == {"logs_root": ROOT / "logs", "json_root": ROOT / "json"}


def test_tab_failure_shows_error_panel(fake_webui, monkeypatch):
    from modules import script_callbacks

    script_callbacks.ui_tabs_callbacks.clear()
    script = load_file(ROOT / "scripts" / "traintrain.py", "traintrain_script_under_test2")
    assert Path(sys.modules["trainer"].__file__).resolve() == ROOT / "trainer" / "__init__.py"

    def broken(name):
        raise ImportError(f"no {name}")

    monkeypatch.setattr(script, "_submodule", broken)
    monkeypatch.setattr(script, "_error_panel", lambda err: f"PANEL: {err}")
    assert script.build() == [("PANEL: no hosts.webui", "TrainTrain", "traintrain")]


@pytest.mark.parametrize("saved_by", ["first launch", "today's version"])
def test_the_model_field_never_comes_from_ui_config(webui, tmp_path, saved_by):
    """A1111 stores every field's value in ui-config.json at first launch and restores it at each start.
    A stored Model value made every later job swap that model in (measured in A1111 1.10.1); "" must keep
    meaning "the loaded model" whatever the file says, also a file an earlier version let it write."""
    from modules import sd_models, ui_loadsave

    from trainer.hosts.webui import WebUIHost

    script = load_file(ROOT / "scripts" / "traintrain.py", "traintrain_script_ui_config")
    (blocks, _, ifid), = script.build()
    model = next(c for c in blocks.blocks.values() if getattr(c, "elem_id", None) == "tt_model")
    vae = next(c for c in blocks.blocks.values() if getattr(c, "elem_id", None) == "tt_vae")
    config = tmp_path / "ui-config.json"
    if saved_by == "today's version":  # what the earlier version's tab let A1111 store
        config.write_text(f'{{"{ifid}/{model.label}/value": "xl.safetensors [def]", '
                          f'"{ifid}/{vae.label}/value": "better.vae.pt"}}', encoding="utf8")
    loadsave = ui_loadsave.UiLoadsave(str(config))
    loadsave.add_block(blocks, ifid)
    loadsave.dump_defaults()
    assert model.value in (None, "") and WebUIHost().default_model() == ""
    stored = config.read_text(encoding="utf8")
    assert f"/{model.label}/value" not in stored or saved_by == "today's version"
    assert '"' + ifid + "/" in stored  # the Web-UI still keeps the other fields' values, as users expect
    sd_models.loads.clear()
    with WebUIHost().acquire(model.value or "", "", precision="fp32", v_pred=None) as bundle:
        assert bundle.family.value == "sd1"  # the loaded model, no swap
    assert sd_models.loads == []


# -- install.py -------------------------------------------------------------------------------------

A1111_110 = {  # what A1111 1.10.1 installs (requirements_versions.txt + launch_utils torch)
    "torch": "2.1.2+cu121", "torchvision": "0.16.2+cu121", "xformers": "0.0.23.post1", "transformers": "4.30.2",
    "gradio": "3.41.2", "accelerate": "0.21.0", "safetensors": "0.4.2", "numpy": "1.26.2", "pillow": "9.5.0",
    "open-clip-torch": "2.20.0", "einops": "0.4.1", "tqdm": "4.66.1",
}
HOST = {"torch", "torchvision", "xformers", "diffusers", "transformers", "gradio", "numpy", "pillow", "safetensors", "accelerate"}


@pytest.fixture
def installer(monkeypatch):
    """install.py with a fake `launch` recording run_pip and importlib.metadata reporting `dists`."""
    dists = dict(A1111_110)

    def version(name):
        key = name.lower().replace("_", "-")
        if key not in dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return dists[key]

    monkeypatch.setattr(importlib.metadata, "version", version)
    launch = types.ModuleType("launch")
    launch.calls = []

    def run_pip(command, desc=None, live=False):
        launch.calls.append(command)
        if getattr(launch, "fail", None) and launch.fail in command:
            raise RuntimeError("pip failed")
        for token in command.split()[1:]:
            token = token.strip('"')
            if not token.startswith("-"):
                name = token.split("<")[0].split(">")[0].split("=")[0]
                dists[name] = {"lycoris-lora": "3.4.0", "bitsandbytes": "0.45.5"}.get(name, "9.9")

    launch.run_pip = run_pip
    monkeypatch.setitem(sys.modules, "launch", launch)
    module = load_file(ROOT / "install.py", "traintrain_install_under_test")
    return module, launch, dists


def pip_names(command: str) -> set[str]:
    names = set()
    for token in command.split()[1:]:
        token = token.strip('"')
        if not token.startswith("-"):
            names.add(token.split("<")[0].split(">")[0].split("=")[0].lower())
    return names


def test_install_in_a1111_never_touches_host_packages(installer, monkeypatch):
    module, launch, dists = installer
    monkeypatch.setattr(sys, "platform", "linux")
    before = {k: dists[k] for k in HOST if k in dists}
    assert module.main() == 0
    assert launch.calls, "missing extras should be installed"
    for command in launch.calls:
        assert not pip_names(command) & HOST, command
        assert "--upgrade" not in command and "-U" not in command.split()
    joined = " ".join(launch.calls)
    assert "lycoris" not in joined  # LoHa/LoKr/DoRA are ours: nothing that needs torch >= 2.4
    assert '"bitsandbytes>=0.43,<0.46" --no-deps' in joined
    assert '"pytorch-optimizer>=3.1" --no-deps' in joined
    assert "einops" not in joined  # A1111 has it
    assert {k: dists[k] for k in HOST if k in dists} == before
    launch.calls.clear()
    module.main()  # second start: everything present, no pip at all
    assert launch.calls == []


def test_install_macos_skips_bitsandbytes(installer, monkeypatch):
    module, launch, dists = installer
    monkeypatch.setattr(sys, "platform", "darwin")
    dists["torch"] = "2.4.1"
    module.main()
    joined = " ".join(launch.calls)
    assert "bitsandbytes" not in joined
    assert '"pytorch-optimizer>=3.1" --no-deps' in joined


def test_install_failure_is_logged_and_others_continue(installer, monkeypatch, capsys):
    module, launch, dists = installer
    monkeypatch.setattr(sys, "platform", "win32")
    launch.fail = "pytorch-optimizer"
    assert module.main() == 0
    assert "could not install pytorch-optimizer" in capsys.readouterr().out
    assert any("bitsandbytes" in c for c in launch.calls)  # win + cu121


def test_install_cpu_torch_gets_no_bitsandbytes(installer, monkeypatch):
    module, launch, dists = installer
    monkeypatch.setattr(sys, "platform", "win32")
    dists["torch"] = "2.1.2"  # PyPI Windows wheel: CPU only
    module.main()
    assert not any("bitsandbytes" in c for c in launch.calls)


def test_standalone_install_never_installs_bare_torch(monkeypatch):
    module = load_file(ROOT / "install.py", "traintrain_install_standalone")
    monkeypatch.setitem(sys.modules, "launch", None)
    calls = []
    monkeypatch.setattr(module.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setattr(module, "installed", lambda d: None)
    assert module.main() == 1 and calls == []  # no torch: tell the user, install nothing
    monkeypatch.setattr(module, "installed", lambda d: "2.3.1")
    assert module.main() == 0
    assert calls[0][-2:] == ["-e", f"{ROOT}[standalone]"]
