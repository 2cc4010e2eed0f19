"""The pure half of the tab: which widget shows which field, and the trip between widgets and Settings.

No gradio here, so every rule is unit-tested without a browser. Widgets are keyed by the field's exact
key (R22); pass 2 has its own dict with the same keys. Values travel as the reference JSON form.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from trainer.settings import FIELDS, GROUPS, MODE_DEFAULTS, MODES, PASS2_KEY, Field, Settings, mode_default

BLOCKS_KEY = "network_blocks(BASE = TextEncoder)"
USE_PASS2_KEY = "use_2nd_pass_settings"
JOB_SPECIAL = ("mode", "model", "vae", "te")  # job keys with their own widgets (radio, host dropdowns)
NO_VAE = "None"  # shown for "the checkpoint's own VAE" ("" in the settings, "None" in reference presets)

# Blocks each family really has (reference §4.1/§8.4). Attention-only adapters (lierla, dora) touch the
# attention blocks; conv-capable ones (c3lier, loha, lokr) every block except IN00 (conv_in: never adapted).
_SD_ATTENTION = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(3, 12))
_SD_ALL = ("BASE",) + tuple(f"IN{i:02d}" for i in range(1, 12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
_XL_ATTENTION = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(6))
_XL_ALL = ("BASE",) + tuple(f"IN{i:02d}" for i in range(1, 9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9))
_ATTENTION_ONLY = frozenset({"lierla", "dora"})


def pass1_fields() -> tuple[Field, ...]:
    """Required and optional fields: the pass-1 widgets."""
    return tuple(f for f in FIELDS if f.section in ("required", "optional"))


def pass2_fields() -> tuple[Field, ...]:
    """Fields with a pass-2 widget in the Difference accordion (``use_2nd_pass_settings`` included)."""
    return tuple(f for f in FIELDS if f.pass2)


def job_fields() -> tuple[Field, ...]:
    """Mode, model, VAE, prompts and images."""
    return tuple(f for f in FIELDS if f.section == "job")


def group_fields(fields: Iterable[Field], group: str) -> list[Field]:
    """The fields of one group, table order kept."""
    return [f for f in fields if f.group == group]


def _height(f: Field) -> float:
    """Rough rendered height in px (label + help lines + control), enough to balance columns."""
    control = {"checkbox": 36, "checkboxgroup": 150, "textarea": 90}.get(f.widget, 44)
    return 30 + control + 17 * (len(f.help) // 48 + 1)


def balanced_columns(fields: list[Field], n: int = 3) -> list[list[Field]]:
    """Split ``fields`` into ``n`` contiguous columns (table order kept) whose heights differ least.

    Contiguous keeps related settings together; the split points minimise the tallest column.
    """
    heights = [_height(f) for f in fields]
    best: tuple[float, list[int]] = (float("inf"), [])
    count = len(fields)

    def search(start: int, left: int, cuts: list[int], tallest: float) -> None:
        nonlocal best
        if tallest >= best[0]:
            return
        if left == 1:
            last = max(tallest, sum(heights[start:]))
            if last < best[0]:
                best = (last, cuts)
            return
        for end in range(start, count + 1):
            search(end, left - 1, [*cuts, end], max(tallest, sum(heights[start:end])))

    search(0, n, [], 0.0)
    bounds = [0, *best[1], count]
    return [fields[bounds[i]:bounds[i + 1]] for i in range(n)]


def columns(fields: Iterable[Field], section: str) -> dict[int, list[Field]]:
    """The fields of ``section`` in three balanced UI columns (1..3); checkbox groups excluded."""
    chosen = [f for f in fields if f.section == section and f.widget != "checkboxgroup"]
    return dict(enumerate(balanced_columns(chosen), 1))


def mode_switch(old: str, new: str, current: Mapping[str, Any]) -> dict[str, Any]:
    """Widget values to set when the Mode changes from ``old`` to ``new``.

    A value still equal to ``old``'s default (the user has not typed it) moves to ``new``'s default; a
    typed one is kept. Only keys in ``current`` are considered.
    """
    by_key = {f.key: f for f in FIELDS}
    keys = {k for defaults in MODE_DEFAULTS.values() for k in defaults}
    out = {}
    for key in sorted(keys & set(current)):
        f = by_key[key]
        if same_value(f, current[key], widget_value(f, mode_default(key, old))):
            target = widget_value(f, mode_default(key, new))
            if not same_value(f, current[key], target):
                out[key] = target
    return out


def same_value(f: Field, a: Any, b: Any) -> bool:
    """Widget values equal in meaning: ``1e-4`` == ``0.0001``, block lists as sets."""
    if f.widget == "checkboxgroup":
        return set(a or []) == set(b or [])
    if f.widget == "checkbox":
        return bool(a) == bool(b)
    ta, tb = ("" if a is None else str(a)).strip(), ("" if b is None else str(b)).strip()
    if ta == tb:
        return True
    try:
        return float(ta) == float(tb)
    except ValueError:
        return False


def changed_in_group(group: str, mode: str, values: Mapping[str, Any], limit: int = 3) -> str:
    """The accordion title: ``Network · 2 changed: Rank 8, Alpha 4`` or ``Network · defaults``.

    Compares against the mode's defaults and counts only fields shown in ``mode``.
    """
    by_key = {f.key: f for f in FIELDS}
    changed = []
    for key, value in values.items():
        f = by_key[key]
        if mode not in f.modes or _is_default(f, value, mode):
            continue
        shown = "changed" if f.widget in ("checkboxgroup", "textarea") else (
            "on" if value is True else "off" if value is False else str(value)[:24])
        changed.append(f"{f.label} {shown}")
    title = GROUPS[group]
    if not changed:
        return f"{title} · defaults"
    more = f", +{len(changed) - limit} more" if len(changed) > limit else ""
    return f"{title} · {len(changed)} changed: {', '.join(changed[:limit])}{more}"


def _is_default(f: Field, value: Any, mode: str) -> bool:
    """Equal to the mode's default; every block a family has ticked counts as the default "all blocks"."""
    if f.key == BLOCKS_KEY:
        every = {frozenset(blocks_for(fam, t)) for fam in ("sd", "sdxl") for t in ("lierla", "c3lier")}
        return frozenset(value or []) in every | {frozenset(f.default)}
    return same_value(f, value, widget_value(f, mode_default(f.key, mode)))


