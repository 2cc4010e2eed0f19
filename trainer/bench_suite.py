"""The GPU suite: ``python -m trainer bench --suite gpu --json OUT.json``.

One process measures the issue-20 goals on random weights of the real sizes (``sd15-random``,
``sdxl-random``; ``--size tiny`` swaps in the tiny built-ins so the same code runs on a CPU in about a
minute):

* ``sd15``: LoRA, U-Net modules only (kohya's ``networks.lora`` set with ``--network_train_unet_only``),
  batch 2, rank 16, AdamW, bf16 — steady steps/s of a job on the loaded model, and the time from Start
  to the first step on that loaded model (latent caching reported apart);
* ``sdxl``: the same at batch 1 — steps/s without gradient checkpointing (kohya's best-speed setup) and
  the peak CUDA memory of a run with gradient checkpointing (training part and whole job);
* ``ileco``: iLECO, 500 steps, end-to-end seconds of the job after the model is loaded.

kohya sd-scripts' side is run by ``scripts/kohya_bench.py`` on the same data folder (``--data``), and
``scripts/gpu_suite.sh`` merges both JSONs with the speed-up ratios (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trainer import bench
from trainer.network.spec import BLOCK_IDS

CASES = ("sd15", "sdxl", "ileco")
UNET_BLOCKS = tuple(b for b in BLOCK_IDS if b != "BASE")  # U-Net only: kohya's --network_train_unet_only

# per size: model names, resolutions and step counts; the full sizes are the goals
SIZES: dict[str, dict[str, Any]] = {
    "full": {"sd15_model": "sd15-random", "sdxl_model": "sdxl-random", "sd15_res": 512, "sdxl_res": 1024,
             "steps": 40, "sdxl_steps": 24, "ileco_steps": 500, "ileco_res": 512, "images": 8},
    "tiny": {"sd15_model": "tiny-sd1", "sdxl_model": "tiny-sdxl", "sd15_res": 64, "sdxl_res": 64,
             "steps": 8, "sdxl_steps": 6, "ileco_steps": 20, "ileco_res": 64, "images": 4},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The suite's own options (``python -m trainer bench --suite gpu …``)."""
    g = p.add_argument_group("suite (--suite gpu)")
    g.add_argument("--suite", choices=["gpu"], help="run the GPU goal suite instead of one bench")
    g.add_argument("--size", choices=list(SIZES), default="full",
                   help="full: real-size random SD1.5/SDXL (a GPU); tiny: the tiny built-ins (CPU check of the script)")
    g.add_argument("--tiny", dest="size", action="store_const", const="tiny", help="same as --size tiny")
    g.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    g.add_argument("--data", help="image folder (kohya layout N_name/ allowed) shared with kohya's side; "
                                  "default: square random images written to a temp folder")
    g.add_argument("--sd15-model", help="override the SD1.5 model (built-in name or checkpoint)")
    g.add_argument("--sdxl-model", help="override the SDXL model (built-in name or checkpoint)")
    g.add_argument("--sd15-resolution", type=int)
    g.add_argument("--sdxl-resolution", type=int)
    g.add_argument("--suite-steps", type=int, help="steps of each timed SD1.5 run (SDXL: 60 %% of it)")
    g.add_argument("--ileco-steps", type=int)
    g.add_argument("--suite-precision", default="bf16", help="train_model_precision of every case")


def write_dataset(folder: Path, count: int, size: int) -> Path:
    """Square random images with captions in kohya's ``1_name`` layout (read by both trainers)."""
    bench._square_images(folder / "1_bench", count, size)
    return folder


