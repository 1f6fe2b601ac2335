# Sourced by scripts/run and scripts/test: make .venv and install fishim into it, on a fresh machine too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.fishim-installed-$1"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$1]" 2>&1 | grep -v '^WARNING: Location' || true
    touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
