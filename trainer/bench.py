"""Benchmark: ``python -m trainer bench --model NAME --mode MODE --json OUT``.

``--suite gpu`` runs the issue-20 goal suite instead (``trainer/bench_suite.py``; kohya's side is
``scripts/kohya_bench.py``, both together ``scripts/gpu_suite.sh``).

Measures one real job (time to first step and where it went, steps/s, images/s, latent-caching
images/s, peak memory) and the **overhead ratio**: our median step time divided by the median step
time of a minimal loop (forward, MSE, backward, AdamW step) over the same U-Net, adapters and batch
shape. The minimal loop also runs the no-grad reference forward that iLECO and the ADDifT modes need by
definition, and for Difference's second pass it keeps a frozen copier attached, so the ratio measures
our plumbing, not the algorithm.

Timings on a shared CPU drift by far more than the overhead we look for, so the job and the minimal
loop are **interleaved in one process** (job, minimal, job, minimal, …; the model stays cached) and
the medians are taken over every round. The first job run is the cold one: its time to first step
includes building or loading the model.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REFERENCE_FORWARDS = {"LoRA": 0, "iLECO": 1, "Difference": 0, "ADDifT": 1, "Multi-ADDifT": 1}
TE_TRAINING_MODES = ("LoRA", "iLECO")  # the modes that run the text encoder every step when BASE is selected
WARMUP_STEPS = 2  # steps dropped from the start of every pass (allocator and autograd warm-up)

# -- glibc allocator ----------------------------------------------------------------------------------

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc refuses more than HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int
_malloc_state = {"tuned": False}


def tune_malloc() -> bool:
    """Stop glibc from handing freed tensor memory back to the OS after every step (platform.md §9).

    A training step frees and re-allocates the same large activation buffers; with glibc's defaults
    each big block is an ``mmap`` that the kernel zero-fills again on the next step. Raising the mmap
    and trim thresholds keeps them in the heap. Linux/glibc only (a no-op elsewhere, e.g. musl, macOS,
    Windows). Opt-in with ``TRAINTRAIN_MALLOC_TUNE=1``: measured on this project's CPU machine it gave
    no gain (docs/benchmarks.md), so neither the bench nor the train command tunes by default.

    Returns:
        True when both thresholds were set.
    """
    if _malloc_state["tuned"]:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("TRAINTRAIN_MALLOC_TUNE", "0") != "1":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has no such symbol
    except (OSError, AttributeError):
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _malloc_state["tuned"] = ok
    return ok


# -- inputs -------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small-sd1", help="built-in name, checkpoint file or diffusers folder")
    p.add_argument("--mode", default="LoRA", choices=list(REFERENCE_FORWARDS))
    p.add_argument("--steps", type=int, default=10, help="train_iterations of each job run")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--images", type=int, default=8, help="dataset size for LoRA / Multi-ADDifT")
    p.add_argument("--precision", default="fp32", help="train_model_precision")
    p.add_argument("--rounds", type=int, default=2, help="job / minimal-loop rounds after the cold run")
    p.add_argument("--checkpointing", action="store_true", help="use_gradient_checkpointing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra settings")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default); 1 makes CPU timings robust on a shared machine")
    p.add_argument("--previews", type=int, default=2,
                   help="preview images to time after a warm-up one (0: skip the preview figure)")
    p.add_argument("--preview-steps", type=int, default=20, help="sampling steps of each timed preview")
    p.add_argument("--device")
    p.add_argument("--json", help="write the figures here")
    from trainer.bench_suite import add_arguments

    add_arguments(p)
    return p


def _square_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """Square pictures with captions: one bucket, so every step has the minimal loop's shape."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
        path = folder / f"img{i:03d}.png"
        Image.fromarray(pixels).save(path)
        path.with_suffix(".txt").write_text(f"a picture, number {i}", encoding="utf-8")
        paths.append(path)
    return paths


