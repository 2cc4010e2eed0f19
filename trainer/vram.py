"""VRAM estimate before a run, and a warning when step times say VRAM is spilling into shared memory.

The estimate is a calibrated sum of what stays on the GPU while the adapters train (one line in the
run log, and ``estimate_vram`` for the UI):

- **weights**: the frozen U-Net at the model precision, plus the text encoder(s) when they run every step
  (LoRA and iLECO with ``BASE`` selected; otherwise they are offloaded after encoding);
- **adapters**: trainable parameters × (weight + gradient + optimizer state slots) in the adapter dtype
  (AdamW keeps 2 slots; 8-bit optimizers 2 one-byte slots; Lion/SGD 1; Adafactor ≈ 0; Prodigy 4);
- **activations**: what autograd keeps for the backward of one training forward, per latent pixel and
  sample, measured for each architecture (``saved_activation_bytes`` below, on the real-size random
  models, SDPA attention) and scaled by batch × latent area × bytes per element of the compute dtype.
  Gradient checkpointing keeps only the block inputs plus the largest block's activations;
- **overhead**: CUDA context, kernels and allocator slack (a fixed 0.6 GB plus 8 %).

Not counted: the VAE during latent caching (it is offloaded before training), sampling previews, and
other programs on the same GPU. Real use varies by ±20 % with attention backend and torch version.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

GB = 1024**3

# Saved-for-backward bytes per sample in float32 = fixed + per_px × latent pixels, fitted to two sizes
# (16² and 32² latents) with saved_activation_bytes() on the real-size random U-Nets (LoRA on every
# default module, SDPA attention, weights excluded): "full" without gradient checkpointing, "ckpt" with
# it (block inputs plus the largest block, the peak during its recompute: an upper bound, diffusers
# checkpoints finer than whole blocks). SD2 shares SD1's layout. SDXL was measured in bf16 and doubled.
ACTIVATION_CALIBRATION: dict[str, dict[str, Any]] = {
    "SD1": {"full": (8_000_592, 446_911), "ckpt": (842_976, 172_744), "unet_params": 859_520_964},
    "SD2": {"full": (8_000_592, 446_911), "ckpt": (842_976, 172_744), "unet_params": 865_910_724},
    "SDXL": {"full": (228_225_664, 1_213_375), "ckpt": (100_135_040, 442_417), "unet_params": 2_567_463_684},
    # Flow DiTs: not measured (the U-Net probe does not apply and no GPU was at hand), counted from the
    # block structure with SDPA: per token and block a pre-norm block keeps ≈ 10·d + 4·h elements (Z-Image:
    # d 3840, SwiGLU h 10240, 30 layers + 4 refiners) or ≈ 16·d + 2·h (Anima/Cosmos: d 2048, h 8192, 28
    # blocks, + cross-attention); 4 latent pixels per token (2×2 patches); Z-Image's caption tokens (≤ 512)
    # are the fixed part. Checkpointing keeps each block's input (d per token) plus one block.
    "ZIMAGE": {"full": (512 * 10_792_960, 2_698_240), "ckpt": (512 * 1_063_680, 265_920), "unet_params": 6_154_908_736},
    "ANIMA": {"full": (0, 1_376_256), "ckpt": (0, 106_496), "unet_params": 1_958_569_472},
}
# trainable parameters per unit of rank where the U-Net rule (0.2 M·r for SD1.5) does not fit: the DiTs'
# attention + MLP linears (Z-Image 34 blocks × r·(8d + 3(d + h)); Anima 28 × r·(self 8d + cross + MLP 2(d + h)))
PER_RANK = {"ZIMAGE": 2_480_640, "ANIMA": 1_433_600}

OPTIMIZER_SLOTS = {"adamw": 2.0, "adam": 2.0, "adamw8bit": 0.5, "adam8bit": 0.5, "pagedadamw8bit": 0.5,
                   "lion": 1.0, "lion8bit": 0.25, "pagedlion8bit": 0.25, "sgdnesterov": 1.0, "sgdnesterov8bit": 0.25,
                   "adafactor": 0.1, "prodigy": 4.0, "dadaptadam": 3.0, "dadaptlion": 2.0, "came": 2.1}
OVERHEAD_GB, OVERHEAD_FRACTION = 0.6, 0.08
_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "model": 2, "int8": 1}


@dataclass(frozen=True)
class VramEstimate:
    """An estimate in GiB with its parts (``weights``, ``adapters``, ``activations``, ``overhead``)."""

    total_gb: float
    parts: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def line(self) -> str:
        """One log line: ``Estimated VRAM 7.9 GB (weights 1.6, adapters 0.1, activations 5.5, overhead 0.7)``."""
        inner = ", ".join(f"{k} {v:.1f}" for k, v in self.parts.items())
        return f"Estimated VRAM {self.total_gb:.1f} GB ({inner})"


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs from a model: family name, parameter counts, latent channels, VAE factor."""

    family: str
    unet_params: int
    te_params: int
    adapter_params: int = 0
    vae_scale_factor: int = 8
    weight_bytes: int = 0  # bytes per frozen weight as loaded (0: from train_model_precision)


