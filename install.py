"""TrainTrain installer.

Inside the Web-UI (A1111 / Forge run this file at every start, with ``launch`` importable): install only
optional extras that are missing, in versions that work with the host's torch, and never install, pin
or upgrade a package the host owns (torch, transformers, gradio, ...). Each install goes through
``launch.run_pip``; a failure is logged and only disables its feature. When nothing is missing this
does no pip call and imports nothing heavy (versions come from ``importlib.metadata``).

Outside the Web-UI (``python install.py``): install the standalone requirements
(``pip install -e .[standalone]``) on top of the torch the user already installed.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Packages the host Web-UI owns: we never name them in a pip command.
HOST_OWNED = frozenset({
    "torch", "torchvision", "torchaudio", "xformers", "diffusers", "transformers", "gradio", "numpy",
    "pillow", "safetensors", "accelerate", "open-clip-torch", "tokenizers", "huggingface-hub",
})


@dataclass(frozen=True)
class Extra:
    """One optional package: what to check, what to ask pip for, and what it enables."""

    dist: str
    spec: str
    feature: str
    no_deps: bool = True

    def pip_args(self) -> str:
        return f'install "{self.spec}"' + (" --no-deps" if self.no_deps else "")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.1.2+cu121"`` -> ``(2, 1, 2)`` (release numbers only; enough for our bounds)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def torch_has_cuda(torch_version: str, platform: str) -> bool:
    """Whether the installed torch build targets CUDA, judged from its version string only.

    PyPI's Linux wheels are CUDA builds without a local tag; Windows PyPI wheels are CPU-only.
    """
    local = torch_version.partition("+")[2]
    if local:
        return local.startswith("cu")
    return platform.startswith("linux")


def wanted_extras(torch_version: str, platform: str) -> list[Extra]:
    """The optional packages that suit this torch and platform.

    Args:
        torch_version: the installed torch version string (``"2.1.2+cu121"``).
        platform: ``sys.platform``.
    """
    tv = version_tuple(torch_version)
    extras: list[Extra] = []
    if tv >= (2, 1):
        extras.append(Extra("pytorch-optimizer", "pytorch-optimizer>=3.1", "the pytorch-optimizer optimizers (CAME, Lion, ...)"))
    # LoHa, LoKr and DoRA are our own code: lycoris-lora (whose 4.x does not import on torch < 2.4) is not needed
    if platform != "darwin" and (platform.startswith("linux") or platform.startswith("win")) and torch_has_cuda(torch_version, platform):
        bnb = "bitsandbytes>=0.43,<0.46" if tv < (2, 4) else "bitsandbytes>=0.43"
        extras.append(Extra("bitsandbytes", bnb, "8-bit optimizers (AdamW8bit, ...)"))
    return extras


def _satisfied(extra: Extra) -> bool:
    version = installed(extra.dist)
    if version is None:
        return False
    if extra.dist == "bitsandbytes":
        return version_tuple(version) >= (0, 43)
    return True


def _spec_names(spec: str) -> list[str]:
    return [_norm(re.split(r"[<>=!~;\[ ]", token, maxsplit=1)[0]) for token in spec.split() if token and not token.startswith("-")]


def install_webui(launch) -> list[str]:
    """Install the missing extras through the Web-UI's pip wrapper.

    Args:
        launch: the Web-UI's ``launch`` module (``run_pip``).

    Returns:
        one line per package that could not be installed (its feature stays off).
    """
    torch_version = installed("torch")
    if torch_version is None:
        return ["torch is not installed in this Web-UI environment; TrainTrain installs no extras"]
    problems = []
    for extra in wanted_extras(torch_version, sys.platform):
        if _satisfied(extra):
            continue
        names = _spec_names(extra.spec)
        assert not HOST_OWNED.intersection(names), f"refusing to install host-owned package {names}"
        try:
            launch.run_pip(extra.pip_args(), f"{extra.spec} for TrainTrain ({extra.feature})")
        except Exception as err:  # an optional extra must never take the Web-UI (or our tab) down
            problems.append(f"TrainTrain: could not install {extra.spec} ({extra.feature} stays off): {err}")
    for line in problems:
        print(line)
    return problems


def install_standalone() -> int:
    """``pip install -e .[standalone]`` on top of an existing torch (never a bare torch)."""
    if installed("torch") is None:
        print("TrainTrain: install torch for your platform first (https://pytorch.org/get-started/locally/), then rerun.")
        return 1
    cmd = [sys.executable, "-m", "pip", "install", "-e", f"{HERE}[standalone]"]
    print("TrainTrain:", " ".join(cmd))
    return subprocess.call(cmd)


def main() -> int:
    try:
        import launch  # only importable inside the Web-UI's launcher
    except ImportError:
        return install_standalone()
    install_webui(launch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
