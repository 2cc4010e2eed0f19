"""Command line: ``python -m trainer {train,demo,ui,bench,check}``.

Bad input ends with exit code 2 and one line naming the field and the fix; details of unexpected
errors go to stderr. A run stopped with Ctrl+C exits 130 (after saving, on the first Ctrl+C).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from trainer.errors import TrainTrainError

ROOT = Path(__file__).resolve().parent.parent
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl+C


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one job from a preset and/or --set values")
    p.add_argument("preset", nargs="?", help="preset or settings JSON file (reference layout)")
    p.add_argument("--mode", help="LoRA, iLECO, Difference, ADDifT or Multi-ADDifT")
    p.add_argument("--model", help="built-in name (tiny-sd1, …), checkpoint file or diffusers folder")
    p.add_argument("--vae", help="VAE file replacing the checkpoint's VAE")
    p.add_argument("--text-encoder", "--te", dest="te",
                   help="text-encoder file of a model kept as separate files (Z-Image: qwen_3_4b.safetensors)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting by its exact key")
    p.add_argument("--original-prompt")
    p.add_argument("--target-prompt")
    p.add_argument("--negative-prompt")
    p.add_argument("--original-image")
    p.add_argument("--target-image")
    p.add_argument("--lora-dir", help="output folder for the LoRA files (default ./output)")
    p.add_argument("--models-dir", help="folder with Stable-diffusion/, VAE/, text_encoder/ and Lora/ subfolders")
    p.add_argument("--logs-dir", help="CSV loss logs and previews (default: logs/ beside the LoRA files)")
    p.add_argument("--json-dir", help="settings snapshots (default: json/ beside the LoRA files)")
    p.add_argument("--device", help="cuda, cpu, mps, cuda:1 … (default: the best available)")
    p.add_argument("--result-json", help="write the result as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--count-steps", action="store_true",
                   help="print the run's length (steps = epochs × batches, images × repeats) and exit without training")


def build_settings(args: argparse.Namespace):
    """Layer defaults → preset file → flags → --set (R2)."""
    from trainer.settings import Settings, parse_set_args

    layers: list[dict] = []
    if args.preset:
        path = Path(args.preset)
        if not path.is_file():
            candidate = ROOT / "presets" / f"{args.preset}.json"
            path = candidate if candidate.is_file() else path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            from trainer.errors import InputError

            raise InputError(str(args.preset), f"is not a readable settings JSON ({err}); give a preset file") from err
        base, warnings = Settings.from_json_dict(data)
        for warning in warnings:
            print(f"[warning] {warning}", file=sys.stderr)
        layers.append(base.to_json_dict())
    flags = {"mode": args.mode, "model": args.model, "vae": args.vae, "te": args.te,
             "original prompt": args.original_prompt,
             "target prompt": args.target_prompt, "negative prompt": args.negative_prompt,
             "original image": args.original_image, "target image": args.target_image}
    layers.append({k: v for k, v in flags.items() if v is not None})
    layers.append(parse_set_args(args.set))
    return Settings.from_layers(*layers)


def cmd_train(args: argparse.Namespace) -> int:
    from trainer import distributed
    from trainer.hosts.standalone import StandaloneHost
    from trainer.progress import Events, TqdmSink
    from trainer.runner import run_job

    settings = build_settings(args)
    if args.count_steps:  # a folder that cannot be counted fails like training would: one line, exit 2
        from trainer.modes.dataset import steps_line

        print(steps_line(settings))
        return 0
    # under torchrun (WORLD_SIZE > 1) this joins the process group; otherwise a one-process no-op
    dp = distributed.from_env(args.device)
    succeeded = False
    try:
        settings = dp.agree_seed(settings)
        host = StandaloneHost(args.models_dir, args.lora_dir, device=dp.device)
        stop = _StopOnSignal()
        events = Events([TqdmSink(disable=args.quiet or not dp.is_main)])
        # one place per run: logs, previews and snapshots go beside the LoRA unless told otherwise
        logs_root = Path(args.logs_dir) if args.logs_dir else host.lora_dir() / "logs"
        json_root = Path(args.json_dir) if args.json_dir else host.lora_dir() / "json"
        try:
            result = run_job(settings, host, events=events, stop=dp.wrap_stop(stop), logs_root=logs_root,
                             json_root=json_root, rank=dp.rank, world_size=dp.world_size,
                             grad_sync=dp.grad_sync)
        finally:
            events.close()
            stop.restore()
        if dp.active:
            result["data_parallel"] = dp.check_sync()
        if dp.is_main:
            print(result["message"])
            print(f"Logs and previews: {result.get('log_folder') or logs_root}")
            if result.get("report"):
                from trainer.report import Card

                for line in Card(**result["report"]).lines():
                    print(line)
            if args.result_json:
                from trainer.paths import atomic_write_text

                atomic_write_text(args.result_json, json.dumps(result, indent=2))
        succeeded = True
    finally:
        # the result is written before the ranks part: nothing is left to lose in the teardown
        dp.close(succeeded)
    if result["status"] == "failed":  # the report card found a broken LoRA: nothing was saved
        return 1
    # a stopped run saved what it saves, but did not finish: scripts must see that (128 + SIGINT, as shells do)
    return EXIT_INTERRUPTED if result["status"] in ("stopped", "saved_stop") else 0


class _StopOnSignal:
    """Ctrl+C once: stop and save at the end of the step; twice: stop at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.request: str | None = None
        self._previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.request:
            raise KeyboardInterrupt
        self.request = "save"
        print("\nStopping after this step and saving (Ctrl+C again to abort)…", file=sys.stderr)

    def __call__(self) -> str | None:
        return self.request

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def cmd_demo(args: argparse.Namespace) -> int:
    from trainer.demo import run_demo

    path = run_demo(Path(args.out), steps=args.steps, model=args.model)
    print(path)
    return 0


def cmd_ui(argv: list[str]) -> int:
    from trainer.ui.app import main as ui_main

    return ui_main(argv)


def cmd_bench(argv: list[str]) -> int:
    from trainer.bench import main as bench_main

    return bench_main(argv)


def cmd_check(argv: list[str]) -> int:
    from trainer.check import main as check_main

    return check_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = {"ui": cmd_ui, "bench": cmd_bench, "check": cmd_check}
    if argv and argv[0] in passthrough:
        try:
            return passthrough[argv[0]](argv[1:])
        except TrainTrainError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="python -m trainer", description="TrainTrain: LoRA / iLECO / Difference / ADDifT trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    demo = sub.add_parser("demo", help="train a small LoRA on a built-in tiny model and a generated dataset")
    demo.add_argument("--out", default="output/demo", help="folder for the generated data and the LoRA")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--model", default="tiny-sd1")
    for name in passthrough:
        sub.add_parser(name, help=f"see python -m trainer {name} --help", add_help=False)
    args = parser.parse_args(argv)
    try:
        return {"train": cmd_train, "demo": cmd_demo}[args.command](args)
    except TrainTrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C twice: stopped at once, nothing more saved
        print("\nAborted.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
