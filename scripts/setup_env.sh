#!/usr/bin/env bash
# Create .venv with kvtier and its dev dependencies (idempotent).
# torch is pinned to the CPU build via constraints/dev-cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.kvtier-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints/dev-cpu.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -c constraints/dev-cpu.txt -e '.[dev]'
    touch "$stamp"
fi
