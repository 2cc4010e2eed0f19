"""Every shipped preset trains to the same LoRA as before the practitioners' settings existed.

``tests/fixtures/preset_fingerprints.json`` was recorded by ``preset_runs.py`` on the code before those
settings (commit b5c255d): each shipped preset, 4 steps on a tiny model, seed 0, fingerprinted per
tensor. The new keys (reg images, caption controls, epochs, masked loss, noise offset, previews, …) at
their defaults must reproduce those files. Re-record only for a change meant to alter training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .preset_runs import run_preset

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "fixtures" / "preset_fingerprints.json").read_text(encoding="utf-8"))
STACK = GOLDEN.pop("_recorded_with")


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_shipped_preset_trains_the_same_lora_as_before(name, tmp_path):
    import diffusers

    # float results are bit-stable per torch/diffusers version, not across them (torch 2.1 differs by
    # ~3e-4): on another stack, re-record both sides there (old and new matched exactly on 2.1.2 + 0.31)
    here = {"torch": _minor(torch.__version__), "diffusers": _minor(diffusers.__version__)}
    if here != STACK:
        pytest.skip(f"fingerprints were recorded with {STACK}; this is {here}")
    preset = ROOT / "presets" / f"{name}.json"
    if json.loads(preset.read_text(encoding="utf-8"))["train_optimizer"] == "CAME":
        pytest.importorskip("pytorch_optimizer")  # the test extra installs it; the hosts' stack may not
    got = run_preset(preset, tmp_path)
    want = GOLDEN[name]
    assert sorted(got) == sorted(want)
    for key, (total, size) in want.items():
        assert got[key][0] == pytest.approx(total, rel=1e-5, abs=1e-7), key
        assert got[key][1] == pytest.approx(size, rel=1e-5, abs=1e-7), key
