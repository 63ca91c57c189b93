#!/usr/bin/env bash
# The project's test command (README, .ci/run): the lint (ruff, configured in pyproject.toml), then the
# whole suite on two pytest-xdist workers. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -m ruff check .
"$PY" -m pytest -q -n 2 --durations=15 "$@"
