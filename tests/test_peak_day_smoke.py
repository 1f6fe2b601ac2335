"""scripts/peak_day.py on a small day: the script runs, and every injected condition raises exactly one
alert (the full 2,000-order day is run by hand; its figures are in docs/alerts.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "peak_day.py"


def _load() -> object:
    spec = importlib.util.spec_from_file_location("peak_day", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["peak_day"] = module
    spec.loader.exec_module(module)
    return module


def test_small_peak_day_has_precision_and_recall_one(tmp_path: Path) -> None:
    peak = _load()
    for service in (None, tmp_path / "peak.db"):
        figures = peak.run(seed=7, orders=150, riders=4, service_db=service)  # type: ignore[attr-defined]
        assert figures["expected_alerts"] > 20
        assert (figures["precision"], figures["recall"], figures["duplicates"]) == (1.0, 1.0, 0)
        assert figures["escalated_more_than_once"] == 0
        assert set(figures["by_reason"]) == {"unassigned_packed", "pickup_overdue", "rider_offline",
                                             "unanswered_customer", "order_late", "delivery_failed"}
