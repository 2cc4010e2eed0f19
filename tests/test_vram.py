"""VRAM estimate (parts, scaling, calibration helper) and the spill warning with fake timings."""

from __future__ import annotations

import pytest

from trainer.progress import ProgressEvent
from trainer.settings import Settings
from trainer.vram import (
    GB,
    ModelFacts,
    SpillWatch,
    VramEstimate,
    estimate_vram,
    facts_from_bundle,
    saved_activation_bytes,
)


@pytest.fixture(scope="module")
def tiny_bundle():
    from trainer.models.diffusers_runtime import load_bundle

    return load_bundle("tiny-sd1", device="cpu")


SD15 = ModelFacts("SD1", 859_520_964, 123_060_480)
SDXL = ModelFacts("SDXL", 2_567_463_684, 817_000_000)


def _settings(**values) -> Settings:
    base = {"mode": "LoRA", "train_model_precision": "fp16", "train_lora_precision": "fp32", "train_batch_size": 1,
            "image_size(height, width)": "512", "network_rank": 16, "train_optimizer": "AdamW",
            "use_gradient_checkpointing": False}  # default blocks: all, BASE included
    base.update(values)
    return Settings.from_layers(base)


def test_parts_add_up_and_weights_follow_precision():
    est = estimate_vram(_settings(), SD15)
    assert isinstance(est, VramEstimate)
    assert set(est.parts) == {"weights", "adapters", "activations", "overhead"}
    assert est.total_gb == pytest.approx(sum(est.parts.values()), abs=0.06)
    # fp16 U-Net + text encoder (BASE trains it every step) = 2 bytes per parameter
    assert est.parts["weights"] == pytest.approx((859_520_964 + 123_060_480) * 2 / GB, abs=0.01)
    fp32 = estimate_vram(_settings(train_model_precision="fp32"), SD15)
    assert fp32.parts["weights"] == pytest.approx(2 * est.parts["weights"], abs=0.01)
    assert est.line().startswith(f"Estimated VRAM {est.total_gb:.1f} GB (weights ")


def test_activations_scale_with_batch_and_area_and_shrink_with_checkpointing():
    one = estimate_vram(_settings(), SD15).parts["activations"]
    four = estimate_vram(_settings(train_batch_size=4), SD15).parts["activations"]
    big = estimate_vram(_settings(**{"image_size(height, width)": "1024"}), SD15).parts["activations"]
    ckpt = estimate_vram(_settings(use_gradient_checkpointing=True), SD15).parts["activations"]
    assert four == pytest.approx(4 * one, rel=0.02)
    assert 3.8 * one < big < 4.1 * one  # 4x the latent pixels, plus a small fixed part
    assert ckpt < 0.5 * one


def test_text_encoder_counts_only_when_it_runs_every_step():
    with_te = estimate_vram(_settings(), SD15).parts["weights"]
    no_base = estimate_vram(_settings(**{"network_blocks(BASE = TextEncoder)": ["IN01", "OUT11"]}), SD15).parts["weights"]
    addift = estimate_vram(_settings(mode="ADDifT"), SD15).parts["weights"]
    assert no_base == addift == pytest.approx(859_520_964 * 2 / GB, abs=0.01) and with_te > no_base


def test_optimizer_state_and_bf16_adapters():
    adamw = estimate_vram(_settings(), SD15).parts["adapters"]
    lion = estimate_vram(_settings(train_optimizer="Lion"), SD15).parts["adapters"]
    bf16 = estimate_vram(_settings(train_full_bf16=True), SD15).parts["adapters"]
    assert lion == pytest.approx(adamw * 3 / 4, rel=0.05)  # weight + grad + 1 slot vs + 2 slots
    assert bf16 == pytest.approx(adamw / 2, rel=0.05)


def test_published_anchors_are_in_range():
    """SDXL LoRA at 1024 px bs1 with checkpointing fits 10 GB (kohya docs); without it, it does not fit 12 GB."""
    sdxl = dict(mode="LoRA", train_model_precision="fp16", **{"image_size(height, width)": "1024",
                "network_blocks(BASE = TextEncoder)": ["IN01", "IN02", "OUT11"]})
    ckpt = estimate_vram(_settings(use_gradient_checkpointing=True, **sdxl), SDXL)
    full = estimate_vram(_settings(**sdxl), SDXL)
    assert 5.5 < ckpt.total_gb < 10.0
    assert full.total_gb > 12.0
    sd15_bs4 = estimate_vram(_settings(train_batch_size=4, network_rank=64), SD15)  # fits 11 GB (kohya_ss#1730)
    assert sd15_bs4.total_gb < 11.0


