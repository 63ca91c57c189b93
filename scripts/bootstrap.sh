#!/usr/bin/env bash
# Installs what is missing, and nothing else:
#   - torch, only if it is not importable (a CPU wheel on a machine without CUDA; on a GPU server keep yours);
#   - this package with its dev extras (pip install -e ".[dev]"; a no-op when up to date);
#   - with --browser: Debian's chromium + chromium-driver for the studio's browser test (root + apt only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "bootstrap: installing torch" >&2
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch
fi
"$PY" -m pip install -q -e ".[dev]" 2>&1 | grep -v "Running pip as the 'root' user" || true
"$PY" -c "import calligrapher_rl, diffusers, gradio" # fail loudly here rather than inside the tests

if [[ "${1:-}" == "--browser" ]] && ! command -v chromedriver >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing chromium + chromium-driver (browser test)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "bootstrap: chromium not installed; the browser test will be skipped" >&2
  else
    echo "bootstrap: no root/apt; the browser test will be skipped" >&2
  fi
fi
