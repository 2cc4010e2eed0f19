"""kohya sd-scripts' side of the GPU suite (issue 20), and the merge of both sides into one JSON.

    python scripts/kohya_bench.py prepare --work W [--cases sd15,sdxl] [--resolution 1024]
    python scripts/kohya_bench.py run --work W --case sd15 --steps 40 --resolution 512 --batch 2 --json W/kohya_sd15.json
    python scripts/kohya_bench.py merge --ours W/ours.json --kohya W/kohya_sd15.json W/kohya_sdxl.json --out OUT.json

``prepare`` runs in the project's environment: it writes the random real-size checkpoints kohya loads
(``sd15.safetensors``, ``sdxl.safetensors``: our ``sd15-random`` / ``sdxl-random`` in fp16, ldm layout), the
shared data folder (kohya layout ``1_bench/``) and the CLIP tokenizers kohya would otherwise download
(``--tokenizer_cache_dir``). ``run`` starts kohya's ``train_network.py`` / ``sdxl_train_network.py`` in a
child process whose ``PYTHONPATH`` puts kohya's pinned libraries first (``third_party/kohya_deps``, see
docs/benchmarks.md) and times every optimizer step with a global step hook (no extra device syncs: kohya
reads the loss with ``.item()`` every step, so step ends are paced by the device). kohya's code is never
part of this repository: it is checked out into the ignored ``third_party/sd-scripts``.

kohya's own U-Net is hard-coded to SD1.5/SDXL block sizes, so there is no tiny kohya run: on a CPU the
wrapper is checked with the real-size SD1.5 checkpoint at a small resolution and a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# kohya's checkout and its pinned libraries (both ignored by git); the device run points these at its carry
KOHYA = Path(os.environ.get("TRAINTRAIN_KOHYA_DIR", ROOT / "third_party" / "sd-scripts")).resolve()
KOHYA_DEPS = Path(os.environ.get("TRAINTRAIN_KOHYA_DEPS", ROOT / "third_party" / "kohya_deps")).resolve()
WARMUP_STEPS = 2  # the same warm-up the suite drops on our side
TOKENIZERS = {"openai_clip-vit-large-patch14": "<|endoftext|>", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k": "!"}
SCRIPTS = {"sd15": "train_network.py", "sdxl": "sdxl_train_network.py"}


# -- prepare (project environment) -------------------------------------------------------------------


def prepare(work: Path, cases: list[str], resolution: int, images: int) -> dict[str, str]:
    """Checkpoints, data and tokenizers for both trainers; existing files are kept (the build is slow)."""
    import shutil

    import torch

    sys.path.insert(0, str(ROOT))
    from trainer.bench_suite import write_dataset
    from trainer.models.checkpoint import save_single_file
    from trainer.models.tiny import build_builtin
    from trainer.models.tokenizer import BOS, EOS, MAX_LENGTH, _clip_files

    work.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    if not (work / "data" / "1_bench").is_dir():
        write_dataset(work / "data", images, resolution)
    made["data"] = str(work / "data")
    vocab, merges = _clip_files()
    for name, pad in TOKENIZERS.items():
        folder = work / "tokenizers" / name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vocab, folder / "vocab.json")
        shutil.copyfile(merges, folder / "merges.txt")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": BOS,
                  "eos_token": EOS, "unk_token": EOS, "pad_token": pad, "do_lower_case": True}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    made["tokenizers"] = str(work / "tokenizers")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for case, builtin in (("sd15", "sd15-random"), ("sdxl", "sdxl-random")):
        path = work / f"{case}.safetensors"
        if case in cases and not path.is_file():
            components = build_builtin(builtin, device=device, dtype=torch.float16)
            save_single_file(components, path)
            del components
            if device == "cuda":
                torch.cuda.empty_cache()
        if path.is_file():
            made[case] = str(path)
    return made


# -- run (kohya's environment, in a child process) ---------------------------------------------------


def kohya_args(case: str, work: Path, steps: int, resolution: int, batch: int, mixed_precision: str,
               workers: int) -> list[str]:
    """kohya's command line with its best speed flags for this case (no gradient checkpointing)."""
    args = [
        "--pretrained_model_name_or_path", str(work / f"{case}.safetensors"),
        "--train_data_dir", str(work / "data"), "--caption_extension", ".txt",
        "--resolution", f"{resolution},{resolution}", "--train_batch_size", str(batch),
        "--max_train_steps", str(steps), "--output_dir", str(work / "kohya_out"), "--output_name", f"kohya_{case}",
        "--save_model_as", "safetensors", "--save_precision", "fp16",
        "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
        "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
        "--lr_scheduler", "constant", "--seed", "0", "--mixed_precision", mixed_precision,
        "--sdpa", "--cache_latents", "--persistent_data_loader_workers",
        "--max_data_loader_n_workers", str(workers), "--tokenizer_cache_dir", str(work / "tokenizers"),
    ]
    if case == "sdxl":
        args.append("--cache_text_encoder_outputs")
    return args


