"""fishim-sync.js's ordering rules (dedup by id, order_seq holes held and synced, cursor only from
completed replies), run with node against a stand-in transport; see tests/js/fishim_sync_order.js."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fishim.http.pages import WEB_DIR

NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is needed to run the JS module's unit test")
def test_fishim_sync_orders_dedups_and_fills_gaps() -> None:
    script = Path(__file__).parent / "js" / "fishim_sync_order.js"
    result = subprocess.run([NODE or "node", str(script), str(WEB_DIR)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
