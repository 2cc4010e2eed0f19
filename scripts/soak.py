"""Soak run (not part of CI): many queued tiny jobs with random valid settings through one Worker.

Every job must finish or fail with a clear TrainTrainError (a failure that only says "details in the
console" is a bug), and the process RSS measured after each job must not grow: the least-squares slope
after the warm-up jobs must stay under ``--max-slope-mb`` (default 5 MB per job).

Usage::

    python scripts/soak.py --jobs 50 --seed 0 --out /tmp/soak --json /tmp/soak/report.json

Exit code 0 when every job ended cleanly and the slope is within bounds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ("tiny-sd1", "tiny-sd2v", "tiny-sdxl")
MODES = ("LoRA", "iLECO", "ADDifT", "Difference", "Multi-ADDifT")
NETWORK_TYPES = ("lierla", "c3lier", "loha", "lokr", "dora")
OPTIMIZERS = {  # name -> learning rate (adaptive ones pick their own step size from 1.0)
    "AdamW": "1e-3", "Adam": "1e-3", "Lion": "1e-4", "SGDNesterov": "1e-2", "AdaFactor": "1e-3",
    "Prodigy": "1.0", "DAdaptAdam": "1.0", "CAME": "1e-3", "Tiger": "1e-4", "AdamWScheduleFree": "1e-3",
}
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "reduce_on_plateau", "one_cycle", "exponential", "step", "cosine_annealing", "cyclic")


def rss_mb() -> float:
    """Resident set size of this process in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # Linux fallback
        with open("/proc/self/statm") as handle:
            import os

            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_inputs(out: Path) -> dict[str, str]:
    """A captioned dataset, an Original/Target pair and a folder of pairs."""
    from PIL import Image, ImageDraw

    from trainer.demo import make_sample_dataset

    data = make_sample_dataset(out / "data", count=4, size=64)
    pairs = out / "pairs"
    pairs.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        before = Image.new("RGB", (64, 64), (40 + 50 * i, 40, 60))
        after = before.copy()
        ImageDraw.Draw(after).ellipse((16, 16, 48, 48), fill=(240, 220, 40))
        before.save(pairs / f"p{i}.png")
        after.save(pairs / f"p{i}_after.png")
        (pairs / f"p{i}.txt").write_text(f"pair {i}", encoding="utf-8")
    return {"data": str(data), "pairs": str(pairs), "original": str(pairs / "p0.png"),
            "target": str(pairs / "p0_after.png")}


def random_settings(rng: random.Random, index: int, inputs: dict[str, str]) -> dict[str, Any]:
    """Valid random settings for one tiny job."""
    mode = rng.choice(MODES)
    optimizer = rng.choice(list(OPTIMIZERS))
    rank = rng.choice((2, 4, 8))
    s: dict[str, Any] = {
        "mode": mode, "model": rng.choice(MODELS), "save_lora_name": f"soak_{index:03d}_{mode}",
        "network_type": rng.choice(NETWORK_TYPES), "network_rank": rank, "network_alpha": rng.choice((1, rank / 2, rank)),
        "train_optimizer": optimizer, "train_learning_rate": OPTIMIZERS[optimizer],
        "train_lr_scheduler": rng.choice(SCHEDULERS), "train_iterations": rng.randint(2, 6),
        "train_batch_size": rng.choice((1, 2)), "train_seed": rng.randrange(1000), "train_model_precision": "fp32",
        "save_precision": rng.choice(("fp32", "fp16", "bf16")), "save_overwrite": True,
        "image_size(height, width)": "64", "image_buckets_step": 32, "image_min_length": 32,
        "effect_check": rng.random() < 0.3, "logging_save_csv": rng.random() < 0.5,
        "save_per_steps": rng.choice((0, 0, 2)), "train_lr_warmup_steps": rng.choice((0, 1)),
    }
    if mode == "LoRA":
        s.update({"lora_data_directory": inputs["data"], "image_mirroring": rng.random() < 0.5,
                  "lora_trigger_word": rng.choice(("", "soak"))})
    elif mode == "iLECO":
        s.update({"original prompt": rng.choice(("red hair", "van gogh style", "a cat")),
                  "target prompt": rng.choice(("", "blue hair", "a dog"))})
    elif mode == "Multi-ADDifT":
        s.update({"lora_data_directory": inputs["pairs"], "diff_target_name": "_after", "original prompt": "a photo"})
    else:  # ADDifT, Difference
        s.update({"original image": inputs["original"], "target image": inputs["target"], "original prompt": "a photo"})
    return s


def slope(ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against 0, 1, 2, …"""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/traintrain_soak"))
    p.add_argument("--warmup", type=int, default=None, help="jobs left out of the slope (default: max(3, jobs//5))")
    p.add_argument("--max-slope-mb", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)

    from trainer.hosts.standalone import StandaloneHost
    from trainer.jobs import DONE, FAILED, STOPPED, Worker
    from trainer.runner import run_job
    from trainer.settings import Settings

    args.out.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(args.out)
    rng = random.Random(args.seed)
    samples: list[dict[str, Any]] = []

    def measured(settings, host, **kw):
        started = time.perf_counter()
        try:
            return run_job(settings, host, **kw)
        finally:
            gc.collect()
            samples.append({"name": settings.save_lora_name, "model": settings.model,
                            "network": f"{settings.network_type}/{settings.network_rank}",
                            "optimizer": settings.train_optimizer, "scheduler": settings.train_lr_scheduler,
                            "rss_mb": round(rss_mb(), 1),
                            "seconds": round(time.perf_counter() - started, 2)})

    host = StandaloneHost(lora_dir=args.out / "lora", device=args.device)
    worker = Worker(host, args.out / f"state_{int(time.time())}", logs_root=args.out / "logs", runner=measured)
    for i in range(args.jobs):
        worker.submit(Settings.from_layers(random_settings(rng, i, inputs)), start=False)
    began = time.perf_counter()
    worker.run_queue()
    worker.wait_idle(timeout=24 * 3600)
    total = time.perf_counter() - began

    records = worker.records()
    by_status: dict[str, int] = {}
    for r in records:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    unclear = [f"{r.name}: {r.message}" for r in records
               if r.status == FAILED and ("details in the console" in r.message or "\n" in r.message)]
    failures = [f"{r.name}: {r.message}" for r in records if r.status == FAILED]
    unfinished = [r.name for r in records if r.status not in (DONE, FAILED, STOPPED)]
    warmup = args.warmup if args.warmup is not None else max(3, args.jobs // 5)
    rss = [s["rss_mb"] for s in samples]
    growth = slope(rss[warmup:])
    report = {
        "jobs": args.jobs, "seed": args.seed, "seconds": round(total, 1), "status": by_status,
        "rss_first_mb": rss[0] if rss else None, "rss_after_warmup_mb": rss[warmup] if len(rss) > warmup else None,
        "rss_last_mb": rss[-1] if rss else None, "rss_max_mb": max(rss) if rss else None,
        "slope_mb_per_job": round(growth, 3), "warmup": warmup, "unclear_failures": unclear,
        "failures": failures, "unfinished": unfinished, "samples": samples,
    }
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    print(f"{args.jobs} jobs in {total:.0f} s: {by_status}")
    print(f"RSS {report['rss_first_mb']} -> {report['rss_last_mb']} MiB (max {report['rss_max_mb']}), "
          f"slope after {warmup} warm-up jobs: {growth:+.2f} MiB/job (limit {args.max_slope_mb})")
    for line in failures:
        print("  failed:", line)
    ok = not unclear and not unfinished and growth <= args.max_slope_mb
    print("SOAK OK" if ok else "SOAK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