def _make_inputs(mode: str, folder: Path, resolution: int, images: int) -> dict[str, str]:
    from PIL import Image

    if mode == "LoRA":
        _square_images(folder / "data", images, resolution)
        return {"lora_data_directory": str(folder / "data")}
    if mode == "Multi-ADDifT":
        data = folder / "pairs"
        for path in _square_images(data, images, resolution):
            Image.open(path).rotate(90).save(path.with_name(path.stem + "_after.png"))
        return {"lora_data_directory": str(data), "diff_target_name": "_after"}
    if mode == "iLECO":
        return {"original prompt": "a photo of a cat", "target prompt": "a photo of a dog"}
    orig, targ = _square_images(folder / "pair", 2, resolution)
    return {"original image": str(orig), "target image": str(targ), "original prompt": "a picture"}


def _settings(args: argparse.Namespace, folder: Path):
    from trainer.settings import Settings, parse_set_args

    size = args.resolution
    layer = {
        "mode": args.mode, "model": args.model, "save_lora_name": f"bench_{args.mode}", "save_overwrite": True,
        "image_size(height, width)": str(size), "image_buckets_step": max(size // 4, 8),
        "image_min_length": max(size // 2, 8), "train_iterations": args.steps, "train_batch_size": args.batch,
        "network_rank": args.rank, "network_alpha": args.rank, "train_seed": 0, "train_model_precision": args.precision,
        "logging_save_csv": False, "effect_check": True, "train_lr_scheduler": "constant",
        "use_gradient_checkpointing": bool(args.checkpointing), "train_optimizer": "AdamW",
        **_make_inputs(args.mode, folder, size, args.images),
    }
    return Settings.from_layers(layer, parse_set_args(args.set))


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (0 where ``resource`` is missing, i.e. Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0.0
    scale = 1 / 1024 if platform.system() != "Darwin" else 1 / 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the minimal loop --------------------------------------------------------------------------------


def minimal_loop(bundle, settings, *, steps: int, reference_forwards: int, stacked: bool = False,
                 train_te: bool = False) -> tuple[list[float], list[float]]:
    """Forward, MSE, backward, AdamW over the same U-Net, adapter set and batch shape.

    Args:
        reference_forwards: extra no-grad forwards with the adapters at 0 (iLECO, ADDifT).
        stacked: keep a second, frozen network attached at multiplier 1 (Difference's pass 2).
        train_te: encode the prompts every step with gradients (LoRA and iLECO with BASE selected).

    Returns:
        (wall seconds, process CPU seconds) per step, warm-up steps dropped.
    """
    from trainer.network import NetworkSpec, build_network

    torch.manual_seed(0)
    spec = NetworkSpec.from_settings(settings)
    networks = [build_network(bundle, spec, device=bundle.device) for _ in range(2 if stacked else 1)]
    for network in networks:
        network.attach()
    network = networks[-1]
    try:
        for frozen in networks[:-1]:
            frozen.requires_grad_(False)
        params = [p for p in network.parameters() if p.requires_grad]
        # the kernel the trainer's AdamW uses (fused on CUDA, trainer/optim.py), so the ratio stays plumbing only
        opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if bundle.device.type == "cuda" else {}))
        h, w = settings.image_size
        f = bundle.vae_scale_factor
        batch = int(settings.train_batch_size)
        x = torch.randn(batch, getattr(bundle, "latent_channels", 4), h // f, w // f, device=bundle.device)
        with torch.no_grad():
            cond = bundle.encode_prompts([""] * batch)
        t = torch.randint(0, 1000, (batch,), device=bundle.device)
        bundle.set_gradient_checkpointing(bool(settings.use_gradient_checkpointing))
        wall, cpu = [], []
        for _ in range(steps + WARMUP_STEPS):
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(reference_forwards):
                with torch.no_grad(), network.scaled(0.0):
                    bundle.predict(x, t, cond)
            if train_te:
                cond = bundle.encode_prompts(["a picture"] * batch)
            loss = torch.nn.functional.mse_loss(bundle.predict(x, t, cond).float(), x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            _sync(bundle.device)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        return wall[WARMUP_STEPS:], cpu[WARMUP_STEPS:]
    finally:
        bundle.set_gradient_checkpointing(False)
        for network in reversed(networks):
            network.detach()


def preview_seconds(bundle, settings, *, count: int, steps: int) -> list[float]:
    """Seconds per preview image at the run's size, as the preview hook renders them (our loop, CFG 7,
    LoRA attached at weight 1, isolated like in training); one warm-up image is not counted."""
    from trainer.modes.common import resolve_precision
    from trainer.network import NetworkSpec, build_network
    from trainer.sampling.hook import isolated
    from trainer.sampling.prompts import SamplePrompt
    from trainer.sampling.render import OwnLoopRenderer

    h, w = settings.image_size
    precision = resolve_precision(settings.train_model_precision, "fp32", bundle.device)
    network = build_network(bundle, NetworkSpec.from_settings(settings), device=bundle.device)
    network.attach()
    renderer = OwnLoopRenderer(bundle, precision.autocast)
    seconds = []
    try:
        for i in range(count + 1):
            prompt = SamplePrompt("a picture of a cat", width=int(w), height=int(h), steps=steps, seed=i)
            start = time.perf_counter()
            with isolated([network, bundle.unet], bundle.device):
                renderer(prompt, str(settings.sample_sampler))
            _sync(bundle.device)
            seconds.append(time.perf_counter() - start)
    finally:
        network.detach()
    return seconds[1:]


# -- one job run ------------------------------------------------------------------------------------


@dataclass
class JobTiming:
    """What one ``run_job`` call looked like from the event stream."""

    started: float
    result: dict[str, Any] = field(default_factory=dict)
    steps: list[tuple[int, float, float]] = field(default_factory=list)  # (pass, wall, cpu) at each step end
    marks: dict[str, float] = field(default_factory=dict)  # first time each milestone was seen
    messages: list[str] = field(default_factory=list)

    def step_times(self, pass_index: int) -> tuple[list[float], list[float]]:
        """Per-step (wall, cpu) seconds of one pass, warm-up steps dropped."""
        rows = [(w, c) for p, w, c in self.steps if p == pass_index]
        wall = [b[0] - a[0] for a, b in zip(rows, rows[1:], strict=False)]
        cpu = [b[1] - a[1] for a, b in zip(rows, rows[1:], strict=False)]
        # the first interval already excludes step 1; drop one more warm-up step
        return wall[WARMUP_STEPS - 1:], cpu[WARMUP_STEPS - 1:]


def run_once(settings, host, device: torch.device, on_pass_start: Callable[[], None] | None = None) -> JobTiming:
    """Run the job through the real runner and timestamp its events.

    Args:
        on_pass_start: called when a pass starts (after caching), e.g. to reset CUDA peak-memory stats.
    """
    from trainer.progress import CallbackSink, Events, Message, ProgressEvent, RunSummary
    from trainer.runner import run_job

    timing = JobTiming(time.perf_counter())

    def record(event) -> None:
        now = time.perf_counter()
        if isinstance(event, ProgressEvent):
            _sync(device)
            now = time.perf_counter()
            timing.steps.append((event.pass_index, now, time.process_time()))
            timing.marks.setdefault("first_step", now)
        elif isinstance(event, RunSummary):
            timing.marks.setdefault("pass_start", now)
            if on_pass_start is not None:
                on_pass_start()
        elif isinstance(event, Message):
            timing.messages.append(event.text)
            if event.text.startswith("Encoding "):
                timing.marks.setdefault("encode_start", now)
            elif event.text.startswith("Encoded "):
                timing.marks.setdefault("encode_end", now)
            else:
                timing.marks.setdefault("first_message", now)

    timing.result = run_job(settings, host, events=Events([CallbackSink(record)]))
    return timing


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ttfs_parts(timing: JobTiming, suffix: str = "") -> dict[str, float | None]:
    """Time to first step, split: acquire (imports, validation, model build/load), caching, setup, step 1.

    ``suffix`` tags the keys (``_warm`` for a job whose model is already loaded, as in the Web-UI or
    the second job of a queue)."""
    parts = _ttfs_split(timing)
    return {(f"{k[:-2]}{suffix}_s" if suffix else k): v for k, v in parts.items()}


def _ttfs_split(timing: JobTiming) -> dict[str, float | None]:
    m, t0 = timing.marks, timing.started
    if "first_step" not in m:
        return {"time_to_first_step_s": None}
    first = m["first_step"]
    pass_start = m.get("pass_start", first)
    parts: dict[str, float | None] = {"time_to_first_step_s": round(first - t0, 3)}
    if "encode_start" in m and "encode_end" in m:
        parts["ttfs_model_s"] = round(m["encode_start"] - t0, 3)
        parts["ttfs_caching_s"] = round(m["encode_end"] - m["encode_start"], 3)
        parts["ttfs_setup_s"] = round(pass_start - m["encode_end"], 3)
    else:  # no dataset: model acquisition runs up to the first message of the mode
        parts["ttfs_model_s"] = round(m.get("first_message", pass_start) - t0, 3)
        parts["ttfs_caching_s"] = 0.0
        parts["ttfs_setup_s"] = round(pass_start - m.get("first_message", pass_start), 3)
    parts["ttfs_first_step_s"] = round(first - pass_start, 3)
    return parts


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Cold job run, then ``rounds`` of (minimal loop, job run), then one more minimal loop.

    Returns:
        The figures (see docs/benchmarks.md for each key).
    """
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run_bench(args)
    finally:
        torch.set_num_threads(threads)


def _run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.hosts.standalone import StandaloneHost
    from trainer.vram import estimate_vram

    folder = Path(tempfile.mkdtemp(prefix="traintrain-bench-"))
    settings = _settings(args, folder)
    host = StandaloneHost(lora_dir=folder / "lora", device=args.device)
    device = host.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [run_once(settings, host, device)]
    cold = runs[0]
    rss_job = peak_rss_mb()
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    passes = [1, 2] if args.mode == "Difference" and not settings.diff_1st_pass_only else [1]
    refs = REFERENCE_FORWARDS[args.mode]
    train_te = args.mode in TE_TRAINING_MODES and "BASE" in tuple(settings.network_blocks)
    minimal: dict[int, list[tuple[list[float], list[float]]]] = {p: [] for p in passes}  # per round
    with host.acquire(settings.model, "", precision=settings.train_model_precision, v_pred=None) as bundle:
        params = sum(p.numel() for p in bundle.unet.parameters())
        vram = estimate_vram(settings, bundle)
    for round_index in range(args.rounds + 1):
        with host.acquire(settings.model, "", precision=settings.train_model_precision, v_pred=None) as bundle:
            for p in passes:
                wall, cpu = minimal_loop(bundle, settings, steps=max(args.steps - WARMUP_STEPS, 3),
                                         reference_forwards=refs, stacked=p == 2, train_te=train_te)
                minimal[p].append((wall, cpu))
        if round_index < args.rounds:
            runs.append(run_once(settings, host, device))
    previews: list[float] = []
    if args.previews > 0:
        with host.acquire(settings.model, "", precision=settings.train_model_precision, v_pred=None) as bundle:
            previews = preview_seconds(bundle, settings, count=args.previews, steps=args.preview_steps)

    figures: dict[str, Any] = {
        "model": args.model, "mode": args.mode, "device": str(device), "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "steps": args.steps, "batch": args.batch,
        "resolution": args.resolution, "rank": args.rank, "precision": args.precision,
        "gradient_checkpointing": bool(args.checkpointing), "malloc_tuned": _malloc_state["tuned"],
        "rounds": args.rounds + 1, "unet_params": params, "text_encoder_trained": train_te, **_ttfs_parts(cold),
        "total_s": round(cold.result["seconds"], 3),
    }
    if len(runs) > 1:  # imports done and the model cached: what the Web-UI and a queue's next job see
        figures.update(_ttfs_parts(runs[1], "_warm"))
    for p in passes:
        ours_wall = [x for run in runs for x in run.step_times(p)[0]]
        ours_cpu = [x for run in runs for x in run.step_times(p)[1]]
        tag = "" if p == 1 else "_pass2"
        base_wall = [x for wall, _ in minimal[p] for x in wall]
        base_cpu = [x for _, cpu in minimal[p] for x in cpu]
        ours, base = _median(ours_wall), _median(base_wall)
        figures[f"step_s_median{tag}"] = round(ours, 4)
        figures[f"minimal_step_s_median{tag}"] = round(base, 4)
        figures[f"overhead_ratio{tag}"] = round(ours / base, 3)
        figures[f"step_cpu_s_median{tag}"] = round(_median(ours_cpu), 4)
        figures[f"minimal_step_cpu_s_median{tag}"] = round(_median(base_cpu), 4)
        figures[f"overhead_ratio_cpu{tag}"] = round(_median(ours_cpu) / _median(base_cpu), 3)
        # per round: each job run against the minimal loop right after it (same machine load)
        ratios = [_median(run.step_times(p)[0]) / _median(wall) for run, (wall, _) in zip(runs, minimal[p], strict=False)]
        figures[f"overhead_ratio_spread{tag}"] = [round(min(ratios), 3), round(max(ratios), 3)]
    ours = figures["step_s_median"]
    encode_rate = next((float(m.split("(")[1].split("/s")[0]) for m in cold.messages if m.startswith("Encoded ")), None)
    figures.update({
        "steps_per_s": round(1 / ours, 3), "images_per_s": round(int(settings.train_batch_size) / ours, 3),
        "latent_cache_images_per_s": encode_rate,
        "peak_rss_mb": round(rss_job, 1),
        "cuda_max_allocated_mb": round(cuda_peak, 1) if cuda_peak is not None else None,
        "vram_estimate_gb": vram.total_gb, "vram_estimate_parts": vram.parts,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "preview_seconds_per_image": round(_median(previews), 3) if previews else None,
        "preview_steps": args.preview_steps if previews else None, "preview_sampler": str(settings.sample_sampler),
    })
    figures.update(_report_figures(runs, ours, args.mode))
    return figures


def _report_figures(runs: list[JobTiming], step_s: float, mode: str) -> dict[str, Any]:
    """The report card's seconds (median over the job runs) and its share of a default-length run of
    this shape: ``report_card_s / (step_s_median · the mode's default train_iterations)`` (budget: under 5%;
    the mode's own default: ADDifT runs 30 steps, not the table's 1000)."""
    from trainer.settings import mode_default

    seconds = [r.result["report"]["seconds"] for r in runs if r.result.get("report")]
    if not seconds:
        return {"report_card_s": None, "report_share_of_default_run": None}
    card = _median(seconds)
    default_steps = int(mode_default("train_iterations", mode))
    return {"report_card_s": round(card, 3), "report_default_steps": default_steps,
            "report_share_of_default_run": round(card / (step_s * default_steps), 4)}


def main(argv: list[str] | None = None) -> int:
    """CLI entry (``python -m trainer bench``)."""
    tune_malloc()
    args = _parser().parse_args(argv)
    if args.suite:
        from trainer.bench_suite import run_suite

        threads = torch.get_num_threads()
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        try:
            figures = run_suite(args)
        finally:
            torch.set_num_threads(threads)
    else:
        figures = run_bench(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        from trainer.paths import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return 0
