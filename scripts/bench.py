#!/usr/bin/env python3
"""fishim benchmarks from a checkout: the same as ``fishim bench`` (the fishim.bench package).

    .venv/bin/python scripts/bench.py --quick
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's fishim, even without install

from fishim.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/bench.py"))
