"""The standalone app: the same tab as in the Web-UI, served by gradio on this machine.

``python -m trainer ui`` calls :func:`main`. It listens on 127.0.0.1 unless ``--listen`` asks for every
interface; ``--auth user:pass`` adds a login.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STYLE_CSS = PROJECT_ROOT / "style.css"
SCRIPT_JS = PROJECT_ROOT / "javascript" / "traintrain.js"


@dataclass(frozen=True)
class AppPaths:
    """Where the standalone app keeps things (defaults: the project folder, like the Web-UI extension)."""

    presets_dir: Path
    json_root: Path
    logs_root: Path
    state_dir: Path

    @staticmethod
    def under(root: Path, state_dir: Path | None = None) -> AppPaths:
        return AppPaths(root / "presets", root / "json", root / "logs", state_dir or root / "queue")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the standalone app."""
    p = argparse.ArgumentParser(prog="python -m trainer ui", description="TrainTrain standalone web app")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="folder with Stable-diffusion/, VAE/ and Lora/ (or checkpoints directly inside)")
    p.add_argument("--lora-dir", type=Path, default=None, help="where trained LoRAs are written")
    p.add_argument("--state-dir", type=Path, default=None, help="queue and job files (default: ./queue)")
    p.add_argument("--data-root", type=Path, default=PROJECT_ROOT,
                   help="folder holding presets/, json/ and logs/ (default: the project folder)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--listen", action="store_true", help="listen on every interface (0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available)")
    return p.parse_args(argv)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``user:pass`` -> ``(user, pass)``.

    Raises:
        SettingsError: no ``:`` or an empty user name.
    """
    from trainer.errors import SettingsError

    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise SettingsError("--auth", f"'{text}' must look like user:password")
    return user, password


def read_asset(path: Path) -> str:
    """A static asset's text ('' when missing, so a partial checkout still starts)."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def build_app(worker: Any, host: Any, paths: AppPaths) -> tuple[Any, dict[str, Any]]:
    """The Blocks plus the ``launch()`` kwargs that carry css/js on this gradio version."""
    from trainer.ui import compat
    from trainer.ui.tab import build_tab

    css = read_asset(STYLE_CSS)
    script = read_asset(SCRIPT_JS)
    head = f"<script>{script}</script>" if script else None
    demo = build_tab(worker, host, presets_dir=paths.presets_dir, json_root=paths.json_root,
                     logs_root=paths.logs_root, css=css if compat.GR_MAJOR < 6 else None)
    if head and 4 <= compat.GR_MAJOR < 6:
        demo.head = head  # Blocks(head=) is read at launch time on 4.x/5.x
    compat.queue(demo)
    return demo, compat.launch_kwargs(css=css, head=head)


def make_worker(args: argparse.Namespace, paths: AppPaths):
    """The standalone host and its worker."""
    from trainer.hosts.standalone import StandaloneHost
    from trainer.jobs import Worker

    host = StandaloneHost(args.models_dir, args.lora_dir, device=args.device)
    worker = Worker(host, paths.state_dir, logs_root=paths.logs_root, json_root=paths.json_root)
    return worker, host


def main(argv: list[str] | None = None) -> int:
    """Start the app and serve until interrupted.

    Returns:
        The process exit code.
    """
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from trainer.errors import TrainTrainError

    try:
        auth = parse_auth(args.auth)
    except TrainTrainError as err:
        print(f"[TrainTrain] {err}")
        return 2
    paths = AppPaths.under(args.data_root, args.state_dir)
    worker, host = make_worker(args, paths)
    demo, launch = build_app(worker, host, paths)
    server = "0.0.0.0" if args.listen else args.host
    # quiet: gradio's own banner advises "set share=True in launch()", which is wrong here (--share)
    demo.launch(server_name=server, server_port=args.port, share=args.share, auth=auth, quiet=True,
                prevent_thread_lock=True, allowed_paths=[str(host.lora_dir())], **launch)
    print(startup_line(getattr(demo, "local_url", None), getattr(demo, "share_url", None), args.listen))
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


def startup_line(local_url: str | None, share_url: str | None, listen: bool) -> str:
    """What the app prints once it serves: where to open it, and how to share it (our flags, not gradio's)."""
    line = f"[TrainTrain] Open {local_url or 'the printed address'} in a browser. Ctrl+C stops."
    if share_url:
        return f"{line} Public link: {share_url}"
    hint = "" if listen else " --listen serves your network;"
    return f"{line}{hint} --share makes a public link."


if __name__ == "__main__":
    raise SystemExit(main())
