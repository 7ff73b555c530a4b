#!/usr/bin/env bash
# BurstGPT: lzzmm/BurstGPT split train, exported to one CSV (columns keep their names).
# Files go under $DATAS_DIR (default: <repo>/data/huggingface); the HF caches (HF_HOME,
# HF_HUB_CACHE, HF_DATASETS_CACHE) are pointed there too. Prints the path and the flag to pass.
# Needs network access to the Hugging Face hub. Extra arguments go to the downloader
# (see: .venv/bin/python -m kvtier.runners.datasets.hub --help).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" -m kvtier.runners.datasets.hub burstgpt "$@"
