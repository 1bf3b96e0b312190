"""Summary tables (rich) that also render as plain text for logs, READMEs and CI output."""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

MISSING = "-"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real | np.number) and not isinstance(value, bool | np.bool_)


def format_cell(value: Any, digits: int = 4) -> str:
    """Table text for one value: numbers with ``digits`` significant digits, None/NaN as ``-``."""
    if value is None:
        return MISSING
    if _is_number(value):
        number = float(value)
        if math.isnan(number):
            return MISSING
        if number.is_integer() and abs(number) < 10**digits:
            return str(int(number))
        return f"{number:.{digits}g}"
    return str(value)


def summary_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str = "") -> Table:
    """One row per dict, one column per name in ``columns`` (absent keys shown as ``-``).
    Columns holding only numbers are right-aligned."""
    table = Table(title=title or None)
    for column in columns:
        present = [row[column] for row in rows if row.get(column) is not None]
        numeric = bool(present) and all(_is_number(value) for value in present)
        table.add_column(column, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(format_cell(row.get(column)) for column in columns))
    return table


def render_table(table: Table, width: int = 120) -> str:
    """The table as plain text (no colour, no escape codes), ``width`` characters wide at most."""
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width, force_terminal=False, no_color=True, color_system=None, highlight=False
    )
    console.print(table)
    return buffer.getvalue()


def mean_std(values: Iterable[Any], digits: int = 3) -> str:
    """``"mean ± std"`` over seeds, std with Bessel's correction (ddof=1); one value prints alone,
    none prints ``-``. NaNs propagate (a failed seed is visible, not silently dropped)."""
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    if array.size == 0:
        return MISSING
    mean = float(array.mean())
    if array.size == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(array.std(ddof=1)):.{digits}f}"


def interception_trend(history: Sequence[Mapping[str, Any]]) -> str | None:
    """One line on the guard's interception rate (denied / checked tool calls) in the first and the
    last quarter of training steps, or None for a run without a guard. A rising rate is the early
    warning that the policy is learning to cheat."""
    rows = [h for h in history if "guard_checked" in h and "final" not in h]
    if not rows:
        return None
    quarter = max(1, len(rows) // 4)

    def rate(part: Sequence[Mapping[str, Any]]) -> float:
        checked = sum(float(h["guard_checked"]) for h in part)
        return sum(float(h["guard_denied"]) for h in part) / checked if checked else 0.0

    first, last = rate(rows[:quarter]), rate(rows[-quarter:])
    arrow = "rising: the policy is learning to cheat" if last > first + 0.05 else "not rising"
    total = sum(float(h["guard_denied"]) for h in rows)
    return (
        f"guard: {total:.0f} tool calls intercepted; interception rate {100 * first:.1f}% in the first "
        f"quarter of steps, {100 * last:.1f}% in the last ({arrow})"
    )