def _settings(mode: str, model: str, res: int, *, steps: int, batch: int, precision: str, data: Path | None,
              checkpointing: bool = False, extra: dict[str, Any] | None = None):
    from trainer.settings import Settings

    layer: dict[str, Any] = {
        "mode": mode, "model": model, "save_lora_name": f"suite_{mode}", "save_overwrite": True,
        "image_size(height, width)": str(res), "image_buckets_step": 64 if res >= 256 else 8,
        "image_min_length": min(256, res), "train_iterations": steps, "train_batch_size": batch,
        "network_rank": 16, "network_alpha": 16, "train_seed": 0, "train_model_precision": precision,
        "train_lora_precision": "fp32", "logging_save_csv": False, "effect_check": False,
        "train_lr_scheduler": "constant", "train_optimizer": "AdamW", "train_learning_rate": 1e-4,
        "use_gradient_checkpointing": checkpointing, "network_blocks(BASE = TextEncoder)": list(UNET_BLOCKS),
    }
    if mode == "LoRA":
        layer["lora_data_directory"] = str(data)
    else:
        layer.update({"original prompt": "a photo of a cat", "target prompt": "a photo of a dog"})
    layer.update(extra or {})
    return Settings.from_layers(layer)


def _cuda_mb(device: torch.device, what: str) -> float | None:
    if device.type != "cuda":
        return None
    value = torch.cuda.max_memory_allocated(device) if what == "allocated" else torch.cuda.max_memory_reserved(device)
    return round(value / 2**20, 1)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def steady_rate(timing: bench.JobTiming, pass_index: int = 1) -> dict[str, float | None]:
    """Steps/s over the steps after warm-up: (n - 1) intervals / their total span (a throughput, not a
    median; kohya's side is measured the same way, from step-end timestamps)."""
    ends = [w for p, w, _ in timing.steps if p == pass_index][bench.WARMUP_STEPS:]
    if len(ends) < 2:
        return {"steps_per_s": None, "step_s_median": None}
    wall = timing.step_times(pass_index)[0]
    return {"steps_per_s": round((len(ends) - 1) / (ends[-1] - ends[0]), 3),
            "step_s_median": round(bench._median(wall), 4)}


def _job(settings, host, device: torch.device, *, training_peak: bool = False) -> tuple[bench.JobTiming, dict]:
    """One job through the real runner; with ``training_peak`` the CUDA peak is reset when the pass starts
    (after latent caching and VAE offload), so ``cuda_peak_training_mb`` is the training loop's."""
    _reset_peak(device)
    peaks: dict[str, Any] = {}
    if training_peak and device.type == "cuda":
        def at_pass_start() -> None:
            peaks.setdefault("cuda_peak_caching_mb", _cuda_mb(device, "allocated"))  # model + VAE encoding
            torch.cuda.reset_peak_memory_stats(device)

        timing = bench.run_once(settings, host, device, on_pass_start=at_pass_start)
        peaks["cuda_peak_training_mb"] = _cuda_mb(device, "allocated")
        peaks["cuda_reserved_training_mb"] = _cuda_mb(device, "reserved")
    else:
        timing = bench.run_once(settings, host, device)
        peaks["cuda_peak_job_mb"] = _cuda_mb(device, "allocated")
    if timing.result.get("status") != "done":
        raise RuntimeError(f"suite job {settings.mode} ended {timing.result.get('status')}: {timing.result.get('message')}")
    return timing, peaks


def adapter_count(result: dict[str, Any]) -> int | None:
    """Adapted modules in the saved LoRA (kohya logs its count as "create LoRA for U-Net: N modules")."""
    path = result.get("lora_path")
    if not path:
        return None
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return sum(1 for key in handle.keys() if key.endswith(".lora_down.weight"))


def _warmup(settings):
    """The same job, a few steps long: warms kernels, cuDNN autotuning and the allocator; not timed."""
    from trainer.settings import Settings

    return Settings.from_layers(settings.to_json_dict(), {"train_iterations": min(int(settings.train_iterations), 6)})


def _load(host, settings) -> float:
    """Load (or build) the model into the host's cache; returns seconds."""
    start = time.perf_counter()
    with host.acquire(settings.model, "", precision=settings.train_model_precision, v_pred=None):
        pass
    _sync(host.device)
    return round(time.perf_counter() - start, 3)


def _sync(device: torch.device) -> None:
    bench._sync(device)


