"""Security: no code evaluation, pickles only through the safe loader, names cannot leave their folder,
and the standalone app binds to this machine unless asked otherwise."""

from __future__ import annotations

import ast
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from trainer.errors import InputError, SettingsError, TrainTrainError
from trainer.paths import atomic_write_text, inside, safe_name

TRAINER = Path(__file__).resolve().parents[2] / "trainer"
SOURCES = sorted(p for p in TRAINER.rglob("*.py") if "__pycache__" not in p.parts)


# -- no eval / exec, pickles only with weights_only=True -----------------------------------------------


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            # "" only for bare names: ``eval(text)`` is the builtin, ``model.eval()`` a method
            owner = "" if isinstance(fn, ast.Name) else "<expr>"
            if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name):
                owner = fn.value.id
            yield node, owner, name


def test_sources_were_found():
    assert len(SOURCES) > 30 and any(p.name == "settings.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(TRAINER)))
def test_no_eval_exec_or_unsafe_unpickling(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    where = lambda node: f"{path.relative_to(TRAINER)}:{node.lineno}"  # noqa: E731
    for node, owner, name in _calls(tree):
        if owner == "" and name in ("eval", "exec", "compile", "__import__"):
            pytest.fail(f"{where(node)}: {name}() of text; use ast.literal_eval")
        if owner in ("pickle", "cPickle", "dill", "marshal") and name in ("load", "loads"):
            pytest.fail(f"{where(node)}: {owner}.{name}() runs pickled code; use torch.load(weights_only=True)")
        if owner == "torch" and name == "load":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            assert safe, f"{where(node)}: torch.load without weights_only=True"
        if name in ("run", "Popen", "call", "check_call", "check_output", "system") and owner in ("subprocess", "os"):
            shell = any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                        for k in node.keywords)
            assert not shell and name != "system", f"{where(node)}: shell command"
    text = path.read_text(encoding="utf-8")
    assert "yaml.load(" not in text and "unsafe_load" not in text, f"{path}: unsafe YAML"


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_files(tmp_path) -> tuple[list[Path], Path]:
    marker = tmp_path / "PWNED"
    files = []
    for suffix, protocol in ((".ckpt", 2), (".pt", 4), (".pth", pickle.HIGHEST_PROTOCOL), (".bin", 2)):
        path = tmp_path / f"evil{suffix}"
        path.write_bytes(pickle.dumps({"state_dict": _Evil(marker), "w": _Evil(marker)}, protocol=protocol))
        files.append(path)
    zipped = tmp_path / "evil_zip.ckpt"  # torch's own zip format with a malicious object inside
    torch.save({"w": _Evil(marker)}, zipped)
    files.append(zipped)
    return files, marker


def test_malicious_pickles_are_refused_everywhere_and_never_run(evil_files, tmp_path):
    from trainer.models.bundle import Family
    from trainer.models.checkpoint import load_vae, read_state_dict
    from trainer.models.tiny import build_builtin
    from trainer.network import load_lora

    files, marker = evil_files
    vae_config = dict(build_builtin("tiny-sd1").configs()["vae"])
    for path in files:
        for load in (read_state_dict, load_lora, lambda p: load_vae(str(p), vae_config, Family.SD1)):
            with pytest.raises(TrainTrainError) as info:
                load(path)
            assert "\n" not in str(info.value) and path.name in str(info.value)
    assert not marker.exists(), "a pickle's payload ran"


def test_latent_cache_ignores_a_planted_pickle(tmp_path):
    """A cache file replaced by a malicious pickle is treated as a miss, not executed."""
    from trainer.data import cache

    marker = tmp_path / "PWNED"
    store = next(getattr(cache, n) for n in dir(cache) if n.endswith("Cache") and hasattr(getattr(cache, n), "get"))
    try:
        disk = store(tmp_path)
    except TypeError:
        pytest.skip("disk cache constructor changed")
    (tmp_path / "k.pt").write_bytes(pickle.dumps(_Evil(marker)))
    assert disk.get("k") is None
    assert not marker.exists()


# -- names and paths ----------------------------------------------------------------------------------


BAD_NAMES = ["", "   ", "a/b", "a\\b", "..", ".", "../up", "x/../../y", "/abs", "C:\\win", "c:rel", "a\0b",
             "a<b", "a|b", "a?b", "a*b", 'a"b', "line\nbreak"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_safe_name_refuses(name):
    with pytest.raises(SettingsError) as info:
        safe_name(name, "save_lora_name")
    assert info.value.key == "save_lora_name" and "\n" not in info.value.message
    assert "name" in info.value.message


@pytest.mark.parametrize("name", ["my_lora", " spaced ", "v1.5-style", "日本語", "a..b", "x.y.z"])
def test_safe_name_accepts(name):
    assert safe_name(name, "k") == name.strip()


def test_inside_keeps_paths_in_their_folder(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert inside(root, "a", "b.json") == (root / "a" / "b.json").resolve()
    for parts in (("..", "x"), ("/etc", "passwd"), ("a", "..", "..", "x")):
        with pytest.raises(SettingsError):
            inside(root, *parts)
    (root / "link").symlink_to(tmp_path)  # a symlink leading out is refused too
    with pytest.raises(SettingsError):
        inside(root, "link", "x.json")


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "sub/dir", "..\\win"])
def test_preset_and_snapshot_names_cannot_escape(tmp_path, name):
    from trainer.presets import find_snapshot, load_preset, save_preset, write_snapshot
    from trainer.settings import Settings

    presets, snapshots = tmp_path / "presets", tmp_path / "json"
    with pytest.raises(SettingsError):
        save_preset(Settings.from_layers({}), name, presets)
    with pytest.raises(SettingsError):
        load_preset(name, presets)
    with pytest.raises(SettingsError):
        find_snapshot(name, snapshots)
    with pytest.raises(SettingsError):
        write_snapshot(Settings.from_layers({"save_lora_name": name}), snapshots)
    assert not any(tmp_path.parent.glob("escape*")) and not Path("/tmp/abs.json").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []


def test_lora_output_and_csv_log_names_cannot_escape(tmp_path, dataset, capsys):
    from trainer.__main__ import main

    for name in ("../outside", "/tmp/outside_abs"):
        code = main(["train", "--mode", "LoRA", "--model", "tiny-sd1", "--lora-dir", str(tmp_path / "lora"),
                     "--logs-dir", str(tmp_path / "logs"), "--json-dir", str(tmp_path / "json"), "--quiet",
                     "--set", f"lora_data_directory={dataset}", "--set", f"save_lora_name={name}",
                     "--set", "save_as_json=true"])
        assert code == 2 and "save_lora_name" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*outside*")) and not Path("/tmp/outside_abs.safetensors").exists()


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")

    def boom(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trainer.paths.os.replace", boom)
    with pytest.raises(InputError) as info:
        atomic_write_text(target, "new" * 1000)
    assert isinstance(info.value, OSError)  # callers that catch OSError still do
    assert "No space left on device" in str(info.value) and "free disk space" in str(info.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


# -- the standalone app -------------------------------------------------------------------------------


class _FakeDemo:
    def __init__(self) -> None:
        self.kwargs: dict = {}

    local_url = "http://127.0.0.1:7860/"

    def launch(self, **kwargs) -> None:
        self.kwargs = kwargs

    def block_thread(self) -> None:  # the real one serves until Ctrl+C
        pass


@pytest.fixture
def launched(monkeypatch, tmp_path):
    from trainer.ui import app

    demo = _FakeDemo()
    monkeypatch.setattr(app, "build_app", lambda worker, host, paths: (demo, {}))

    def start(*extra: str) -> tuple[int, dict]:
        code = app.main(["--data-root", str(tmp_path), "--lora-dir", str(tmp_path / "lora"), *extra])
        return code, demo.kwargs

    return start


def test_app_binds_localhost_by_default(launched, capsys):
    code, kwargs = launched()
    assert code == 0
    assert kwargs["server_name"] == "127.0.0.1" and not kwargs["share"] and kwargs["auth"] is None
    # our own start line, with our flag: gradio's banner ("set share=True in launch()") is silenced
    assert kwargs["quiet"] is True
    out = capsys.readouterr().out
    assert "Open http://127.0.0.1:7860/" in out and "--share makes a public link" in out and "share=True" not in out


def test_app_listen_and_auth(launched):
    code, kwargs = launched("--listen", "--auth", "user:pa:ss")
    assert code == 0 and kwargs["server_name"] == "0.0.0.0" and kwargs["auth"] == ("user", "pa:ss")


@pytest.mark.parametrize("auth", ["nocolon", ":pass"])
def test_app_refuses_a_bad_auth(launched, capsys, auth):
    code, kwargs = launched("--auth", auth)
    assert code == 2 and kwargs == {}
    out = capsys.readouterr().out
    assert "--auth" in out and "user:password" in out


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    """mkstemp creates 0600 whatever the umask: a LoRA a user shares (or a Web-UI under another account
    reads) must be created like any other file (measured in A1111: LoRA and sidecar were 0600)."""
    from trainer.models.checkpoint import _atomic_save

    old = os.umask(umask)
    try:
        text = atomic_write_text(tmp_path / "card.json", "{}")
        weights = tmp_path / "lora.safetensors"
        _atomic_save({"w": torch.zeros(2)}, weights, {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(text.stat().st_mode) == mode
    assert stat.S_IMODE(weights.stat().st_mode) == mode