def group_visible(group: str, mode: str) -> bool:
    """A group is shown when at least one of its fields applies to ``mode``."""
    return any(mode in f.modes for f in FIELDS if f.group == group)


def is_visible(f: Field, mode: str) -> bool:
    """A pass-1 widget is shown only in the modes where its setting has an effect."""
    return mode in f.modes


def format_number(value: Any) -> str:
    """Numbers as a person types them: ``8.0`` -> ``8``, ``0.5`` -> ``0.5``; text unchanged."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def choices_of(f: Field) -> list[str]:
    """Dropdown/checkbox-group choices as strings (gradio compares values as shown)."""
    return [format_number(c) for c in f.choices]


def widget_value(f: Field, raw: Any) -> Any:
    """The widget value for a raw (reference JSON) value."""
    if f.widget == "checkbox":
        return bool(raw)
    if f.widget == "checkboxgroup":
        return [str(v) for v in (raw or [])]
    if f.widget == "image":
        return None  # images are never restored into the widget; the job keeps its own copy
    if f.key in ("vae", "te") and raw in ("", None):
        return NO_VAE
    return format_number(raw)


def widget_values(settings: Settings) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Widget values for ``settings``: (pass 1, pass 2, job), each keyed by field key.

    Pass 2 shows the ``2nd pass`` values when the settings have them, else a copy of pass 1 with
    ``use_2nd_pass_settings`` off (reference §5.4).
    """
    raw = settings.raw
    first = {f.key: widget_value(f, raw[f.key]) for f in pass1_fields()}
    source = settings.pass2.raw if settings.pass2 is not None else raw
    second = {f.key: widget_value(f, source[f.key]) for f in pass2_fields()}
    second[USE_PASS2_KEY] = bool(settings.pass2 is not None and settings.pass2.use_2nd_pass_settings)
    job = {f.key: widget_value(f, raw[f.key]) for f in job_fields()}
    return first, second, job


