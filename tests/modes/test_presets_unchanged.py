"""Every shipped preset trains to the same LoRA as before the practitioners' settings existed.

``tests/fixtures/preset_fingerprints.json`` was recorded by ``preset_runs.py`` on the code before those
settings (commit b5c255d): each shipped preset, 4 steps on a tiny model, seed 0, fingerprinted per
tensor. The new keys (reg images, caption controls, epochs, masked loss, noise offset, previews, …) at
their defaults must reproduce those files. Re-record only for a change meant to alter training.

The comparison is a tolerance, not bit equality: the same code on another x86 CPU, thread count or BLAS
kernel differs in the 6th-7th digit (``fingerprint_distance`` has the measured figures). The tolerance sits
~100x above that noise and ~20x below what a 1% change of one default does, which the last test proves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .preset_runs import fingerprint_distance, run_preset

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "fixtures" / "preset_fingerprints.json").read_text(encoding="utf-8"))
STACK = GOLDEN.pop("_recorded_with")
# mean over tensors of the relative move (noise: <= 4e-7 measured); one tensor may not move 2% of its mass
MEAN_TOL, MAX_TOL = 3e-5, 2e-2


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _same_stack() -> None:
    import diffusers

    # a torch/diffusers release may change kernels and layer code, not only rounding (torch 2.1 differs
    # by ~3e-4): on another stack, re-record both sides there (old and new matched exactly on 2.1.2 + 0.31)
    here = {"torch": _minor(torch.__version__), "diffusers": _minor(diffusers.__version__)}
    if here != STACK:
        pytest.skip(f"fingerprints were recorded with {STACK}; this is {here}")


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_shipped_preset_trains_the_same_lora_as_before(name, tmp_path):
    _same_stack()
    preset = ROOT / "presets" / f"{name}.json"
    if json.loads(preset.read_text(encoding="utf-8"))["train_optimizer"] == "CAME":
        pytest.importorskip("pytorch_optimizer")  # the test extra installs it; the hosts' stack may not
    got = run_preset(preset, tmp_path)
    want = GOLDEN[name]
    assert sorted(got) == sorted(want)
    mean, worst = fingerprint_distance(got, want)
    assert mean <= MEAN_TOL and worst <= MAX_TOL, (mean, worst)


@pytest.mark.parametrize("change", [{"train_snr_gamma": 5.05}, {"noise_offset": 0.001}], ids=["snr+1%", "offset"])
def test_a_small_change_of_one_default_is_far_beyond_the_tolerance(change, tmp_path):
    """The tolerance is not so loose that a changed default slips through: 1% on min-SNR gamma, or a noise
    offset of 0.001 (off by default), moves the LoRA preset's fingerprint 10x past it."""
    _same_stack()
    got = run_preset(ROOT / "presets" / "LoRA.json", tmp_path, change)
    mean, _ = fingerprint_distance(got, GOLDEN["LoRA"])
    assert mean > 10 * MEAN_TOL, mean
