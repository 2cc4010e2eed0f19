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

from .preset_runs import run_preset

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "fixtures" / "preset_fingerprints.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_shipped_preset_trains_the_same_lora_as_before(name, tmp_path):
    got = run_preset(ROOT / "presets" / f"{name}.json", tmp_path)
    want = GOLDEN[name]
    assert sorted(got) == sorted(want)
    for key, (total, size) in want.items():
        assert got[key][0] == pytest.approx(total, rel=1e-5, abs=1e-7), key
        assert got[key][1] == pytest.approx(size, rel=1e-5, abs=1e-7), key
