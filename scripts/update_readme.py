"""Regenerate the settings table in README.md from the settings table (the one source of truth)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.settings import settings_markdown  # noqa: E402

START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def render(readme: str) -> str:
    block = f"{START}\n{settings_markdown().strip()}\n{END}"
    return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
