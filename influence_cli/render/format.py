"""Text formatting shared by the terminal tables and the HTML report: numbers, ids, labels."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

ARROW = "→"
FLAG_MARK = "⚑"
#: Longest id shown in a terminal table or an HTML card (longer ids keep their tail).
MAX_ID_CHARS = 40


def format_score(value: float) -> str:
    """Self-influence with 3 significant digits in scientific notation (``1.23e+03``)."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2e}"


def format_prob(p: float) -> str:
    """A probability as a percentage with one decimal (``<0.1%`` for tiny ones)."""
    p = float(p)
    if not math.isfinite(p):
        return "n/a"
    if 0.0 < p < 0.0005:
        return "<0.1%"
    return f"{100.0 * p:.1f}%"


def shorten(text: str, limit: int = MAX_ID_CHARS) -> str:
    """Keep the tail of a long id (for paths, the file name is the informative part)."""
    text = str(text)
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1):]


def shorten_end(text: str, limit: int) -> str:
    """Cut a class name at the end (its beginning is the informative part)."""
    text = str(text)
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def label_parts(row: Mapping[str, Any]) -> tuple[str, Optional[str]]:
    """(given, suggested or None) for a ranking row."""
    given = str(row["label_name"])
    suggested = str(row["suggested_label"]) if bool(row["flagged"]) else ""
    return given, (suggested if suggested else None)


__all__ = ["ARROW", "FLAG_MARK", "MAX_ID_CHARS", "format_prob", "format_score", "label_parts", "shorten", "shorten_end"]
