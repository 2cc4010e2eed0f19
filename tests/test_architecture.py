"""The core never imports the Web-UI (`modules.*`), gradio, diffusers or transformers: it must run
inside A1111, which has no diffusers, and on hosts whose libraries are not ours to change."""

from __future__ import annotations

import subprocess
import sys

CORE = ["trainer.settings", "trainer.presets", "trainer.paths", "trainer.errors", "trainer.progress", "trainer.csvlog",
        "trainer.jobs", "trainer.runner", "trainer.optim", "trainer.schedules", "trainer.report", "trainer.vram",
        "trainer.network", "trainer.data", "trainer.modes.common", "trainer.modes.setup", "trainer.modes.resume",
        "trainer.modes.lora", "trainer.modes.ileco", "trainer.modes.difference", "trainer.modes.addift",
        "trainer.modes.multi_addift", "trainer.models.bundle", "trainer.models.names", "trainer.hosts.base",
        "trainer.sampling.prompts", "trainer.sampling.sampler", "trainer.sampling.render", "trainer.sampling.hook"]


def test_core_imports_without_host_libraries():
    blocked = ["diffusers", "gradio", "modules", "transformers"]
    code = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    code += "".join(f"import {module}\n" for module in CORE)
    code += f"print('ok', sorted(m for m in sys.modules if m.split('.')[0] in {blocked!r} and sys.modules[m] is not None))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok []"


def test_models_and_the_core_never_import_a_host():
    """Hosts sit at the edge and hand what they own to the bundle (e.g. A1111's preview renderer);
    ``trainer/models``, modes, network, data and sampling never import ``trainer.hosts`` (except the
    protocol in ``hosts/base.py``)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "trainer"
    offenders = []
    for package in ("models", "modes", "network", "data", "sampling"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.relative_to(root)}: {n}" for n in names
                              if n.startswith("trainer.hosts") and n != "trainer.hosts.base"]
    assert offenders == []