def facts_from_bundle(bundle: Any, adapter_params: int = 0) -> ModelFacts:
    """Read the counts (and the dtype the weights really have on this device) from a loaded ``ModelBundle``."""
    family = getattr(bundle.family, "name", str(bundle.family))
    unet = sum(p.numel() for p in bundle.unet.parameters())
    te = sum(p.numel() for m in bundle.text_encoders.values() for p in m.parameters())
    dtype = getattr(bundle, "dtype", None)
    size = torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 0
    return ModelFacts(family, unet, te, adapter_params, int(getattr(bundle, "vae_scale_factor", 8)), size)


def adapter_param_count(unet_params: int, rank: int, family: str) -> int:
    """A LoRA's size without building it: kohya SD1.5 rank r on attention+conv ≈ 0.2 M·r (SDXL ≈ 0.7 M·r),
    scaled by the U-Net's size for other models."""
    if family in PER_RANK:
        return PER_RANK[family] * rank
    ref = ACTIVATION_CALIBRATION.get(family, ACTIVATION_CALIBRATION["SD1"])
    per_rank = (700_000 if family == "SDXL" else 200_000) * (unet_params / ref["unet_params"]) ** 0.5
    return int(per_rank * rank)


def estimate_vram(settings: Any, bundle_or_params: Any) -> VramEstimate:
    """Estimate the GPU memory a run of ``settings`` needs.

    Args:
        settings: a ``Settings`` (mode, precisions, batch, image size, rank, optimizer, checkpointing).
        bundle_or_params: a loaded ``ModelBundle``, a ``ModelFacts``, or ``(family, unet_params, te_params)``.

    Returns:
        The estimate with its parts in GiB.
    """
    if isinstance(bundle_or_params, ModelFacts):
        facts = bundle_or_params
    elif isinstance(bundle_or_params, tuple):
        facts = ModelFacts(*bundle_or_params)
    else:
        facts = facts_from_bundle(bundle_or_params)
    notes: list[str] = []
    s = settings
    model_bytes = facts.weight_bytes or _BYTES.get(str(s.train_model_precision).lower(), 2)
    full_bf16 = bool(getattr(s, "train_full_bf16", False))
    adapter_bytes = 2 if full_bf16 else _BYTES.get(str(s.train_lora_precision).lower(), 4)
    compute_bytes = 4 if model_bytes == 4 else 2
    mode = str(s.mode)
    te_every_step = mode in ("LoRA", "iLECO") and "BASE" in tuple(s.network_blocks)
    weights = facts.unet_params * model_bytes + (facts.te_params * model_bytes if te_every_step else 0)

    adapters_n = facts.adapter_params or adapter_param_count(facts.unet_params, int(s.network_rank), facts.family)
    if mode == "Difference":
        adapters_n *= 2  # the frozen copier stays attached in pass 2
    slots = OPTIMIZER_SLOTS.get(str(s.train_optimizer).lower().replace("_", ""), 2.0)
    adapters = adapters_n * adapter_bytes * (2 + slots)

    ref = ACTIVATION_CALIBRATION.get(facts.family)
    if ref is None or not ref["full"][1]:
        ref = ACTIVATION_CALIBRATION["SD1"]
        notes.append(f"no activation calibration for {facts.family}; used SD1's")
    scale = (facts.unet_params / ref["unet_params"]) ** 0.5  # activations grow with width, not with depth²
    h, w = s.image_size
    latent_px = (int(h) // facts.vae_scale_factor) * (int(w) // facts.vae_scale_factor)
    fixed, per_px = ref["ckpt" if bool(s.use_gradient_checkpointing) else "full"]
    activations = (fixed + per_px * latent_px) * scale * int(s.train_batch_size) * compute_bytes / 4
    if te_every_step:
        activations *= 1.03  # the text encoder's own saved activations: 77 tokens, small next to the U-Net

    base = weights + adapters + activations
    overhead = OVERHEAD_GB * GB + OVERHEAD_FRACTION * base
    parts = {"weights": weights / GB, "adapters": adapters / GB, "activations": activations / GB, "overhead": overhead / GB}
    parts = {k: round(v, 3) for k, v in parts.items()}
    return VramEstimate(round(sum(parts.values()), 1), parts, tuple(notes))


# -- calibration -------------------------------------------------------------------------------------


def saved_activation_bytes(bundle: Any, latent_hw: tuple[int, int], batch: int = 1, *, rank: int = 4) -> dict[str, float]:
    """Measure what autograd keeps for backward in one training forward (how the table above was made).

    Attaches a LoRA on every default module, runs one forward under ``saved_tensors_hooks`` and sums the
    bytes of every saved tensor (each storage once, weights excluded), per top-level U-Net block. With gradient
    checkpointing a block keeps only its inputs, and the largest block's activations come back during
    its recompute, so ``ckpt = saved outside blocks + block inputs + largest block``.

    Returns:
        Bytes: ``full``, ``ckpt`` and both per latent pixel per sample (``full_per_px``, ``ckpt_per_px``).
    """
    from trainer.network import NetworkSpec, build_network

    network = build_network(bundle, NetworkSpec(network_type="lierla", rank=rank, alpha=rank), device=bundle.device)
    network.attach()
    # weights saved for backward (x @ Wᵀ keeps W) are not new memory: they are counted under weights
    seen: set[int] = {t.untyped_storage().data_ptr() for m in (bundle.unet, network)
                      for t in (*m.parameters(), *m.buffers())}
    per_block: dict[str, int] = {}
    inputs_seen: set[int] = set()
    inputs = [0]
    current = ["other"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            per_block[current[0]] = per_block.get(current[0], 0) + t.untyped_storage().nbytes()
        return t

    def enter(name: str, args: tuple, kwargs: dict) -> None:
        current[0] = name
        flat = [*args, *kwargs.values()]
        for a in flat:
            for t in (a if isinstance(a, tuple) else (a,)):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs_seen:
                    inputs_seen.add(t.untyped_storage().data_ptr())
                    inputs[0] += t.untyped_storage().nbytes()

    def leave(*_: Any) -> None:
        current[0] = "other"

    handles = []
    for name in ("down_blocks", "mid_block", "up_blocks"):
        blocks = getattr(bundle.unet, name)
        for i, block in enumerate(blocks if isinstance(blocks, torch.nn.ModuleList) else [blocks]):
            label = f"{name}.{i}"
            handles.append(block.register_forward_pre_hook(
                lambda m, a, k, label=label: enter(label, a, k), with_kwargs=True))
            handles.append(block.register_forward_hook(leave))
    h, w = latent_hw
    try:
        x = torch.randn(batch, 4, h, w, device=bundle.device)
        with torch.no_grad():
            cond = bundle.encode_prompts([""] * batch)
        t = torch.full((batch,), 500, device=bundle.device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = bundle.predict(x, t, cond)
        del out
    finally:
        for handle in handles:
            handle.remove()
        network.detach()
    full = float(sum(per_block.values()))
    blocks = [v for k, v in per_block.items() if k != "other"]
    ckpt = float(per_block.get("other", 0) + inputs[0] + max(blocks, default=0))
    px = h * w * batch
    return {"full": full, "ckpt": ckpt, "full_per_px": full / px, "ckpt_per_px": ckpt / px}


# -- spill warning --------------------------------------------------------------------------------------


class SpillWatch:
    """A progress sink that warns once when CUDA step times jump: VRAM spilling into shared memory.

    Windows' sysmem fallback keeps a too-large run going at a tenth of its speed instead of failing.
    The watch takes the median of the first ``window`` step times after ``warmup`` steps as the stable
    figure, then compares the median of each later ``window`` with it; ``factor`` times slower emits
    one warning.

    Args:
        warn: called with the message (e.g. ``events.warning``).
        clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, warn: Callable[[str], None], *, window: int = 5, warmup: int = 2, factor: float = 5.0,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.warn, self.window, self.warmup, self.factor = warn, window, warmup, factor
        self.clock = clock or time.perf_counter
        self.stable: float | None = None
        self.warned = False
        self._last: float | None = None
        self._pass = None
        self._times: list[float] = []

    def step_time(self, seconds: float) -> None:
        """Feed one step's duration (the sink does this from progress events)."""
        self._times.append(seconds)
        n = len(self._times)
        if self.stable is None:
            if n >= self.warmup + self.window:
                self.stable = statistics.median(self._times[self.warmup:self.warmup + self.window])
            return
        if self.warned or n < self.warmup + 2 * self.window:
            return
        recent = statistics.median(self._times[-self.window:])
        if self.stable > 0 and recent > self.factor * self.stable:
            self.warned = True
            self.warn(f"step time jumped from {self.stable:.2f} to {recent:.2f} s: VRAM may be spilling into shared "
                      "memory; lower batch/resolution or enable gradient checkpointing")

    def on_event(self, event: Any) -> None:
        from trainer.progress import ProgressEvent

        if not isinstance(event, ProgressEvent):
            return
        now = self.clock()
        if self._pass != event.pass_index:  # a new pass starts its own timeline
            self._pass, self._last, self._times, self.stable = event.pass_index, now, [], None
            return
        if self._last is not None:
            self.step_time(now - self._last)
        self._last = now

    def close(self) -> None:
        pass
