"""README promises: the two commands on top, the generated settings table, CI runs the test command."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_updater():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_table_in_readme_is_generated_from_the_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _load_updater().render(readme) == readme, "run: python scripts/update_readme.py"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    lines = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines() if line.startswith("pip install")]
    assert "python -m trainer demo" in lines[0]
    assert "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "grep -m1 -E '^pip install .*pytest' README.md" in ci
