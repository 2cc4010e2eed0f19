"""The shared machinery: noise schedule, losses, min-SNR, precision, and the exact-step loop."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.errors import SettingsError, StopTraining
from trainer.modes.common import (
    DenoiseLoss,
    NoiseSchedule,
    PassResult,
    Precision,
    resolve_precision,
    sample_timesteps,
    save_steps,
    train_pass,
)
from trainer.progress import Events, HistorySink


def sd_schedule() -> NoiseSchedule:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return NoiseSchedule(torch.cumprod(1 - betas, 0).float())


def test_add_noise_and_v_target_match_the_closed_form():
    sched = sd_schedule()
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(sched.add_noise(x0, eps, t), a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert torch.allclose(sched.v_target(x0, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x0)


def test_timesteps_stay_in_half_open_range_and_fixed_shares_one():
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(4000, 200, 210, fixed_in_batch=False, generator=gen, device=torch.device("cpu"))
    assert int(t.min()) == 200 and int(t.max()) == 209
    shared = sample_timesteps(8, 0, 1000, fixed_in_batch=True, generator=gen, device=torch.device("cpu"))
    assert len(set(shared.tolist())) == 1


def test_min_snr_weights_eps_and_v():
    sched = sd_schedule()
    t = torch.tensor([10, 500, 990])
    snr = sched.snr[t]
    eps_w = DenoiseLoss("MSE", 5.0, False, sched).weights(t)
    v_w = DenoiseLoss("MSE", 5.0, True, sched).weights(t)
    assert torch.allclose(eps_w, torch.minimum(5.0 / snr, torch.ones_like(snr)))
    assert torch.allclose(v_w, torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1))
    assert float(eps_w[0]) < 1.0 and float(eps_w[2]) == 1.0  # low-noise steps are down-weighted


@pytest.mark.parametrize("name,expected", [("MSE", 1.0), ("L1", 1.0), ("Smooth-L1", 0.5)])
def test_losses(name, expected):
    loss = DenoiseLoss(name, 0.0, False, sd_schedule())
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    assert float(loss(pred, target, torch.tensor([1, 2]))) == pytest.approx(expected)


def test_masked_loss_weights_pixels_and_averages_over_all_of_them_as_kohya():
    loss = DenoiseLoss("MSE", 0.0, False, sd_schedule())
    pred, target = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    pred[:, :, 0, 0] = 2.0  # squared error 4 on one of four pixels, in both samples
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, :, 0, 0] = 1.0  # sample 0: only the erring pixel counts, at full weight
    mask[1, :, 0, 0] = 0.5  # sample 1: half weight there, the other pixels are masked off
    # kohya: mean over all 16 elements of (error * mask): 4 * 4 / 16 = 1.0 and 2 * 4 / 16 = 0.5
    assert float(loss(pred[:1], target[:1], torch.tensor([3]), mask[:1])) == pytest.approx(1.0)
    assert float(loss(pred, target, torch.tensor([3, 3]), mask)) == pytest.approx(0.75)
    assert float(loss(pred, target, torch.tensor([3, 3]), torch.ones(2, 1, 2, 2))) == pytest.approx(1.0)


def test_pyramid_noise_has_kohyas_low_frequency_share():
    """kohya's definition, computed independently here: level i (i = 0 … n-1) is noise at size/rⁱ with r
    uniform in [2, 4), up-sampled bilinearly, weighted discountⁱ, added to the base noise, then the sum is
    rescaled to unit std. Starting at i = 1 (the old code) gives 1.5-1.7x this low-frequency share."""
    import random

    import torch.nn.functional as F

    from trainer.modes.common import NoiseControls

    def kohya(shape, iterations, discount, rng):
        b, c, h, w = shape
        noise = torch.randn(shape)
        for i in range(iterations):
            r = rng.uniform(2, 4)
            hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
            noise = noise + F.interpolate(torch.randn(b, c, hn, wn), size=(h, w), mode="bilinear") * discount**i
            if hn == 1 or wn == 1:
                break
        return noise / noise.std()

    def low_share(x):  # energy left after 8x8 average pooling, relative to all energy
        return float(F.avg_pool2d(x, 8).pow(2).mean() / x.pow(2).mean())

    shape, draws = (16, 4, 64, 64), 24
    for iterations, discount in ((10, 0.8), (3, 0.5)):
        torch.manual_seed(0)
        rng = random.Random(0)
        expected = sum(low_share(kohya(shape, iterations, discount, rng)) for _ in range(draws)) / draws
        ours = NoiseControls(multires_iterations=iterations, multires_discount=discount)
        gen = torch.Generator().manual_seed(1)
        got = sum(low_share(ours.draw(shape, gen, torch.device("cpu"))) for _ in range(draws)) / draws
        assert got == pytest.approx(expected, rel=0.2), (iterations, discount)  # seeds vary it by < 10 %


def test_unknown_loss_names_the_field():
    with pytest.raises(SettingsError, match="train_loss_function"):
        DenoiseLoss("Huber2", 0, False, sd_schedule())


def test_precision_rules_on_cpu():
    p = resolve_precision("fp16", "fp32", torch.device("cpu"))
    assert p.model_dtype == torch.float32 and p.notes  # fp16 is a GPU precision: said, not silent
    assert resolve_precision("bf16", "fp32", torch.device("cpu")).autocast_dtype == torch.bfloat16
    assert resolve_precision("fp32", "fp32", torch.device("cpu")).autocast_dtype is None
    with pytest.raises(SettingsError, match="train_lora_precision"):
        resolve_precision("fp32", "fp16", torch.device("cpu"))
    with pytest.raises(SettingsError, match="train_model_precision"):
        resolve_precision("fp8e5", "fp32", torch.device("cpu"))


class _Sched:
    def __init__(self, opt):
        self.opt = opt
        self.calls = 0

    def step(self, loss):
        self.calls += 1

    def lrs(self):
        return [self.opt.param_groups[0]["lr"]]


class _Opt:
    def __init__(self, params):
        self.optimizer = torch.optim.SGD(params, lr=0.1)


def _loop(total, *, loss_value=None, stop_at=None, save_every=0, request="stop"):
    w = torch.nn.Parameter(torch.tensor([3.0]))
    opt = _Opt([w])
    sched = _Sched(opt.optimizer)
    history = HistorySink()
    saved, calls = [], []

    def loss_step(i):
        calls.append(i)
        if loss_value is not None and i >= 2:
            return w.sum() * loss_value
        return (w**2).sum()

    def stop():
        return request if stop_at is not None and len(calls) >= stop_at else None

    def save(step):
        saved.append(step)
        return f"file_{step}"

    result = train_pass(loss_step, total_steps=total, optimizer=opt, schedule=sched,
                        precision=resolve_precision("fp32", "fp32", torch.device("cpu")), events=Events([history]),
                        stop=stop, save=save, save_every=save_every)
    return result, calls, saved, sched, history, w


def test_loop_runs_exactly_n_steps_and_reports_each():
    result, calls, saved, sched, history, w = _loop(7)
    assert result == PassResult(7, result.final_loss, "done", None)
    assert calls == list(range(7)) and sched.calls == 7
    assert [int(r["step"]) for r in history.rows] == list(range(1, 8))
    assert history.latest.total == 7 and history.latest.eta_s == 0
    assert float(w) < 3.0  # the optimizer really stepped


def test_periodic_saves_exclude_the_last_step():
    assert save_steps(10, 3) == {3, 6, 9}
    assert save_steps(9, 3) == {3, 6}
    _, _, saved, *_ = _loop(10, save_every=3)
    assert saved == [3, 6, 9]


def test_stop_and_stop_and_save():
    result, calls, saved, *_ = _loop(10, stop_at=4)
    assert result.status == "stopped" and result.steps == 4 and saved == []
    result, calls, saved, *_ = _loop(10, stop_at=4, request="save")
    assert result.status == "saved_stop" and saved == [4] and result.last_save == "file_4"


def test_loss_is_read_once_per_step_after_the_optimizer_step(monkeypatch):
    """The one host sync of a step comes after backward and the optimizer step are queued: a read between
    forward and backward would make a GPU's queue run dry in the middle of every step."""
    order = []
    real_item = torch.Tensor.item

    def item(self):
        order.append("item")
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    w = torch.nn.Parameter(torch.tensor([3.0]))
    opt = _Opt([w])
    opt.optimizer.register_step_post_hook(lambda *args: order.append("step"))

    def loss_step(i):
        loss = (w**2).sum()
        loss.register_hook(lambda grad: order.append("backward"))
        return loss

    train_pass(loss_step, total_steps=3, optimizer=opt, schedule=_Sched(opt.optimizer),
               precision=resolve_precision("fp32", "fp32", torch.device("cpu")), events=Events([]),
               stop=lambda: None, save=lambda step: "")
    assert order == ["backward", "step", "item"] * 3