def case_sd15(cfg: dict[str, Any], host, data: Path) -> dict[str, Any]:
    """SD1.5 LoRA speed and time to first step on the loaded model."""
    device = host.device
    s = _settings("LoRA", cfg["sd15_model"], cfg["sd15_res"], steps=cfg["steps"], batch=2,
                  precision=cfg["precision"], data=data)
    load_s = _load(host, s)
    _job(_warmup(s), host, device)  # warm-up job: allocator, kernels, autotuning; not timed
    timing, peaks = _job(s, host, device)
    parts = bench._ttfs_parts(timing, "_warm")
    out = {"model": s.model, "resolution": cfg["sd15_res"], "batch": 2, "rank": 16, "precision": cfg["precision"],
           "steps": cfg["steps"], "modules": "unet (lierla)", "adapters": adapter_count(timing.result),
           "model_load_s": load_s, **steady_rate(timing), **parts,
           **peaks}
    caching = parts.get("ttfs_caching_warm_s") or 0.0
    first = parts.get("time_to_first_step_warm_s")
    out["ttfs_loaded_minus_caching_s"] = round(first - caching, 3) if first is not None else None
    return out


def case_sdxl(cfg: dict[str, Any], host, data: Path) -> dict[str, Any]:
    """SDXL LoRA speed without checkpointing (kohya's fastest setup) and peak memory with it."""
    device = host.device
    steps = cfg["sdxl_steps"]
    fast = _settings("LoRA", cfg["sdxl_model"], cfg["sdxl_res"], steps=steps, batch=1, precision=cfg["precision"],
                     data=data)
    load_s = _load(host, fast)
    _job(_warmup(fast), host, device)
    timing, peaks = _job(fast, host, device, training_peak=True)
    out: dict[str, Any] = {"model": fast.model, "resolution": cfg["sdxl_res"], "batch": 1, "rank": 16,
                           "precision": cfg["precision"], "steps": steps, "modules": "unet (lierla)",
                           "adapters": adapter_count(timing.result),
                           "model_load_s": load_s, **steady_rate(timing),
                           **{f"{k}_no_checkpointing": v for k, v in peaks.items()}}
    gc_settings = _settings("LoRA", cfg["sdxl_model"], cfg["sdxl_res"], steps=max(steps // 2, 4), batch=1,
                            precision=cfg["precision"], data=data, checkpointing=True)
    gc_timing, gc_peaks = _job(gc_settings, host, device, training_peak=True)
    out.update({f"{k}_checkpointing": v for k, v in gc_peaks.items()})
    from trainer.vram import estimate_vram

    with host.acquire(gc_settings.model, "", precision=gc_settings.train_model_precision, v_pred=None) as bundle:
        out["vram_estimate_gb_checkpointing"] = estimate_vram(gc_settings, bundle).total_gb  # to set beside the peak
    out["steps_per_s_checkpointing"] = steady_rate(gc_timing)["steps_per_s"]
    return out


def case_ileco(cfg: dict[str, Any], host, data: Path) -> dict[str, Any]:
    """iLECO end to end after the model is loaded (validation, adapters, N steps, save)."""
    device = host.device
    s = _settings("iLECO", cfg["sd15_model"], cfg["ileco_res"], steps=cfg["ileco_steps"], batch=1,
                  precision=cfg["precision"], data=None)
    _load(host, s)
    _job(_warmup(s), host, device)  # kernels and allocator warm, as after any earlier job in the same session
    timing, peaks = _job(s, host, device)
    return {"model": s.model, "resolution": cfg["ileco_res"], "batch": 1, "steps": cfg["ileco_steps"],
            "precision": cfg["precision"], "seconds_after_load": timing.result["seconds"], **steady_rate(timing),
            **peaks}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected cases and return one JSON-able dict (``cases`` keyed by name)."""
    from trainer.hosts.standalone import StandaloneHost

    cfg = dict(SIZES[args.size])
    for key, value in (("sd15_model", args.sd15_model), ("sdxl_model", args.sdxl_model),
                       ("sd15_res", args.sd15_resolution), ("sdxl_res", args.sdxl_resolution),
                       ("steps", args.suite_steps), ("ileco_steps", args.ileco_steps)):
        if value:
            cfg[key] = value
    if args.suite_steps:
        cfg["sdxl_steps"] = max(int(args.suite_steps * 0.6), 6)
    cfg["precision"] = args.suite_precision
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        from trainer.errors import InputError

        raise InputError("--cases", f"unknown {unknown}; choose from {', '.join(CASES)}")
    folder = Path(tempfile.mkdtemp(prefix="traintrain-suite-"))
    # images at the largest resolution: both trainers scale down to each case's size, never up
    size = max(cfg["sd15_res"], cfg["sdxl_res"] if "sdxl" in cases else 0)
    data = Path(args.data) if args.data else write_dataset(folder / "data", cfg["images"], size)
    host = StandaloneHost(lora_dir=folder / "lora", device=args.device)
    started = time.perf_counter()
    figures: dict[str, Any] = {
        "suite": "gpu", "size": args.size, "device": str(host.device), "device_name": _device_name(host.device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
        "data": str(data), "cases": {},
    }
    runners = {"sd15": case_sd15, "sdxl": case_sdxl, "ileco": case_ileco}
    for name in cases:
        case_start = time.perf_counter()
        figures["cases"][name] = runners[name](cfg, host, data)
        figures["cases"][name]["case_wall_s"] = round(time.perf_counter() - case_start, 1)
    figures["suite_wall_s"] = round(time.perf_counter() - started, 1)
    figures["goals"] = goals(figures)
    return figures


def goals(figures: dict[str, Any], kohya: dict[str, Any] | None = None) -> dict[str, Any]:
    """The issue's targets checked against the figures (None where a figure is missing).

    Speed-ups need kohya's steps/s (``kohya["cases"][name]["steps_per_s"]``); they are added by the merge."""
    cases = figures.get("cases", {})
    out: dict[str, Any] = {}
    full = figures.get("size") == "full"  # tiny models prove the script, not the goals: no verdict for them

    def met(ok: bool) -> bool | None:
        return ok if full else None

    sd15, sdxl, ileco = cases.get("sd15", {}), cases.get("sdxl", {}), cases.get("ileco", {})
    if sdxl.get("cuda_peak_training_mb_checkpointing") is not None:
        gb = sdxl["cuda_peak_training_mb_checkpointing"] / 1024
        out["sdxl_peak_vram_gb_checkpointing"] = {"value": round(gb, 2), "goal": "< 10", "met": met(gb < 10)}
    if ileco.get("seconds_after_load") is not None:
        s = ileco["seconds_after_load"]
        out["ileco_500_seconds"] = {"value": s, "goal": "< 30", "met": met(s < 30 and ileco.get("steps") == 500)}
    if sd15.get("ttfs_loaded_minus_caching_s") is not None:
        s = sd15["ttfs_loaded_minus_caching_s"]
        out["ttfs_loaded_s_plus_caching"] = {"value": s, "caching_s": sd15.get("ttfs_caching_warm_s"), "goal": "< 2",
                                             "met": met(s < 2)}
    for name, target in (("sd15", 1.3), ("sdxl", 1.1)):
        ours = cases.get(name, {}).get("steps_per_s")
        theirs = ((kohya or {}).get("cases", {}).get(name) or {}).get("steps_per_s")
        counts = (cases.get(name, {}).get("adapters"), ((kohya or {}).get("cases", {}).get(name) or {}).get("adapters"))
        if None not in counts:  # a fair comparison trains the same modules on both sides
            out[f"{name}_same_modules"] = {"ours": counts[0], "kohya": counts[1], "met": met(counts[0] == counts[1])}
        if ours and theirs:
            ratio = ours / theirs
            out[f"{name}_speedup_vs_kohya"] = {"value": round(ratio, 3), "ours_steps_per_s": ours,
                                               "kohya_steps_per_s": theirs, "goal": f">= {target}",
                                               "met": met(ratio >= target)}
    return out
