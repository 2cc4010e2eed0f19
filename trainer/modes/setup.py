"""Components every mode is built from (R7): run context, outputs, adapters, optimizer, passes, saves.

Builders take what they need and return a component; modes compose them. Ordering constraints are
commented where they exist.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.csvlog import CsvSink, csv_path
from trainer.errors import SettingsError
from trainer.modes.common import (
    DenoiseLoss,
    NoiseSchedule,
    PassResult,
    Precision,
    resolve_precision,
    resolve_vae_precision,
    save_steps,
    train_pass,
)
from trainer.modes.resume import load_state, restore_state, save_state, state_path
from trainer.paths import inside
from trainer.progress import Events, RunSummary
from trainer.report import Probe, measure_saved


@dataclass(frozen=True)
class OutputPlan:
    """Where this job's files go, and the overwrite rule for every one of them."""

    lora_dir: Path
    name: str
    stamp: str
    overwrite: bool
    logs_root: Path | None = None  # None: no CSV log
    samples_root: Path | None = None  # where preview images go (logs/), with or without a CSV
    state_root: Path | None = None  # where resume states go (the run's resume/ folder); None: none written
    states: list[Path] = field(default_factory=list)  # resume states written, oldest first

    def path(self, suffix: str = "") -> Path:
        return inside(self.lora_dir, f"{self.name}{suffix}.safetensors")

    def check_free(self, suffixes: list[str]) -> None:
        """Refuse, before anything is loaded, to overwrite an existing output without ``save_overwrite``.

        Raises:
            SettingsError: one of the planned files exists.
        """
        if self.overwrite:
            return
        for suffix in suffixes:
            path = self.path(suffix)
            if path.exists():
                raise SettingsError("save_overwrite", f"{path} exists; tick save_overwrite or change save_lora_name")

    def free_path(self, suffix: str) -> Path:
        """For files whose name depends on when the user stopped: never overwrite, add ``_1``, ``_2``…"""
        path = self.path(suffix)
        n = 1
        while path.exists() and not self.overwrite:
            path = self.path(f"{suffix}_{n}")
            n += 1
        return path


