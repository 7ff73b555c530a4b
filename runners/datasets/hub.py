"""Fetch the four hub datasets into ``$DATAS_DIR`` (default ``<repo>/data/huggingface``).

Used by ``scripts/datasets/download_*.sh``; never by tests or loaders (every loader reads a
local file). ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_DATASETS_CACHE`` are pointed under the
same root before ``huggingface_hub`` / ``datasets`` are imported (they read them at import),
so nothing lands in ``~/.cache``. Each download prints where the file went and the
``kvtier run`` flag that reads it.

    python -m kvtier.runners.datasets.hub ruler [--file data_100_samples.tgz]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvtier.runners.datasets.common import SOURCE_SIDECAR, data_root


@dataclass(frozen=True, slots=True)
class HubFile:
    """One dataset file on the hub and the ``kvtier run`` flag that reads it."""

    repo_id: str
    filename: str
    flag: str


SOURCES = {
    "ruler": HubFile("allenai/ruler_data", "data_debug.tgz", "--ruler-tgz"),
    "longbench-v2": HubFile("zai-org/LongBench-v2", "data.json", "--lbv2-json"),
    "sharegpt": HubFile("anon8231489123/ShareGPT_Vicuna_unfiltered",
                        "ShareGPT_V3_unfiltered_cleaned_split.json", "--sharegpt-json"),
    # BurstGPT's hub copy is a datasets export (split "train"), saved here as one CSV
    "burstgpt": HubFile("lzzmm/BurstGPT", "burstgpt_train.csv", "--burstgpt-csv"),
}


def hub_env(root: Path | None = None) -> Path:
    """Point the HF caches under ``root`` (default ``data_root()``); returns ``root``."""
    root = Path(root) if root is not None else data_root()
    os.environ["HF_HOME"] = str(root)
    os.environ["HF_HUB_CACHE"] = str(root / "hub")
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")
    return root


def local_dir(root: Path, repo_id: str) -> Path:
    """``<root>/<owner>__<name>``: a predictable place to pass to the loaders."""
    return root / repo_id.replace("/", "__")


def download_file(name: str, filename: str | None = None, revision: str | None = None,
                  root: Path | None = None) -> Path:
    """Download one file of a hub dataset repo (RULER, LongBench v2, ShareGPT)."""
    src = SOURCES[name]
    root = hub_env(root)
    from huggingface_hub import hf_hub_download  # after hub_env: it reads HF_* at import

    out = hf_hub_download(repo_id=src.repo_id, filename=filename or src.filename,
                          repo_type="dataset", revision=revision,
                          local_dir=local_dir(root, src.repo_id))
    return Path(out)


def download_burstgpt(revision: str | None = None, root: Path | None = None) -> Path:
    """Export ``lzzmm/BurstGPT`` split ``train`` to one CSV (columns keep their names)."""
    src = SOURCES["burstgpt"]
    root = hub_env(root)
    from datasets import load_dataset  # after hub_env: they read HF_* at import
    from huggingface_hub import HfApi

    commit = HfApi().dataset_info(src.repo_id, revision=revision).sha  # pin what we export
    ds = load_dataset(src.repo_id, split="train", revision=commit or revision)
    out = local_dir(root, src.repo_id) / src.filename
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".csv.partial")
    ds.to_csv(str(tmp), index=False)
    tmp.replace(out)
    sidecar = out.with_name(out.name + SOURCE_SIDECAR)  # read back by the loader's provenance
    sidecar.write_text(json.dumps({"dataset_id": src.repo_id, "split": "train",
                                   "revision": commit}) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvtier.runners.datasets.hub",
        description="Download a kvtier workload from the Hugging Face hub into $DATAS_DIR "
                    "(default <repo>/data/huggingface) and print the flag that reads it.",
    )
    parser.add_argument("dataset", choices=sorted(SOURCES), help="which workload to fetch")
    parser.add_argument("--file", default=None,
                        help="file in the hub repo (RULER: data_debug.tgz (default) or "
                             "data_100_samples.tgz); ignored for burstgpt")
    parser.add_argument("--revision", default=None,
                        help="hub revision (branch, tag or commit) to pin; default: main")
    parser.add_argument("--dest", type=Path, default=None,
                        help="download root (default: $DATAS_DIR or <repo>/data/huggingface)")
    args = parser.parse_args(argv)
    fetch: Callable[[], Path]
    if args.dataset == "burstgpt":
        def fetch() -> Path:
            return download_burstgpt(args.revision, args.dest)
    else:
        def fetch() -> Path:
            return download_file(args.dataset, args.file, args.revision, args.dest)
    try:
        path = fetch()
    except Exception as exc:  # network, auth, missing file: one line, not a traceback
        print(f"download {args.dataset}: error: {type(exc).__name__}: {exc}".splitlines()[0],
              file=sys.stderr)
        return 2
    flag = SOURCES[args.dataset].flag
    print(f"{args.dataset}: saved to {path}")
    print(f"pass: kvtier run {args.dataset} {flag} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
