"""Preset store (``presets/<name>.json``) and dated settings snapshots (``json/<YYYYMMDD>/<name>-<stamp>.json``).

Files use the reference product's JSON layout (see :meth:`Settings.to_json_dict`), so presets and
snapshots move freely between the two products. Every name goes through ``safe_name`` + ``inside``:
nothing is read or written outside its folder, and every write is atomic.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from trainer.errors import InputError
from trainer.paths import atomic_write_text, inside, safe_name
from trainer.settings import Settings

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
_SUFFIX = ".json"


def _stem(name: str, key: str) -> str:
    """A safe file stem from a name typed with or without the ``.json`` suffix."""
    name = name.strip()
    return safe_name(name[: -len(_SUFFIX)] if name.lower().endswith(_SUFFIX) else name, key)


def _read_json(path: Path) -> tuple[Settings, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(str(path), f"is not UTF-8 text ({err.reason}); re-save it as UTF-8 JSON") from err
    except json.JSONDecodeError as err:
        raise InputError(str(path), f"is not valid JSON (line {err.lineno}: {err.msg}); fix or delete it") from err
    return Settings.from_json_dict(data)


def list_presets(folder: str | os.PathLike[str] = PRESET_DIR) -> list[str]:
    """Preset names (file stems) in ``folder``, sorted case-insensitively; empty when the folder is missing."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted((p.stem for p in root.glob("*" + _SUFFIX) if p.is_file()), key=lambda n: (n.lower(), n))


def load_preset(name: str, folder: str | os.PathLike[str] = PRESET_DIR) -> tuple[Settings, list[str]]:
    """Load ``<folder>/<name>.json``.

    Args:
        name: preset name (``.json`` optional).
        folder: the preset folder.

    Returns:
        The settings and the load warnings (legacy or unknown keys).

    Raises:
        SettingsError: bad name or a value that cannot be coerced.
        InputError: no such preset, or the file is not JSON.
    """
    path = inside(folder, _stem(name, "preset") + _SUFFIX)
    if not path.is_file():
        known = ", ".join(list_presets(folder)) or "none"
        raise InputError(str(path), f"no such preset; choose one of: {known}")
    return _read_json(path)


def save_preset(
    settings: Settings, name: str | None = None, folder: str | os.PathLike[str] = PRESET_DIR, overwrite: bool = True
) -> Path:
    """Write ``settings`` as ``<folder>/<name>.json`` (atomically). Never starts training.

    Args:
        settings: the settings to store.
        name: preset name; None uses ``settings.save_lora_name`` (``untitled`` when empty).
        folder: the preset folder (created if missing).
        overwrite: replace an existing preset of that name.

    Returns:
        The written path.

    Raises:
        SettingsError: bad name.
        InputError: the preset exists and ``overwrite`` is False.
    """
    path = inside(folder, _stem(settings.save_lora_name if name is None else name, "preset") + _SUFFIX)
    if path.exists() and not overwrite:
        raise InputError(str(path), "a preset of this name exists; choose another name or allow overwriting")
    return atomic_write_text(path, settings.to_json())


def write_snapshot(settings: Settings, json_root: str | os.PathLike[str], when: datetime | None = None) -> Path:
    """Write the run's settings to ``json_root/<YYYYMMDD>/<name>-<YYYYMMDD_HHMMSS>.json``.

    An existing file is never overwritten: ``_1``, ``_2``, ... is appended to the stamp instead.

    Args:
        settings: the job's settings.
        json_root: the snapshot root (``json/``).
        when: the job's start time (pass the one the CSV log uses, so both share the stamp); None = now.

    Returns:
        The written path.

    Raises:
        SettingsError: ``save_lora_name`` is not a safe file name.
    """
    name = safe_name(settings.save_lora_name, "save_lora_name")
    when = datetime.now() if when is None else when
    day, stamp = when.strftime("%Y%m%d"), when.strftime("%Y%m%d_%H%M%S")
    for n in range(10_000):
        path = inside(json_root, day, f"{name}-{stamp}{f'_{n}' if n else ''}{_SUFFIX}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL reserves the name, so two runs starting in the same second never share a file.
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return atomic_write_text(path, settings.to_json())
    raise InputError(str(json_root), "too many snapshots with the same name and second; clean the folder")


def _snapshots(json_root: str | os.PathLike[str]) -> list[Path]:
    root = Path(json_root)
    if not root.is_dir():
        return []
    # Resolve every hit and keep only those still inside the root (a symlink must not lead us out).
    real_root = root.resolve()
    return [p for p in root.rglob("*" + _SUFFIX) if p.is_file() and real_root in p.resolve().parents]


def _stamp_key(path: Path) -> tuple[str, str, float]:
    stamp = path.stem.rsplit("-", 1)[-1]
    return (stamp, path.parent.name, path.stat().st_mtime)


def list_snapshots(json_root: str | os.PathLike[str]) -> list[Path]:
    """All snapshot files under ``json_root``, newest first (by the stamp in the name, then mtime)."""
    return sorted(_snapshots(json_root), key=_stamp_key, reverse=True)


def find_snapshot(name: str, json_root: str | os.PathLike[str]) -> Path:
    """Find ``<name>.json`` anywhere under ``json_root`` (the newest when several match).

    Args:
        name: the file name as shown (``.json`` optional), e.g. ``my_lora-20250101_120000``.
        json_root: the snapshot root.

    Returns:
        The path.

    Raises:
        SettingsError: bad name.
        InputError: no match.
    """
    wanted = _stem(name, "json name") + _SUFFIX
    matches = [p for p in list_snapshots(json_root) if p.name == wanted]
    if not matches:
        raise InputError(str(Path(json_root) / wanted), "no such settings snapshot; pick one from the history list")
    return matches[0]