@dataclass
class RunContext:
    """Everything a mode recipe needs, chosen once at setup (R9, R20)."""

    settings: Any
    bundle: Any
    events: Events
    stop: Callable[[], str | None]
    out: OutputPlan
    seed: int
    precision: Precision
    objective: Any  # trainer.modes.objective.Objective: DDPM (ε/v) or rectified flow
    started_at: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)
    files: list[tuple[Path, dict[str, Any] | None]] = field(default_factory=list)  # written by earlier passes
    rank: int = 0  # data-parallel rank (torchrun); only rank 0 writes files and logs
    world_size: int = 1
    grad_sync: Callable[[list[torch.Tensor]], None] | None = None
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # saved in resume states
    tracked: dict[str, Any] = field(default_factory=dict)  # other resumable parts (the data batcher)
    frozen_networks: dict[str, Any] = field(default_factory=dict)  # e.g. the copier under pass 2, kept in states
    dataset: Any = None  # the dataset plan when the runner made it already (train_epochs), else None

    @staticmethod
    def create(settings, bundle, events: Events, stop, out: OutputPlan, seed: int, *, rank: int = 0,
               world_size: int = 1, grad_sync=None) -> RunContext:
        seed_everything(seed)
        precision = resolve_precision(settings.train_model_precision, settings.train_lora_precision, bundle.device,
                                      bool(getattr(settings, "train_full_bf16", False)))
        from trainer.modes.objective import objective_for

        ctx = RunContext(settings, bundle, events, stop, out, seed, precision, objective_for(bundle, settings),
                         rank=rank, world_size=world_size, grad_sync=grad_sync)
        for note in precision.notes:
            ctx.note(note)
        clip_skip = int(getattr(settings, "clip_skip", 1) or 1)
        if hasattr(bundle, "set_clip_skip"):  # set every job, as compile below
            why = bundle.set_clip_skip(clip_skip)
            if why:
                ctx.note(why)
        elif clip_skip != 1:  # the Web-UI encodes prompts with its own "Clip skip" option
            ctx.note(f"clip_skip {clip_skip} is not used here: the Web-UI's own Clip skip option applies "
                     f"(recorded: {getattr(bundle, 'clip_skip', None)})")
        if hasattr(bundle, "set_vae_precision"):  # standalone; the Web-UI encodes with its own VAE as it is
            vae_dtype, why = resolve_vae_precision(settings.train_VAE_precision, bundle.device)
            bundle.set_vae_precision(vae_dtype)
            if why:
                ctx.note(why)
        if hasattr(bundle, "set_compile"):  # set every job: the host reuses a cached bundle between jobs
            why = bundle.set_compile(bool(getattr(settings, "train_compile", False)))
            if why:
                ctx.note(why)
        return ctx

    def for_pass(self, s) -> RunContext:
        """The context of Difference pass 2, built from the pass's own settings ``s``.

        Pass 2 draws from its own ``train_seed`` (-1: the job's seed) and trains its adapters in its own
        ``train_lora_precision``; events, outputs, the files written so far, notes, generators and frozen
        networks are shared with pass 1. The frozen model stays as the host loaded it for the job
        (``train_model_precision`` and ``model_v_pred`` are job-wide).
        """
        if s is self.settings:
            return self
        seed = int(s.train_seed) if int(s.train_seed) >= 0 else self.seed
        if seed != self.seed:
            seed_everything(seed)
        precision = resolve_precision(self.settings.train_model_precision, s.train_lora_precision, self.bundle.device,
                                      bool(getattr(s, "train_full_bf16", False)))
        return dataclasses.replace(self, settings=s, seed=seed, precision=precision)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.events.warning(text)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A device generator for noise/timesteps, seeded from the job seed (the global RNG is not used);
        each data-parallel rank draws its own stream."""
        gen = torch.Generator(device=self.bundle.device)
        gen.manual_seed((self.seed + offset + 1_000_003 * self.rank) % 2**63)
        self.generators[offset] = gen
        return gen

    def track(self, name: str, obj: Any) -> Any:
        """Register an object with ``state_dict``/``load_state_dict`` (e.g. the batcher) for resume."""
        self.tracked[name] = obj
        return obj

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def noise(self) -> NoiseSchedule | None:
        """The DDPM ᾱ schedule (None for flow-matching models)."""
        return getattr(self.objective, "schedule", None) if self.objective.kind == "ddpm" else None

    def loss_fn(self, s) -> DenoiseLoss:
        """The pass's loss; on a flow model the DDPM-only noise settings are refused first."""
        if self.objective.kind == "flow":
            from trainer.modes.objective import check_flow_settings

            check_flow_settings(s, self.note)
        return self.objective.loss(s.train_loss_function, float(s.train_snr_gamma))