def test_from_a_bundle_and_the_calibration_helper(tiny_bundle):
    facts = facts_from_bundle(tiny_bundle)
    assert facts.family == "SD1" and facts.unet_params == sum(p.numel() for p in tiny_bundle.unet.parameters())
    assert facts.weight_bytes == 4
    est = estimate_vram(_settings(train_model_precision="fp16"), tiny_bundle)
    assert est.parts["weights"] == pytest.approx((facts.unet_params + facts.te_params) * 4 / GB, abs=0.01)
    small = saved_activation_bytes(tiny_bundle, (8, 8))
    large = saved_activation_bytes(tiny_bundle, (16, 16))
    assert 0 < small["ckpt"] < small["full"] < large["full"]
    assert not any(m.__dict__.get("_traintrain_patches") for m in tiny_bundle.unet.modules())  # detached again


# -- spill warning ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(times: list[float], pass_index: int = 1, watch: SpillWatch | None = None, clock: FakeClock | None = None):
    warnings: list[str] = []
    clock = clock or FakeClock()
    watch = watch or SpillWatch(warnings.append, clock=clock)
    watch.on_event(ProgressEvent(0, len(times), 0.1, 0.1, {}, pass_index=pass_index))
    for i, dt in enumerate(times, start=1):
        clock.now += dt
        watch.on_event(ProgressEvent(i, len(times), 0.1, 0.1, {}, pass_index=pass_index))
    return warnings, watch


def test_spill_warning_once_when_the_median_jumps_five_fold():
    warnings, watch = _run([3.0, 2.0] + [1.0] * 8 + [6.0] * 10)
    assert len(warnings) == 1 and watch.stable == 1.0
    assert warnings[0].startswith("step time jumped from 1.00 to 6.00 s: VRAM may be spilling into shared memory")


def test_no_warning_for_noise_a_single_slow_step_or_a_slow_start():
    assert _run([1.0, 1.2, 0.9, 1.1] * 6)[0] == []
    assert _run([1.0] * 10 + [50.0] + [1.0] * 10)[0] == []  # one save or GC pause: the median ignores it
    assert _run([30.0, 20.0] + [1.0] * 20)[0] == []  # warm-up steps are not the baseline
    assert _run([1.0] * 10 + [4.5] * 10)[0] == []  # slower, but under the factor


def test_a_new_pass_starts_a_new_baseline():
    clock = FakeClock()
    warnings, watch = _run([1.0] * 12, pass_index=1, clock=clock)
    _run([6.0] * 12, pass_index=2, watch=watch, clock=clock)  # pass 2 is slower throughout: not a spill
    assert warnings == [] and watch.stable == 6.0


def test_the_runner_logs_one_estimate_line(tmp_path):
    from trainer.hosts.standalone import StandaloneHost
    from trainer.progress import Events, HistorySink, Message
    from trainer.runner import run_job

    messages: list[str] = []

    class Collect(HistorySink):
        def on_event(self, event) -> None:
            if isinstance(event, Message):
                messages.append(event.text)

    events = Events([Collect()])
    settings = Settings.from_layers({"mode": "iLECO", "model": "tiny-sd1", "original prompt": "a cat",
                                     "target prompt": "a dog", "train_iterations": 2, "train_batch_size": 1,
                                     "image_size(height, width)": "64", "logging_save_csv": False,
                                     "effect_check": False, "save_lora_name": "v", "save_overwrite": True})
    run_job(settings, StandaloneHost(lora_dir=tmp_path, device="cpu"), events=events)
    assert not [m for m in messages if m.startswith("Estimated VRAM ")]  # not a claim about this CPU machine
    lines = [m for m in messages if m.startswith("On a GPU this run would need about ")]
    assert len(lines) == 1 and lines[0].endswith("GB of VRAM (this run is on cpu)")
    assert len(events.sinks) == 1  # no spill watch on the CPU, nothing left behind


def test_the_flow_dits_have_their_own_figures():
    """Z-Image (6.2 B) in bf16 at 1024 px needs checkpointing on a 24 GB card; Anima (2 B) fits 12 GB with it."""
    dit = dict(train_model_precision="bf16", **{"image_size(height, width)": "1024"})
    zimage, anima = ModelFacts("ZIMAGE", 6_154_908_736, 0), ModelFacts("ANIMA", 1_958_569_472, 0)
    z_ckpt = estimate_vram(_settings(use_gradient_checkpointing=True, **dit), zimage)
    z_full = estimate_vram(_settings(**dit), zimage)
    a_ckpt = estimate_vram(_settings(use_gradient_checkpointing=True, **dit), anima)
    assert not z_ckpt.notes and not a_ckpt.notes  # no SD1 fallback
    assert 12.0 < z_ckpt.total_gb < 24.0 < z_full.total_gb
    assert a_ckpt.total_gb < 12.0