def test_nan_loss_stops_before_saving_the_step():
    """A NaN at a save step (4 with save_every=2): the guard stops before that save, the earlier one is named."""
    with pytest.raises(StopTraining, match="loss became nan at step 3; nothing was saved.*file_2"):
        _loop(10, loss_value=math.nan, save_every=2)
    saved = []
    with pytest.raises(StopTraining, match=r"at step 4; nothing was saved for this step; lower train_learning_rate "
                                           r"or use bf16/fp32; the last good save is file_2"):
        _loop_saving(saved)
    assert saved == [2]  # step 4's save never ran


def _loop_saving(saved):
    w = torch.nn.Parameter(torch.tensor([3.0]))
    opt = _Opt([w])

    def loss_step(i):
        return w.sum() * (math.nan if i == 3 else 1.0)

    def save(step):
        saved.append(step)
        return f"file_{step}"

    train_pass(loss_step, total_steps=10, optimizer=opt, schedule=_Sched(opt.optimizer),
               precision=resolve_precision("fp32", "fp32", torch.device("cpu")), events=Events([]),
               stop=lambda: None, save=save, save_every=2)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_save():
    with pytest.raises(StopTraining, match="loss became nan at step 3.*file_2"):
        _loop(10, loss_value=math.nan, save_every=2)


