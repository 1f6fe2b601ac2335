"""``python -m fishim.bench``: the benchmark (and, as ``_worker``, its load-generator processes)."""

import sys

from fishim.bench.cli import main

sys.exit(main())