def _from_widget(f: Field, value: Any) -> Any:
    """A widget value back to a raw layer value (gradio may send None for an empty dropdown)."""
    if f.widget == "checkbox":
        return bool(value)
    if f.widget == "checkboxgroup":
        return list(value or [])
    if value is None:
        return f.default if f.widget == "dropdown" and f.section != "job" else ""
    return value


def ui_layer(first: Mapping[str, Any], second: Mapping[str, Any], job: Mapping[str, Any]) -> dict[str, Any]:
    """One ``Settings.from_layers`` layer from the three widget dicts.

    Pass-2 values are sent only in Difference mode with ``use_2nd_pass_settings`` ticked, so an unticked
    accordion round-trips to ``"2nd pass": null`` exactly like the reference export.
    """
    by_key = {f.key: f for f in FIELDS}
    layer = {k: _from_widget(by_key[k], v) for k, v in first.items()}
    layer.update({k: _from_widget(by_key[k], v) for k, v in job.items()})
    for key in ("vae", "te"):  # "None" in the dropdown = the checkpoint's own part
        if layer.get(key) == NO_VAE:
            layer[key] = ""
    use2 = bool(second.get(USE_PASS2_KEY)) and layer.get("mode") == "Difference"
    layer[PASS2_KEY] = {k: _from_widget(by_key[k], v) for k, v in second.items()} if use2 else None
    return layer


def settings_from_ui(first: Mapping[str, Any], second: Mapping[str, Any], job: Mapping[str, Any]) -> Settings:
    """Settings from the widget dicts (defaults under them).

    Raises:
        SettingsError: a value cannot be coerced (the message names the key).
    """
    return Settings.from_layers(ui_layer(first, second, job))


def copy_pass1(first: Mapping[str, Any]) -> dict[str, Any]:
    """Pass-2 widget values copied from pass 1: every pass-2 key, never ``use_2nd_pass_settings``.

    (The reference skipped ``network_type`` and unticked the box through an index offset, §17 #39.)
    """
    return {f.key: first[f.key] for f in pass2_fields() if f.key != USE_PASS2_KEY and f.key in first}


def family_of(model: str, host: Any = None) -> str:
    """``"sdxl"`` or ``"sd"`` for a model name; asks the host when it can tell (``host.model_family``)."""
    ask = getattr(host, "model_family", None)
    if callable(ask) and model:
        try:
            family = str(ask(model)).lower()
        except (KeyError, ValueError, OSError):
            family = ""
        if family:
            return "sdxl" if "xl" in family else "sd"
    return "sdxl" if "xl" in (model or "").lower() else "sd"


def blocks_for(family: str, network_type: str) -> list[str]:
    """Block IDs the family's U-Net really has for this network type (what a tick can change)."""
    attention = network_type in _ATTENTION_ONLY
    if family == "sdxl":
        return list(_XL_ATTENTION if attention else _XL_ALL)
    return list(_SD_ATTENTION if attention else _SD_ALL)


def narrow_blocks(selected: Iterable[str], old_choices: Iterable[str], new_choices: list[str]) -> list[str]:
    """Carry a block selection over to a new choice list.

    "All ticked" stays all ticked (so the default keeps meaning every block); otherwise the ticks that
    still exist are kept.
    """
    chosen, old = set(selected), list(old_choices)
    if old and set(old) <= chosen:
        return list(new_choices)
    return [b for b in new_choices if b in chosen]


def mode_choices() -> list[str]:
    """The Mode radio's choices."""
    return list(MODES)
