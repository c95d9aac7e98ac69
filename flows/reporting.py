"""Plain-text tables and 3-digit numbers for the CLI and the batch summary.

Below the flows and the CLI (it imports neither, nor Prefect), so ``cli``, ``batch`` and
``serve`` share one table printer without importing each other.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

__all__ = ["fmt3", "format_table", "print_table"]


def fmt3(x: Any) -> str:
    """A number at 3 significant digits (``0.000123`` → ``0.000123``, ``1234.5`` → ``1.23e+03``); anything else as str."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, (int, float)):
        return f"{x:.3g}"
    return str(x)


def _cell(s: str, width: int, middle: bool = False) -> str:
    """``s`` in ``width`` characters: cut at the end, or (keys) in the middle so both ends stay readable."""
    if len(s) <= width:
        return s.ljust(width)
    if middle and width >= 8:
        head = width // 3
        return s[:head] + "…" + s[len(s) - (width - head - 1):]
    return s[: max(width - 1, 0)] + "…"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, max_width: Mapping[str, int] | None = None,
                 total_width: int | None = None, shrink_first: Sequence[str] = ()) -> str:
    """Rows as an aligned text table; a cell longer than its column's width ends in ``…``.

    ``max_width`` caps a column (default 60 characters); ``total_width`` then narrows columns
    until a line fits (e.g. 120 for a terminal): those in ``shrink_first`` down to 16 characters,
    then the widest, never below a header's length or 8 characters.
    """
    if not rows:
        return "(none)"
    caps = dict(max_width or {})
    widths = {c: min(caps.get(c, 60), max(len(c), *(len(str(r.get(c, ""))) for r in rows))) for c in columns}
    if total_width is not None:
        for group, floor in (([c for c in shrink_first if c in widths], 16), (list(columns), 8)):
            while group and sum(widths.values()) + 2 * (len(columns) - 1) > total_width:
                widest = max(group, key=lambda c: widths[c] - len(c))
                if widths[widest] <= max(len(widest), floor):
                    break
                widths[widest] -= 1
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip(), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(_cell(str(r.get(c, "")), widths[c], c in shrink_first) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, out: IO[str] | None = None,
                max_width: Mapping[str, int] | None = None, total_width: int | None = None, shrink_first: Sequence[str] = ()) -> None:
    """:func:`format_table` printed to ``out`` (stdout by default)."""
    print(format_table(rows, columns, max_width=max_width, total_width=total_width, shrink_first=shrink_first), file=out or sys.stdout)

