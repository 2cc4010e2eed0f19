"""Benchmark: ``python -m trainer bench --model NAME --mode MODE --json OUT``.

Measures one real job (time to first step, steps/s, images/s, latent-caching images/s, peak memory)
and the **overhead ratio**: our median step time divided by the median step time of a minimal loop
(forward, loss, backward, optimizer step) over the same U-Net, adapters and batch shape. The minimal
loop also runs the no-grad reference forward that iLECO and ADDifT need by definition, so the ratio
measures our plumbing, not the algorithm. The minimal loop runs before and after the job and the
faster median is used (CPU timings drift by ±10 %).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REFERENCE_FORWARDS = {"LoRA": 0, "iLECO": 1, "Difference": 0, "ADDifT": 1, "Multi-ADDifT": 1}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small-sd1")
    p.add_argument("--mode", default="LoRA", choices=list(REFERENCE_FORWARDS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--images", type=int, default=8, help="dataset size for LoRA / Multi-ADDifT")
    p.add_argument("--precision", default="fp32", help="train_model_precision")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra settings")
    p.add_argument("--device")
    p.add_argument("--json", help="write the figures here")
    return p


def _make_inputs(mode: str, folder: Path, resolution: int, images: int) -> dict[str, str]:
    from PIL import Image

    from trainer.demo import make_sample_dataset

    if mode in ("LoRA",):
        make_sample_dataset(folder / "data", count=images, size=resolution)
        return {"lora_data_directory": str(folder / "data")}
    if mode == "Multi-ADDifT":
        data = folder / "pairs"
        make_sample_dataset(data, count=images, size=resolution)
        for path in sorted(data.glob("*.png")):
            Image.open(path).rotate(90).save(path.with_name(path.stem + "_after.png"))
        return {"lora_data_directory": str(data), "diff_target_name": "_after"}
    if mode == "iLECO":
        return {"original prompt": "a photo of a cat", "target prompt": "a photo of a dog"}
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(2, resolution, resolution, 3, generator=gen) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels[0]).save(folder / "orig.png")
    Image.fromarray(pixels[1]).save(folder / "targ.png")
    return {"original image": str(folder / "orig.png"), "target image": str(folder / "targ.png")}


def _settings(args: argparse.Namespace, folder: Path):
    from trainer.settings import Settings, parse_set_args

    size = args.resolution
    layer = {
        "mode": args.mode, "model": args.model, "save_lora_name": f"bench_{args.mode}", "save_overwrite": True,
        "image_size(height, width)": str(size), "image_buckets_step": max(size // 4, 8), "image_min_length": max(size // 2, 8),
        "train_iterations": args.steps, "train_batch_size": args.batch, "network_rank": args.rank,
        "network_alpha": args.rank, "train_seed": 0, "train_model_precision": args.precision,
        "logging_save_csv": False, "effect_check": False, "train_lr_scheduler": "constant",
        **_make_inputs(args.mode, folder, size, args.images),
    }
    return Settings.from_layers(layer, parse_set_args(args.set))


def _peak_rss_mb() -> float:
    scale = 1 / 1024 if platform.system() != "Darwin" else 1 / 2**20  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def minimal_loop(bundle, settings, *, steps: int, reference_forwards: int) -> list[float]:
    """Forward, MSE, backward, AdamW over the same U-Net and adapter set; per-step seconds."""
    from trainer.network import NetworkSpec, build_network

    torch.manual_seed(0)
    network = build_network(bundle, NetworkSpec.from_settings(settings), device=bundle.device)
    network.attach()
    try:
        opt = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)
        h, w = settings.image_size
        f = bundle.vae_scale_factor
        batch = int(settings.train_batch_size)
        x = torch.randn(batch, getattr(bundle, "latent_channels", 4), h // f, w // f, device=bundle.device)
        with torch.no_grad():
            cond = bundle.encode_prompts([""] * batch)
        t = torch.randint(0, 1000, (batch,), device=bundle.device)
        times = []
        for _ in range(steps + 2):
            start = time.perf_counter()
            for _ in range(reference_forwards):
                with torch.no_grad(), network.scaled(0.0):
                    bundle.predict(x, t, cond)
            loss = torch.nn.functional.mse_loss(bundle.predict(x, t, cond).float(), x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            _sync(bundle.device)
            times.append(time.perf_counter() - start)
        return times[2:]
    finally:
        network.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.hosts.standalone import StandaloneHost
    from trainer.progress import CallbackSink, Events, Message, ProgressEvent
    from trainer.runner import run_job

    folder = Path(tempfile.mkdtemp(prefix="traintrain-bench-"))
    settings = _settings(args, folder)
    host = StandaloneHost(lora_dir=folder / "lora", device=args.device)
    device = host.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps: list[float] = []
    messages: list[str] = []

    def record(event) -> None:
        if isinstance(event, ProgressEvent):
            _sync(device)
            stamps.append(time.perf_counter())
        elif isinstance(event, Message):
            messages.append(event.text)

    started = time.perf_counter()
    result = run_job(settings, host, events=Events([CallbackSink(record)]))
    with host.acquire(settings.model, "", precision=settings.train_model_precision, v_pred=None) as bundle:
        refs = REFERENCE_FORWARDS[args.mode]
        before = minimal_loop(bundle, settings, steps=min(args.steps, 10), reference_forwards=refs)
        after = minimal_loop(bundle, settings, steps=min(args.steps, 10), reference_forwards=refs)
        params = sum(p.numel() for p in bundle.unet.parameters())
    ours = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][2:] or [float("nan")]
    ours_median = statistics.median(ours)
    minimal = min(statistics.median(before), statistics.median(after))
    images_per_step = int(settings.train_batch_size)
    encode_rate = next((float(m.split("(")[1].split("/s")[0]) for m in messages if m.startswith("Encoded ")), None)
    figures = {
        "model": args.model, "mode": args.mode, "device": str(device), "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "steps": args.steps, "batch": args.batch, "resolution": args.resolution,
        "rank": args.rank, "precision": args.precision, "unet_params": params,
        "time_to_first_step_s": round(stamps[0] - started, 3) if stamps else None,
        "total_s": round(result["seconds"], 3),
        "step_s_median": round(ours_median, 4), "steps_per_s": round(1 / ours_median, 3),
        "images_per_s": round(images_per_step / ours_median, 3),
        "latent_cache_images_per_s": encode_rate,
        "minimal_step_s_median": round(minimal, 4),
        "overhead_ratio": round(ours_median / minimal, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "cuda_max_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
    }
    return figures


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    figures = run_bench(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        from trainer.paths import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return 0
