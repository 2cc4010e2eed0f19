"""Safe names and atomic writes: every user-given name stays inside its folder, no file is half-written."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

from trainer.errors import InputError, SettingsError

_BAD_NAME = re.compile(r"[\x00-\x1f<>:\"|?*]")


def safe_name(name: str, key: str) -> str:
    """Check a user-given file *name* (no folders) and return it stripped.

    Args:
        name: the name as typed, e.g. ``save_lora_name``'s value.
        key: the settings key, used in the error message.

    Returns:
        The stripped name.

    Raises:
        SettingsError: the name is empty, contains a path separator, ``..``, a drive or a character
            that file systems reject.
    """
    stripped = name.strip()
    if not stripped:
        raise SettingsError(key, "is empty; type a name such as 'my_lora'")
    if "/" in stripped or "\\" in stripped or stripped in (".", "..") or ".." in stripped.split("."):
        raise SettingsError(key, f"{name!r} must be a plain name without '/', '\\' or '..'; type a name such as 'my_lora'")
    if os.path.isabs(stripped) or re.match(r"^[A-Za-z]:", stripped):
        raise SettingsError(key, f"{name!r} must be a plain name, not an absolute path; type a name such as 'my_lora'")
    if _BAD_NAME.search(stripped):
        raise SettingsError(key, f"{name!r} contains a character that file names cannot hold (<>:\"|?* or control)")
    return stripped


def folder_name(path: str | os.PathLike[str]) -> str:
    """The last part of a folder's path, for metadata: a shared LoRA must not reveal the user's folders
    (kohya's ``ss_dataset_dirs`` likewise holds names only). ``""`` stays ``""``."""
    text = os.fspath(path).strip()
    return Path(text).expanduser().resolve().name if text else ""


def inside(folder: str | os.PathLike[str], *parts: str) -> Path:
    """Join ``parts`` under ``folder`` and make sure the result stays inside it.

    Raises:
        SettingsError: the joined path escapes ``folder`` (``..``, absolute parts, symlinks out).
    """
    root = Path(folder).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise SettingsError("path", f"'{os.path.join(*parts)}' would leave the folder {root}")
    return path


class WriteError(InputError, OSError):
    """A file could not be written (disk full, read-only folder, ...); still an ``OSError`` for callers.

    Args:
        path: the file that was being written.
        err: the operating system's error.
    """

    def __init__(self, path: str, err: OSError) -> None:
        reason = err.strerror or str(err) or type(err).__name__
        InputError.__init__(self, path, f"could not be written ({reason}); free disk space or choose a writable "
                                        "folder (any previous file of this name is unchanged)")
        self.errno = err.errno


def _umask() -> int:
    """The process umask, read without changing it where the system tells it (Linux), else set and put
    back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_beside(target: Path) -> tuple[int, str]:
    """A temp file in ``target``'s folder, with the mode a plain ``open(target, "w")`` would give.

    ``mkstemp`` creates 0600 whatever the umask; a LoRA a user shares or a Web-UI in another account
    reads must get the ordinary 0666 & ~umask (measured: files were 0600 under umask 022).

    Returns:
        ``(fd, path)`` as :func:`tempfile.mkstemp`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    if hasattr(os, "fchmod"):  # POSIX; Windows has no such modes
        os.fchmod(fd, file_mode())
    return fd, tmp


def file_mode() -> int:
    """The mode a new file gets from ``open()``: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, exclusive: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, then rename.

    A crash or a full disk leaves either the old file or none, never a partial one.

    Args:
        exclusive: never replace an existing file, even one that appeared while this file was being
            written (the finished file is linked into place, which fails when the name is taken).

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists; nothing was written.
        WriteError: the file system refused the write.
    """
    target = Path(path)
    tmp = None
    try:
        fd, tmp = temp_beside(target)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            _publish_new(Path(tmp), target)
        else:
            os.replace(tmp, target)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, FileExistsError):  # full disk, read-only folder, ...
            raise WriteError(str(target), err) from err
        raise
    return target


def _publish_new(tmp: Path, target: Path) -> None:
    """Move a finished temp file to ``target`` only if that name is free, atomically where the OS can."""
    try:
        os.link(tmp, target)  # fails with FileExistsError when the name is taken: check and create in one step
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network shares)
        if os.name == "nt":
            os.rename(tmp, target)  # Windows' rename refuses an existing target
            return
        if target.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(target)) from None
        os.replace(tmp, target)
        return
    tmp.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