@dataclass
class ModeOutcome:
    """What a mode hands back to the runner."""

    status: str
    lora_path: Path | None
    steps: int
    final_loss: float | None
    saved: list[tuple[Path, dict[str, Any] | None]] = field(default_factory=list)
    report: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (adapter init and anything else that uses the global RNG)."""
    random.seed(seed)
    torch.manual_seed(seed % 2**63)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy ships with every host
        pass


# -- adapters ------------------------------------------------------------------------------------


def build_adapters(ctx: RunContext, s, *, resume: str = "", seed_offset: int = 0, text_encoder: bool = True):
    """Build, optionally initialise from a file, and attach a network for settings ``s``.

    Args:
        text_encoder: False for modes whose conditioning is computed once before training: text-encoder
            adapters there would never receive a gradient and would be saved as zeros (§17 #17).
    """
    import dataclasses

    from trainer.network import NetworkSpec, build_network, load_network_weights

    # seed right before init so a pass's adapters do not depend on what ran before it
    torch.manual_seed((ctx.seed + seed_offset) % 2**63)
    spec = NetworkSpec.from_settings(s)
    if not text_encoder and "BASE" in spec.blocks:
        spec = dataclasses.replace(spec, blocks=tuple(b for b in spec.blocks if b != "BASE"))
        ctx.events.info(f"{s.mode}: BASE (text encoder) is not trained in this mode; its prompts are encoded once")
    network = build_network(ctx.bundle, spec, dtype=ctx.precision.adapter_dtype, device=ctx.bundle.device)
    for warning in getattr(network, "warnings", ()):
        ctx.note(warning)
    if resume:
        report = load_network_weights(network, resume, bundle=ctx.bundle)
        ctx.events.info(f"network initialised from {resume}: {report}")
    network.attach()
    ctx.events.info(network.summary())
    if s.logging_verbose:  # every adapted module, under the name it is saved with
        for adapter in network.adapters.values():
            ctx.events.info(f"  {adapter.extra_repr()}")
    return network


def train_text_encoder(s) -> bool:
    """Text-encoder adapters train only when BASE is among the selected blocks."""
    return "BASE" in tuple(s.network_blocks)


# -- optimization --------------------------------------------------------------------------------


def build_optimization(ctx: RunContext, s, network, total_steps: int):
    """Optimizer and LR schedule for one pass; notes (fallbacks, warnings) go to the user."""
    from trainer.optim import build_optimizer
    from trainer.schedules import build_scheduler

    te_lr = s.train_textencoder_learning_rate or s.train_learning_rate
    groups = network.param_groups(s.train_learning_rate, te_lr)
    optimizer = build_optimizer(s.train_optimizer, groups, lr=s.train_learning_rate,
                                settings=dict(s.train_optimizer_settings), network=network, device=ctx.bundle.device)
    for note in optimizer.notes:
        ctx.note(note)
    schedule = build_scheduler(
        s.train_lr_scheduler, optimizer, total_steps=total_steps, warmup_steps=s.train_lr_warmup_steps,
        num_cycles=s.train_lr_scheduler_num_cycles, power=s.train_lr_scheduler_power, step_rules=s.train_lr_step_rules,
        settings=dict(s.train_lr_scheduler_settings),
    )
    for note in schedule.notes:
        ctx.note(note)
    return optimizer, schedule


# -- saving --------------------------------------------------------------------------------------


def make_metadata(ctx: RunContext, s, network, *, suffix: str, steps: int, extra: dict[str, Any]) -> dict[str, str]:
    """kohya ``ss_*``/``modelspec.*`` plus our ``traintrain_*`` keys, built fresh for every file (§17 #9)."""
    from trainer.network import build_metadata
    from trainer.settings import FIELD_BY_KEY

    # the image-pair modes train at their images' own size (traintrain_image_size "HxW"); image_size is not theirs
    pair_size = str(extra.get("traintrain_image_size", ""))
    h, w = (int(v) for v in pair_size.split("x")) if pair_size else s.image_size
    kohya = {k: str(v) for k, v in extra.items() if k.startswith("ss_")}  # the mode's own ss_* figures win
    if s.mode in FIELD_BY_KEY["noise_offset"].modes:  # the modes that noise real latents
        kohya = {"ss_noise_offset": str(float(s.noise_offset)), "ss_multires_noise_iterations":
                 str(int(s.multires_noise_iterations)), "ss_multires_noise_discount": str(float(s.multires_noise_discount)),
                 **kohya}
    ours = {k: v for k, v in extra.items() if not k.startswith("ss_")}
    # loading takes the baked-in strength out again (copier reuse, network_resume): the round trip is exact
    ours["traintrain_network_strength"] = repr(float(s.network_strength))
    metadata = build_metadata(
        settings=s, network=network, bundle=ctx.bundle, output_name=ctx.out.name + suffix, steps=steps,
        seed=ctx.seed, started_at=ctx.started_at, resolution=(w, h), extra={"traintrain_mode": s.mode, **ours},
        mixed_precision=ctx.precision.mixed_precision,
    )
    metadata.update(kohya)
    return metadata


def save_network(ctx: RunContext, s, network, path: Path, *, steps: int, extra: dict[str, Any],
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``network`` to ``path`` (atomic, finite-checked) with metadata; adapters in eval for saving.

    Without ``save_overwrite`` the name is claimed when the file is written, not only when the job
    started: if another run wrote a file of that name meanwhile, this one goes to the next free
    ``<name>_N`` (said in a note), so neither finished LoRA is lost.

    Args:
        state: the tensors already made for the report card (the same ones); None makes them here.

    Returns:
        The path actually written.
    """
    from trainer.network import save_lora

    if not ctx.is_main:  # data parallel: every rank holds the same adapters, rank 0 writes them
        return path
    if state is None:
        state = network.kohya_state_dict(dtype=save_dtype(s.save_precision), strength=float(s.network_strength))
    wanted, base = path, path.stem[len(ctx.out.name):]
    while True:
        metadata = make_metadata(ctx, s, network, suffix=path.stem[len(ctx.out.name):], steps=steps, extra=extra)
        try:
            save_lora(path, state, metadata, exclusive=not ctx.out.overwrite)
            break
        except FileExistsError:
            path = ctx.out.free_path(base)
    if path != wanted:
        ctx.note(f"{wanted.name} was created by something else while this run trained; saved as {path.name} "
                 "instead (save_overwrite is off, so no LoRA is replaced)")
    ctx.events.info(f"Saved {path}")
    return path


def save_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(name, torch.float16)  # "model" and fp16 → fp16


def run_pass(
    ctx: RunContext,
    s,
    network,
    loss_step: Callable[[int], torch.Tensor],
    *,
    pass_index: int = 1,
    suffix: str = "",
    csv_suffix: str = "",
    epoch: Callable[[], int] = lambda: 0,
    summary: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    resume: str | None = None,
    steps_per_epoch: int = 0,
) -> tuple[PassResult, list[Path]]:
    """Train one pass of ``s.train_iterations`` steps with CSV logging, periodic and stop saves.

    Args:
        resume: a state file to continue from; None reads ``s.train_resume_state``, "" starts fresh.
        steps_per_epoch: the dataset's steps per epoch (dataset modes), for ``save_every_n_epochs``.

    Returns:
        The pass result and the step/stop files written during it.
    """
    from trainer.optim import eval_mode, train_mode

    total = int(s.train_iterations)
    optimizer, schedule = build_optimization(ctx, s, network, total)
    train_mode(optimizer.optimizer)
    written: list[Path] = []
    extra = dict(extra or {})

    epoch_saves = epoch_save_steps(total, steps_per_epoch, int(getattr(s, "save_every_n_epochs", 0) or 0))
    step_saves = save_steps(total, int(s.save_per_steps))

    def save(step: int | None) -> str:
        # schedule-free optimizers hold averaged weights only in eval mode (§17 #13)
        eval_mode(optimizer.optimizer)
        names = [f"_epoch{epoch_saves[step]}"] if step in epoch_saves else []
        if step not in epoch_saves or step in step_saves:
            names.append(f"_{step}steps")  # also the stop-and-save file
        for name in names:
            path = save_network(ctx, s, network, ctx.out.free_path(f"{suffix}{name}"), steps=step or total, extra=extra)
            written.append(path)
        train_mode(optimizer.optimizer)
        if ctx.is_main and ctx.out.state_root is not None:  # to continue from this step (train mode: as it trains)
            ctx.out.states.append(state_path(path, ctx.out.state_root))
            save_state(ctx.out.states[-1], step=int(step or total), pass_index=pass_index, settings=s, network=network,
                       optimizer=optimizer.optimizer, schedule=schedule, generators=ctx.generators, tracked=ctx.tracked,
                       frozen=ctx.frozen_networks)
        return str(path)

    start = 0
    resume_from = (getattr(s, "train_resume_state", "") or "") if resume is None else resume
    if resume_from:
        state = load_state(resume_from, s, pass_index)
        start = restore_state(state, network=network, optimizer=optimizer.optimizer, schedule=schedule,
                              generators=ctx.generators, tracked=ctx.tracked)
        ctx.events.info(f"Resumed from {resume_from} at step {start} of {total}")

    sink = None
    if ctx.out.logs_root is not None and ctx.is_main:
        sink = CsvSink(csv_path(ctx.out.logs_root, ctx.out.name, ctx.out.stamp, csv_suffix), _csv_header(ctx, s), pass_index)
        ctx.events.add(sink)
    params = {g["name"]: sum(p.numel() for p in g["params"]) for g in network.param_groups(1.0, 1.0)}
    ctx.events.emit(RunSummary(s.mode, pass_index, total, int(s.train_batch_size), trainable_params=params,
                               network=network.summary(), seed=ctx.seed, extra={k: str(v) for k, v in (summary or {}).items()}))
    previews = None
    if int(getattr(s, "sample_every_n_steps", 0) or 0) > 0 and ctx.is_main:
        from trainer.sampling.hook import build_preview_hook

        previews = build_preview_hook(ctx, s, network, pass_index=pass_index, total_steps=total,
                                      optimizer=optimizer.optimizer)
    try:
        result = train_pass(
            loss_step, total_steps=total, optimizer=optimizer, schedule=schedule, precision=ctx.precision,
            events=ctx.events, stop=ctx.stop, save=save, save_every=int(s.save_per_steps),
            max_grad_norm=float(getattr(s, "train_max_grad_norm", 0) or 0), pass_index=pass_index, epoch=epoch,
            after_backward=ctx.grad_sync, start_step=start, extra_saves=epoch_saves, after_step=previews,
            epochs=-(-total // steps_per_epoch) if steps_per_epoch > 0 else 0,
        )
        if previews is not None:
            previews.finish(result.steps)  # the end-of-pass preview
    finally:
        if sink is not None:
            sink.close()
            ctx.events.sinks.remove(sink)
    eval_mode(optimizer.optimizer)
    return result, written


def epoch_save_steps(total: int, steps_per_epoch: int, every_n_epochs: int) -> dict[int, int]:
    """``{step: epoch}`` for the saves every ``every_n_epochs`` epochs, below ``total`` (the final save
    carries no suffix)."""
    if steps_per_epoch <= 0 or every_n_epochs <= 0:
        return {}
    ends = range(every_n_epochs, total // steps_per_epoch + 1, every_n_epochs)
    return {k * steps_per_epoch: k for k in ends if k * steps_per_epoch < total}


def _csv_header(ctx: RunContext, s) -> dict[str, str]:
    return {
        "network_rank": str(s.network_rank), "network_alpha": str(s.network_alpha),
        "train_learning_rate": str(s.train_learning_rate), "train_iterations": str(s.train_iterations),
        "train_lr_scheduler": s.train_lr_scheduler, "model_version": ctx.bundle.family.base_model_version,
        "train_optimizer": s.train_optimizer, "save_lora_name": ctx.out.name,
    }


def finish(ctx: RunContext, s, network, result: PassResult, written: list[Path], *, suffix: str = "",
           extra: dict[str, Any] | None = None, sidecar: dict[str, Any] | None = None,
           probe: Probe | None = None, isolate: Callable[[], Any] | None = None) -> ModeOutcome:
    """Final save (when the pass completed) with the report card (trainer/report.py); collects every file.

    A card that finds NaN/inf leaves the file unwritten and the outcome ``failed``: a broken LoRA is
    never handed over as a success.
    """
    extra = dict(extra or {})
    # step, epoch and stop saves are LoRAs a user loads too: the same A1111 card sidecar for each
    saved = list(ctx.files) + [(p, sidecar) for p in written]
    card = None
    status = result.status
    final = Path(result.last_save) if result.last_save else None
    wants_card = probe is not None and getattr(s, "effect_check", True)
    if result.status == "saved_stop" and final is not None and wants_card:
        # Stop-and-Save hands the user a file too: it gets its card (plain Stop leaves no file, no card)
        card = _card_for_stop(ctx, s, network, final, result.steps, extra, probe, isolate)
    if result.status == "done":
        state = network.kohya_state_dict(dtype=save_dtype(s.save_precision), strength=float(s.network_strength))
        if wants_card:
            card = measure_saved(ctx, network, probe, state, isolate() if isolate else None)
            extra.update(card.metadata())
            extra["traintrain_report_probe"] = probe.to_json()
            if not card.learned:
                ctx.note(card.verdict)
        if card is not None and card.failed:
            status, final = "failed", None
            ctx.events.warning(f"not saved: {card.verdict}")
        else:
            final = save_network(ctx, s, network, ctx.out.path(suffix), steps=result.steps, extra=extra, state=state)
            saved.append((final, sidecar))
    return ModeOutcome(status, final, result.steps, result.final_loss, saved,
                       None if card is None else card.to_dict(), list(ctx.notes))


def _card_for_stop(ctx: RunContext, s, network, path: Path, steps: int, extra: dict[str, Any], probe: Probe,
                   isolate: Callable[[], Any] | None):
    """The card of a Stop-and-Save file: measured on the weights as saved, its metadata written into
    that file (rewritten in place, atomically: the same tensors, the card's keys added)."""
    from trainer.network import save_lora

    state = network.kohya_state_dict(dtype=save_dtype(s.save_precision), strength=float(s.network_strength))
    card = measure_saved(ctx, network, probe, state, isolate() if isolate else None)
    if not card.learned:
        ctx.note(card.verdict)
    if ctx.is_main and not card.failed:  # a non-finite state was never written (save_lora refuses it)
        full = {**extra, **card.metadata(), "traintrain_report_probe": probe.to_json()}
        save_lora(path, state, make_metadata(ctx, s, network, suffix=path.stem[len(ctx.out.name):], steps=steps,
                                             extra=full))
    return card


# -- data ----------------------------------------------------------------------------------------


class CaptionConds:
    """Text encodings of every distinct caption, computed once when the text encoder is frozen.

    All captions go through one ``encode_prompts`` call so long (chunked) captions share one padded
    token length and a batch is a plain index into the stacked tensors.
    """

    def __init__(self, bundle, captions: list[str]) -> None:
        unique = list(dict.fromkeys(captions))
        self.index = {caption: i for i, caption in enumerate(unique)}
        with torch.no_grad():
            self.conds = bundle.encode_prompts(unique)

    def lookup(self, captions: list[str]):
        idx = torch.tensor([self.index[c] for c in captions], device=self.conds.context.device)
        return self.conds.select(idx)


class CaptionEncoder:
    """The conditioning of a dataset batch: captions through the caption controls, then encoded.

    Chooses once how: every step through the text encoder when its adapters train or when shuffling /
    tag dropout make captions take new forms; otherwise from :class:`CaptionConds` computed up front
    (with the empty caption added when ``caption_dropout_rate`` can draw it).

    Args:
        bundle: the model.
        captions: every caption of the dataset.
        augment: the run's :class:`~trainer.data.CaptionAugment`.
        train_te: text-encoder adapters train (encode with gradients every step).
    """

    def __init__(self, bundle, captions: list[str], augment, *, train_te: bool) -> None:
        self.bundle, self.augment, self.train_te = bundle, augment, train_te
        self.per_step = train_te or augment.varies
        self.cached = None if self.per_step else CaptionConds(bundle, captions + ([""] if augment.active else []))

    def __call__(self, captions: list[str], step: int):
        captions = [self.augment(c, step, slot) for slot, c in enumerate(captions)]
        if self.cached is not None:
            return self.cached.lookup(captions)
        if self.train_te:
            return self.bundle.encode_prompts(captions)
        with torch.no_grad():
            return self.bundle.encode_prompts(captions)


def encode_dataset_images(ctx: RunContext, plan, *, pairs: bool = False):
    """Encode a data plan's images once, in batches, with a seeded latent sample; the latents stay on the CPU."""
    from trainer.data import encode_pairs, encode_samples

    bundle, gen = ctx.bundle, ctx.generator(7)
    total = len(plan.pairs if pairs else plan.samples)
    ctx.events.info(f"Encoding {total} {'pairs' if pairs else 'images'}…")

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return bundle.encode_images(pixels.to(bundle.device), generator=gen)

    encoder = encode_pairs if pairs else encode_samples
    cache_dir = None
    if getattr(ctx.settings, "image_cache_latents_to_disk", False):
        cache_dir = Path(ctx.settings.lora_data_directory) / ".traintrain_cache"
    started = time.perf_counter()
    # the VAE's dtype is part of the key: latents cached by a bf16 VAE are not what an fp32 run asks for
    cache_key = f"{bundle.name}|{ctx.settings.vae}|{getattr(bundle, 'vae_dtype', '')}"
    cached = encoder(plan, encode, batch_size=8, cache_dir=cache_dir, cache_key=cache_key)
    seconds = time.perf_counter() - started
    ctx.events.info(f"Encoded {total} in {seconds:.1f} s ({total / max(seconds, 1e-9):.1f}/s)")
    # the latents stay on the CPU (data/cache.py's contract): each step's gather moves its own batch only,
    # so a big SDXL folder does not fill the device's memory
    for warning in plan.warnings:
        ctx.note(warning)
    if ctx.settings.logging_verbose:
        for line in describe_plan(plan, pairs=pairs):
            ctx.events.info(line)
    return cached


def describe_plan(plan, *, pairs: bool = False) -> list[str]:
    """``logging_verbose`` lines: how many files, caption files and samples per bucket the dataset has."""
    from trainer.data.scan import CAPTION_EXTENSIONS

    items = [p.orig for p in plan.pairs] if pairs else [x for x in plan.samples if not x.is_reg]
    files = sorted({str(x.path) for x in items})
    captioned = sum(1 for f in files if any(Path(f).with_suffix(ext).is_file() for ext in CAPTION_EXTENSIONS))
    lines = [f"Dataset: {len(files)} {'pairs' if pairs else 'image files'}, {captioned} with a caption file "
             f"({'/'.join(CAPTION_EXTENSIONS)}), {len(files) - captioned} without; {len(items)} samples"]
    if not pairs:
        reg = {str(x.path) for x in plan.samples if x.is_reg}
        if reg:
            lines.append(f"Regularization: {len(reg)} image files")
    counts = plan.bucket_counts() if hasattr(plan, "bucket_counts") else {}
    used = [f"{b[0]}x{b[1]}: {n}" for b, n in counts.items() if n]
    if used:
        lines.append("Buckets (width x height: samples): " + ", ".join(used))
    return lines
