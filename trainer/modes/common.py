"""Shared training machinery: noise, timesteps, loss, precision, and the one step loop (R8).

Every mode contributes only a ``loss_step(step) -> loss``; this file turns it into optimizer steps,
progress events, periodic saves and stop handling.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.errors import SettingsError, StopTraining
from trainer.progress import Events, LossTracker, ProgressEvent

# -- noise and timesteps ------------------------------------------------------------------------


class NoiseSchedule:
    """DDPM forward process over the model's ᾱ table: x_t = √ᾱ·x₀ + √(1−ᾱ)·ε."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.alphas_cumprod = alphas_cumprod.float()
        self.sqrt_a = self.alphas_cumprod.sqrt()
        self.sqrt_1ma = (1.0 - self.alphas_cumprod).sqrt()
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def _coef(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(like.device)[t].view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._coef(self.sqrt_a, t, x0) * x0 + self._coef(self.sqrt_1ma, t, x0) * eps

    def v_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._coef(self.sqrt_a, t, x0) * eps - self._coef(self.sqrt_1ma, t, x0) * x0


@dataclass(frozen=True)
class NoiseControls:
    """The training-noise tweaks kohya users know: noise offset and multi-resolution (pyramid) noise.

    With both off, :meth:`draw` is exactly one ``randn`` from the generator, so default runs draw the
    same noise as before these controls existed.
    """

    offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3

    @classmethod
    def from_settings(cls, s) -> NoiseControls:
        return cls(float(s.noise_offset), int(s.multires_noise_iterations), float(s.multires_noise_discount))

    def draw(self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """Noise of ``shape`` (B, C, H, W) drawn on the generator's device, returned on ``device``."""
        eps = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
        if self.offset > 0:
            # one constant per sample and channel: lets the LoRA shift overall brightness (Guttenberg 2023)
            eps = eps + self.offset * torch.randn((*shape[:2], 1, 1), generator=generator, device=generator.device,
                                                  dtype=dtype)
        if self.multires_iterations > 0:
            eps = self._pyramid(eps, generator)
        return eps.to(device)

    def like(self, x: torch.Tensor, generator: torch.Generator, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Noise shaped like ``x`` and on its device."""
        return self.draw(tuple(x.shape), generator, x.device, dtype)

    def _pyramid(self, eps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """kohya's pyramid noise: for i = 0 … iterations-1 add fresh noise drawn at size/rⁱ (r uniform in
        [2, 4) per level) up-sampled bilinearly and weighted discountⁱ, then rescale to unit std.

        Level 0 is full-size noise of weight 1 (kohya's loop starts there), so the fine share stays as
        kohya users tuned it; the loop stops after the first 1-pixel level."""
        b, c, h, w = eps.shape
        factors = (2 + 2 * torch.rand(self.multires_iterations, generator=generator, device=generator.device)).tolist()
        out = eps
        for i, r in enumerate(factors):
            hi, wi = max(1, int(h / r**i)), max(1, int(w / r**i))
            level = torch.randn((b, c, hi, wi), generator=generator, device=generator.device, dtype=eps.dtype)
            if (hi, wi) != (h, w):
                level = F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False)
            out = out + level * self.multires_discount**i
            if hi == 1 or wi == 1:
                break
        return out / out.std()


def check_timestep_range(lo: int, hi: int) -> None:
    """Raises SettingsError unless 0 ≤ lo < hi ≤ 1000."""
    if not 0 <= lo < hi <= 1000:
        raise SettingsError(
            "train_min_timesteps", f"range [{lo}, {hi}) is empty or outside [0, 1000]; set min < max, e.g. 0 and 1000"
        )


def sample_timesteps(
    batch: int, lo: int, hi: int, *, fixed_in_batch: bool, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Integers uniform in [lo, hi): one per sample, or one shared by the batch."""
    n = 1 if fixed_in_batch else batch
    t = torch.randint(lo, hi, (n,), generator=generator, device=generator.device).to(device)
    return t.expand(batch).contiguous() if fixed_in_batch else t


# -- loss -----------------------------------------------------------------------------------------

_ELEMENTWISE: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "MSE": lambda p, y: F.mse_loss(p, y, reduction="none"),
    "L1": lambda p, y: F.l1_loss(p, y, reduction="none"),
    "Smooth-L1": lambda p, y: F.smooth_l1_loss(p, y, reduction="none", beta=1.0),
}


class DenoiseLoss:
    """Per-sample loss in float32, optionally masked, weighted by min-SNR, averaged over the batch.

    A mask weights each pixel's loss and the mean still runs over every pixel (kohya's ``masked_loss``).

    Min-SNR (Hang et al. 2023): ε-prediction weight min(γ/SNR, 1); for v-prediction the equivalent
    weight is min(SNR, γ)/(SNR + 1) (the reference used the ε formula for both, §17 #10).
    """

    def __init__(self, name: str, snr_gamma: float, v_pred: bool, schedule: NoiseSchedule | None) -> None:
        if name not in _ELEMENTWISE:
            raise SettingsError("train_loss_function", f"unknown '{name}'; choose one of {', '.join(_ELEMENTWISE)}")
        self.elementwise = _ELEMENTWISE[name]
        self.snr_gamma = snr_gamma
        self.v_pred = v_pred
        self.snr = schedule.snr if schedule is not None else None  # None: flow matching, never weighted

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        snr = self.snr.to(t.device)[t]
        gamma = torch.full_like(snr, self.snr_gamma)
        if self.v_pred:
            return torch.minimum(snr, gamma) / (snr + 1.0)
        # zero-terminal-SNR schedules reach SNR = 0 at t = 999: the weight's limit there is 1 (never γ/0)
        return (gamma / snr.clamp_min(1e-12)).clamp_max(1.0)  # exact: any SNR < γ weighs 1

    def __call__(
        self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args: mask: per-pixel loss weights broadcastable to ``pred``; weights: per-sample factors (B,)
        such as ``prior_loss_weight`` for regularization samples."""
        loss = self.elementwise(pred.float(), target.float())
        if mask is not None:
            # kohya (and the reference's diff mask): weight each pixel, then average over ALL pixels, so a
            # sample whose mask covers a quarter of the image contributes a quarter of the loss
            loss = loss * mask.to(loss.device, loss.dtype)
        per_sample = loss.flatten(1).mean(1)
        if self.snr_gamma > 0 and self.snr is not None:
            per_sample = per_sample * self.weights(t)
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
        return per_sample.mean()


# -- precision ------------------------------------------------------------------------------------

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


@dataclass
class Precision:
    """Autocast and gradient scaling chosen once at setup (R9): the loop never branches on dtype."""

    model_dtype: torch.dtype
    adapter_dtype: torch.dtype
    device: torch.device
    notes: tuple[str, ...] = ()

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.model_dtype if self.model_dtype in (torch.float16, torch.bfloat16) else None

    @property
    def mixed_precision(self) -> str:
        """kohya's ``ss_mixed_precision``: the autocast mode, ``fp16``, ``bf16`` or ``no``."""
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.autocast_dtype, "no")  # type: ignore[arg-type]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def make_scaler(self):
        """A real GradScaler for fp16 autocast; elsewhere a pass-through with the same interface.

        fp16 gradients underflow without loss scaling. ``resolve_precision`` gives fp16 on CUDA only; a CPU
        scaler (torch >= 2.3) lets the same path run, and be tested, under CPU fp16 autocast.
        """
        new_api = hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler")
        supported = self.device.type == "cuda" or (self.device.type == "cpu" and new_api)
        enabled = self.model_dtype == torch.float16 and supported
        if new_api:
            return torch.amp.GradScaler(self.device.type, enabled=enabled)
        return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3 (A1111)


def resolve_precision(model_precision: str, lora_precision: str, device: torch.device, full_bf16: bool = False) -> Precision:
    """Map the precision settings to dtypes for this device.

    fp16 and bf16 frozen weights are GPU precisions: on CPU, fp16 runs as fp32 (CPU half kernels are
    slow or missing) and bf16 stays bf16 under CPU autocast. Adapters train in fp32 unless bf16 is
    asked for; fp16 adapters cannot be unscaled by the gradient scaler, so they are refused.

    Raises:
        SettingsError: an unknown precision, or fp16 adapters.
    """
    notes: list[str] = []
    key = model_precision.lower()
    if key in ("model", "int8"):
        key = "fp16"  # frozen weights in half precision; int8 storage is handled by the runtime
    if key not in _DTYPES:
        raise SettingsError("train_model_precision", f"unknown '{model_precision}'; choose model, fp32, bf16, fp16 or int8")
    model_dtype = _DTYPES[key]
    if device.type == "cpu" and model_dtype == torch.float16:
        notes.append("train_model_precision fp16 is a GPU precision; on this CPU the frozen weights stay fp32")
        model_dtype = torch.float32
    lkey = lora_precision.lower()
    if lkey not in _DTYPES:
        raise SettingsError("train_lora_precision", f"unknown '{lora_precision}'; choose fp32, bf16 or fp16")
    adapter_dtype = torch.bfloat16 if full_bf16 else _DTYPES[lkey]
    if adapter_dtype == torch.float16:
        raise SettingsError("train_lora_precision", "fp16 adapters cannot be trained with loss scaling; choose fp32 (or bf16)")
    return Precision(model_dtype, adapter_dtype, device, tuple(notes))


def resolve_vae_precision(vae_precision: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """``train_VAE_precision`` as a dtype for this device, and a note when it had to change.

    fp16 on CPU runs as fp32 (as for the frozen weights: CPU half kernels are slow or missing).

    Raises:
        SettingsError: an unknown precision.
    """
    key = vae_precision.lower()
    if key not in _DTYPES:
        raise SettingsError("train_VAE_precision", f"unknown '{vae_precision}'; choose fp32, bf16 or fp16")
    if device.type == "cpu" and _DTYPES[key] == torch.float16:
        return torch.float32, "train_VAE_precision fp16 is a GPU precision; on this CPU the VAE encodes in fp32"
    return _DTYPES[key], None


# -- the step loop ------------------------------------------------------------------------------


@dataclass
class PassResult:
    steps: int
    final_loss: float | None
    status: str  # "done", "stopped", "saved_stop"
    last_save: str | None = None


def save_steps(total: int, every: int) -> set[int]:
    """Periodic save points k, 2k, … below ``total`` (the final save carries no step suffix)."""
    return set(range(every, total, every)) if every > 0 else set()


def train_pass(
    loss_step: Callable[[int], torch.Tensor],
    *,
    total_steps: int,
    optimizer,
    schedule,
    precision: Precision,
    events: Events,
    stop: Callable[[], str | None],
    save: Callable[[int | None], str],
    save_every: int = 0,
    max_grad_norm: float = 0.0,
    pass_index: int = 1,
    epoch: Callable[[], int] = lambda: 0,
    after_backward: Callable[[list[torch.Tensor]], None] | None = None,
    start_step: int = 0,
    extra_saves: Collection[int] = (),
    epochs: int = 0,
    after_step: Callable[[int], None] | None = None,
) -> PassResult:
    """Run exactly ``total_steps`` optimizer steps of ``loss_step`` (N, not N+1).

    Args:
        loss_step: builds the loss of step ``i`` (0-based); called under autocast.
        optimizer: an ``OptimizerBundle`` from trainer.optim.
        schedule: a ``Schedule`` from trainer.schedules (stepped once per step with the raw loss).
        stop: returns None, ``"stop"`` or ``"save"`` (checked after every step).
        save: writes the network; ``save(step)`` for step files, returns the path.
        after_backward: called with the trainable parameters after backward (DDP gradient averaging).
        start_step: steps already done (a resumed run continues after it).
        extra_saves: more steps to save at (epoch ends), besides every ``save_every`` steps.
        epochs: the dataset epochs the pass covers, for the progress display (0: no dataset).
        after_step: called with the step number after each step and its saves (sample previews); it must
            not touch the training RNG streams.

    Raises:
        StopTraining: the loss became NaN or infinite (the last periodic save is kept).
    """
    opt = optimizer.optimizer
    params = [p for group in opt.param_groups for p in group["params"]]
    names = [group.get("name", f"group{i}") for i, group in enumerate(opt.param_groups)]
    scaler = precision.make_scaler()
    tracker = LossTracker(total_steps - start_step)
    periodic = save_steps(total_steps, save_every) | {k for k in extra_saves if 0 < k < total_steps}
    last_save: str | None = None
    value: float | None = None
    for step in range(start_step + 1, total_steps + 1):
        # forward under autocast; the mode decides what is predicted against what
        with precision.autocast():
            loss = loss_step(step - 1)
        scaler.scale(loss).backward()
        if after_backward is not None:
            after_backward(params)
        # clip after unscaling so the threshold is in real gradient units
        if max_grad_norm > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        # the step's one host sync, after its last kernel is queued (a read before backward would stall the
        # GPU's queue mid-step): the value feeds the log, the plot and the NaN guard. A NaN step has already
        # updated the in-memory adapters, so the guard stops before any save, preview or schedule step.
        value = float(loss.detach().float().item())
        if not math.isfinite(value):
            kept = f"; the last good save is {last_save}" if last_save else ""
            raise StopTraining(f"loss became {value} at step {step}; nothing was saved for this step; lower "
                               f"train_learning_rate or use bf16/fp32{kept}")
        schedule.step(value)
        tracker.update(value)
        elapsed, eta = tracker.timing(step - start_step)
        lrs = dict(zip(names, schedule.lrs(), strict=False))
        events.emit(ProgressEvent(step, total_steps, value, tracker.ema, lrs, epoch(), elapsed, eta, pass_index, epochs))
        if step in periodic:
            last_save = save(step)
        if after_step is not None:
            after_step(step)
        request = stop()
        if request == "save":
            return PassResult(step, value, "saved_stop", save(step))
        if request:
            return PassResult(step, value, "stopped", last_save)
    return PassResult(total_steps, value, "done", last_save)
