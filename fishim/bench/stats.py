"""Small statistics and number formatting shared by every section and the report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def ms(ns_values: Sequence[int]) -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v / 1e6, 2)
    return {"p50": r(pct(ns_values, 50)), "p99": r(pct(ns_values, 99)), "max": r(max(ns_values) if ns_values else None)}


def rate(count: int, start_ns: int, end_ns: int) -> float:
    return round(count / ((end_ns - start_ns) / 1e9), 1) if end_ns > start_ns and count else 0.0


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarise(runs: list[dict[str, Any]], *paths: str) -> dict[str, Any]:
    """Median over runs of each ``a.b`` path, plus the raw runs."""
    def get(run: dict[str, Any], path: str) -> Any:
        value: Any = run
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    out: dict[str, Any] = {}
    for path in paths:
        values = [v for v in (get(r, path) for r in runs) if v is not None]
        out[path.replace(".", "_")] = round(statistics.median(values), 3) if values else None
    out["runs"] = runs
    return out


def fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}{unit}"
    return f"{value}{unit}"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table: the first column left-aligned, the figures right-aligned."""
    return [f"| {' | '.join(headers)} |", "|---" + "|---:" * (len(headers) - 1) + "|",
            *(f"| {' | '.join(row)} |" for row in rows)]
