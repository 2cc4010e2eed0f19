"""A fake of Forge's / Forge Neo's ``modules`` package, as real builds behave (``shared/reference/realhosts.md``).

Only what differs from A1111 lives here (``shared``, ``sd_models``); every other ``modules.*`` falls back
to the A1111 fake beside it, as Forge keeps those modules from A1111.
"""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "fake_webui" / "modules"))  # noqa: F821
