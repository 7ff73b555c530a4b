#!/usr/bin/env bash
# Create .venv with kvtier and its dev dependencies (idempotent, quiet).
# torch is pinned to the CPU build via constraints/dev-cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.kvtier-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints/dev-cpu.txt -nt "$stamp" ]; then
    echo "setting up .venv (first run: a few minutes) ..."
    # Two notices are noise here and are dropped: setuptools' editable-install advice (our
    # package-dir mapping needs its meta-path finder) and pip's note for each package an
    # extra index configured on this machine does not carry. Everything else still shows.
    quiet() {
        PYTHONWARNINGS="ignore:Editable installation" "$@" \
            2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    }
    quiet .venv/bin/python -m pip install --quiet --upgrade pip
    quiet .venv/bin/python -m pip install --quiet -c constraints/dev-cpu.txt -e '.[dev]'
    touch "$stamp"
fi
