"""Sample-prompt lines in kohya's format: ``a cat --n blurry --w 512 --h 768 --s 20 --l 7 --d 42``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from trainer.errors import SettingsError

KEY = "sample_prompts"
# option letter -> (field, parser, what it is)
_OPTIONS = {"n": "negative", "w": "width", "h": "height", "s": "steps", "l": "cfg_scale", "d": "seed"}
_SPLIT = re.compile(r"(?:^|\s)--(?=[a-zA-Z])")


@dataclass(frozen=True)
class SamplePrompt:
    """One preview image to render. ``None`` sizes mean the run's image size; seed ``None`` the run's."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int | None = None


def parse_sample_prompts(text: str) -> list[SamplePrompt]:
    """Parse one prompt per line; blank lines and ``#`` comments are skipped.

    Raises:
        SettingsError: (``sample_prompts``) an unknown option or a value that does not parse, naming the line.
    """
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompts.append(_parse_line(line, number))
    return prompts


def _parse_line(line: str, number: int) -> SamplePrompt:
    parts = _SPLIT.split(line)
    values: dict[str, object] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        letter, _, value = part.partition(" ")
        letter, value = letter.strip(), value.strip()
        where = f"line {number} ('{line[:40]}')"
        if letter not in _OPTIONS:
            raise SettingsError(KEY, f"{where}: unknown option --{letter}; use --n, --w, --h, --s, --l or --d")
        name = _OPTIONS[letter]
        values[name] = value if name == "negative" else _number(name, value, where, letter)
    for name in ("width", "height"):
        size = values.get(name)
        if size is not None and (size <= 0 or size % 8):  # type: ignore[operator]
            raise SettingsError(KEY, f"line {number}: --{name[0]} {size} is not a positive multiple of 8; use e.g. 512")
    if int(values.get("steps", 20)) < 1:  # type: ignore[call-overload]
        raise SettingsError(KEY, f"line {number}: --s must be at least 1; use e.g. 20")
    return SamplePrompt(**values)  # type: ignore[arg-type]


def _number(name: str, value: str, where: str, letter: str) -> int | float:
    try:
        return float(value) if name == "cfg_scale" else int(value)
    except ValueError:
        kind = "a number" if name == "cfg_scale" else "a whole number"
        example = {"width": 512, "height": 512, "steps": 20, "cfg_scale": 7, "seed": 42}[name]
        raise SettingsError(KEY, f"{where}: --{letter} '{value}' is not {kind}; write e.g. --{letter} {example}") from None