class _ScalerSpy(Precision):
    """The loop's Precision, keeping the scaler it makes (to read its scale)."""

    made: list = []

    def make_scaler(self):
        scaler = super().make_scaler()
        type(self).made.append(scaler)
        return scaler


def _fp16_autocast_works(device: str) -> bool:
    try:
        with torch.autocast(device, dtype=torch.float16):
            return torch.nn.functional.linear(torch.ones(1, 2, device=device), torch.ones(2, 2, device=device)).dtype \
                == torch.float16
    except (RuntimeError, ValueError):
        return False


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("max_grad_norm", [0.0, 10.0], ids=["no-clip", "clip"])
def test_fp16_loss_scaling_unscales_steps_and_skips_an_overflowing_step(device, max_grad_norm):
    """Under fp16 autocast the loss is scaled (2^16), the step uses the unscaled gradient, and a step whose
    fp16 gradient overflows is skipped (weights untouched) while the scale halves; the next step trains."""
    from trainer.network.lora import LoRAModule

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not _fp16_autocast_works(device) or not hasattr(torch.amp, "GradScaler"):
        pytest.skip(f"this torch has no fp16 autocast / GradScaler on {device}")
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 16).to(device).requires_grad_(False)
    adapter = LoRAModule("lora_unet_x", base, 4, 4.0)
    torch.nn.init.normal_(adapter.lora_up.weight, std=0.1)  # both factors get a gradient from step 1
    adapter.attach()
    x, target = torch.randn(8, 16, device=device), torch.randn(8, 16, device=device)

    def loss_step(i):
        out = base(x)  # fp16 under autocast
        if i == 2:  # dL/d(out) = 4 per element: 4 · 2^16 overflows fp16 (max 65504) in the backward
            return out.float().sum() * 4.0
        return torch.nn.functional.mse_loss(out.float(), target)

    def reference_grad() -> list[torch.Tensor]:
        """The step-1 gradient without a scaler (same fp16 autocast)."""
        adapter.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16):
            loss = loss_step(0)
        loss.backward()
        grads = [p.grad.clone() for p in adapter.parameters()]
        adapter.zero_grad(set_to_none=True)
        return grads

    expected = [p.detach() - 0.1 * g for p, g in zip(adapter.parameters(), reference_grad(), strict=True)]
    snapshots = [[p.detach().clone() for p in adapter.parameters()]]
    _ScalerSpy.made = []
    precision = _ScalerSpy(torch.float16, torch.float32, torch.device(device))
    scales = []

    def after_step(step):
        snapshots.append([p.detach().clone() for p in adapter.parameters()])
        scales.append(_ScalerSpy.made[0].get_scale())

    try:
        result = train_pass(loss_step, total_steps=4, optimizer=_Opt(list(adapter.parameters())),
                            schedule=_Sched(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)),
                            precision=precision, events=Events([]), stop=lambda: None, save=lambda step: "",
                            max_grad_norm=max_grad_norm, after_step=after_step)
    finally:
        adapter.detach()
    assert result.status == "done" and result.steps == 4
    assert _ScalerSpy.made[0].is_enabled()
    assert scales == [2.0**16, 2.0**16, 2.0**15, 2.0**15]  # halved by the overflow, not before
    # step 1 moved by the unscaled gradient (a missing unscale would move 65536x as far)
    for got, want, before in zip(snapshots[1], expected, snapshots[0], strict=True):
        assert (want - before).abs().max() > 1e-4
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3], strict=True))  # step 3: skipped
    assert all(not torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4], strict=True))  # step 4 trains
