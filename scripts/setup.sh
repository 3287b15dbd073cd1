#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with sa2va-tui installed.
# A Python that already has torch (a GPU box) keeps its own build; elsewhere the
# CPU build torch==2.13.0 is installed, since a bare range would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [[ -f $stamp ]]; then exit 0; fi
if [[ ! -x .venv/bin/python ]]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
# The ray extra too: the tests run the ray backend on a small local cluster.
.venv/bin/python -m pip install -q -e '.[dev,ray]'
rm -f .venv/.installed-*
touch "$stamp"
