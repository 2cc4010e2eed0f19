"""The report card (trainer/report.py) as a short table for the tab, under the progress panel."""

from __future__ import annotations

import html
from typing import Any

from trainer.report import EFFICACY_WORDS


def _pct(x: Any) -> str:
    return "–" if x is None else f"{x:.1f}%"


def card_rows(card: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows: verdict, efficacy, weight −1 (pair modes), specificity, health."""
    rows = [("verdict", str(card.get("verdict", ""))),
            ("efficacy", f"{_pct(card.get('efficacy'))} {EFFICACY_WORDS.get(card.get('kind', ''), '')}".strip())]
    if card.get("reverse") is not None:
        rows.append(("weight −1", f"{card['reverse']:+.1f}% the other way"))
    rows.append(("specificity", f"neighbours moved {_pct(card.get('specificity'))} of its move "
                                f"({card.get('neighbours', 0)} prompts)"))
    rows.append(("health", "; ".join(card.get("health") or []) or "ok"))
    return rows


def card_html(card: dict[str, Any] | None) -> str:
    """The card as an HTML table ("" when the run has none: effect_check off, or stopped early)."""
    if not card:
        return ""
    state = "ok" if card.get("learned") else "bad"
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in card_rows(card))
    return f'<table class="tt-report tt-report-{state}" id="tt_report">{body}</table>'


def card_markdown(card: dict[str, Any] | None) -> str:
    """The same rows as Markdown (for logs and notes)."""
    if not card:
        return ""
    return "| report card | |\n|---|---|\n" + "\n".join(
        f"| {k} | {v.replace('|', '/')} |" for k, v in card_rows(card))