def child_env() -> dict[str, str]:
    """kohya's pinned libraries first, then kohya itself; offline, as on the device machine."""
    env = dict(os.environ)
    # TRAINTRAIN_KOHYA_EXTRA_PATH: more folders for kohya only (a CPU-only machine's torchvision stand-in)
    extra = [env["TRAINTRAIN_KOHYA_EXTRA_PATH"]] if env.get("TRAINTRAIN_KOHYA_EXTRA_PATH") else []
    paths = [str(KOHYA_DEPS), *extra, str(KOHYA)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update({"PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "DIFFUSERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


def _child(script: str, out: str, argv: list[str]) -> int:
    """Inside kohya's environment: hook optimizer steps, run the training script as __main__."""
    import runpy

    import torch

    stamps: list[float] = []
    started = time.perf_counter()
    partial = Path(out + ".partial")

    def hook(optimizer, args, kwargs) -> None:  # noqa: ARG001 - torch's hook signature
        stamps.append(time.perf_counter() - started)
        with open(partial, "a", encoding="utf-8") as handle:  # survives a timeout: the steps done so far count
            handle.write(f"{stamps[-1]}\n")

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(hook)
    sys.argv = [script, *argv]
    os.chdir(KOHYA)
    error = None
    try:
        runpy.run_path(str(KOHYA / script), run_name="__main__")
    except SystemExit as exc:  # argparse or kohya ending early
        error = None if exc.code in (0, None) else f"exit {exc.code}"
    ended = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    Path(out).write_text(json.dumps({"stamps": stamps, "total_s": ended - started,
                                     "cuda_peak_mb": peak, "error": error}), encoding="utf-8")
    return 0 if error is None else 1


def steady(stamps: list[float], warmup: int = WARMUP_STEPS) -> dict[str, float | None]:
    """Steps/s over the steps after warm-up, the same arithmetic as the suite's ``steady_rate``."""
    ends = stamps[warmup:]
    if len(ends) < 2:
        return {"steps_per_s": None, "step_s_median": None}
    gaps = sorted(b - a for a, b in zip(ends, ends[1:], strict=False))
    return {"steps_per_s": round((len(ends) - 1) / (ends[-1] - ends[0]), 3),
            "step_s_median": round(gaps[len(gaps) // 2], 4)}


def run(case: str, work: Path, steps: int, resolution: int, batch: int, mixed_precision: str, workers: int,
        timeout: float, warmup: int = WARMUP_STEPS) -> dict:
    """Run kohya for one case and return its figures (``error`` set when it failed)."""
    if not (KOHYA / SCRIPTS[case]).is_file():
        return {"error": f"kohya sd-scripts not found at {KOHYA}; see docs/benchmarks.md (GPU suite)"}
    stamps_file = work / f"kohya_{case}_stamps.json"
    stamps_file.unlink(missing_ok=True)
    Path(str(stamps_file) + ".partial").unlink(missing_ok=True)
    log = work / f"kohya_{case}.log"
    argv = kohya_args(case, work, steps, resolution, batch, mixed_precision, workers)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", SCRIPTS[case], str(stamps_file), "--", *argv]
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        try:
            code = subprocess.run(cmd, env=child_env(), stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                                  check=False).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - start
    figures: dict = {"case": case, "script": SCRIPTS[case], "steps": steps, "resolution": resolution, "batch": batch,
                     "mixed_precision": mixed_precision, "flags": " ".join(a for a in argv if a.startswith("--")),
                     "log": str(log), "process_wall_s": round(wall, 1), "kohya_commit": _commit()}
    partial = Path(str(stamps_file) + ".partial")
    if not stamps_file.is_file() and partial.is_file():  # killed by the timeout: keep the steps it made
        done = [float(x) for x in partial.read_text(encoding="utf-8").split()]
        stamps_file.write_text(json.dumps({"stamps": done, "total_s": wall, "cuda_peak_mb": None,
                                           "error": f"timed out after {len(done)} steps"}), encoding="utf-8")
    if not stamps_file.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        figures["error"] = f"kohya ended ({code}) without timings: " + " | ".join(tail)
        return figures
    child = json.loads(stamps_file.read_text(encoding="utf-8"))
    text = log.read_text(encoding="utf-8", errors="replace")
    logged = re.search(r"create LoRA for U-Net: (\d+) modules", text)
    figures["adapters"] = int(logged.group(1)) if logged else None
    figures["tqdm_steps_per_s"] = tqdm_rate(text)
    stamps = child["stamps"]
    figures.update(steady(stamps, warmup))
    figures["warmup_steps"] = warmup
    figures.update({"steps_done": len(stamps), "first_step_s": round(stamps[0], 2) if stamps else None,
                    "cuda_peak_mb": round(child["cuda_peak_mb"], 1) if child["cuda_peak_mb"] else None,
                    "error": child["error"] or (None if len(stamps) >= steps else f"only {len(stamps)} steps")})
    return figures


def tqdm_rate(log: str) -> float | None:
    """kohya's own last progress-bar rate (tqdm's smoothed it/s or s/it), kept as a cross-check of the hook."""
    rates = re.findall(r"steps:.*?([\d.]+)(it/s|s/it)", log)
    if not rates:
        return None
    value, unit = rates[-1]
    return round(float(value) if unit == "it/s" else 1 / float(value), 4)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(KOHYA), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# -- merge (any environment) -------------------------------------------------------------------------


def merge(ours: dict, kohya_runs: list[dict]) -> dict:
    """One JSON: our suite, kohya's runs by case, and the goals with the speed-up ratios."""
    sys.path.insert(0, str(ROOT))
    from trainer.bench_suite import goals

    kohya = {"cases": {run["case"]: run for run in kohya_runs if "case" in run}}
    return {**ours, "kohya": kohya, "goals": goals(ours, kohya)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_child":
        split = argv.index("--")
        return _child(argv[1], argv[2], argv[split + 1:])
    p = argparse.ArgumentParser(prog="scripts/kohya_bench.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="checkpoints, data and tokenizers (project environment)")
    pr.add_argument("--work", required=True)
    pr.add_argument("--cases", default="sd15,sdxl")
    pr.add_argument("--resolution", type=int, default=1024, help="size of the square data images")
    pr.add_argument("--images", type=int, default=8)
    ru = sub.add_parser("run", help="one kohya case, timed")
    ru.add_argument("--work", required=True)
    ru.add_argument("--case", choices=list(SCRIPTS), required=True)
    ru.add_argument("--steps", type=int, default=40)
    ru.add_argument("--resolution", type=int, default=512)
    ru.add_argument("--batch", type=int, default=2)
    ru.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    ru.add_argument("--workers", type=int, default=2, help="--max_data_loader_n_workers (latents are cached)")
    ru.add_argument("--timeout", type=float, default=300)
    ru.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="first steps left out of steps/s")
    ru.add_argument("--json", required=True)
    me = sub.add_parser("merge", help="our suite JSON + kohya runs -> one JSON with speed-ups")
    me.add_argument("--ours", required=True)
    me.add_argument("--kohya", nargs="*", default=[])
    me.add_argument("--out", required=True)
    me.add_argument("--wall-s", type=float, help="the whole suite's seconds so far (gpu_suite.sh), kept in the JSON")
    args = p.parse_args(argv)
    if args.command == "prepare":
        made = prepare(Path(args.work), args.cases.split(","), args.resolution, args.images)
        print(json.dumps(made, indent=2))
        return 0
    if args.command == "run":
        figures = run(args.case, Path(args.work), args.steps, args.resolution, args.batch, args.mixed_precision,
                      args.workers, args.timeout, args.warmup)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(figures, indent=2))
        return 0 if not figures.get("error") else 1
    ours = json.loads(Path(args.ours).read_text(encoding="utf-8"))
    runs = [json.loads(Path(k).read_text(encoding="utf-8")) for k in args.kohya if Path(k).is_file()]
    merged = merge(ours, runs)
    if args.wall_s is not None:
        merged["whole_suite_wall_s"] = args.wall_s  # prepare + ours + kohya; the budget is 8 minutes
    Path(args.out).write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(merged["goals"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
