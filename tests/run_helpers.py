"""Shared pieces of the runner tests: one tiny demo model per test session, ``kvtier run``
through the real argparse layer with that model, and checks every run must pass."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import msgspec

from kvtier.schema import REQUESTS_FILE, SUMMARY_FILE, TRACE_FILE, Summary

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"


@functools.lru_cache(maxsize=1)
def demo_bundle():
    """The demo-config model with seeded weights (built once: ~seconds on 2 cores)."""
    import torch

    from kvtier.runners.model_setup import load_model

    torch.set_num_threads(2)
    return load_model("demo", None, device="cpu", seed=0, quiet=True)


def run_cli(argv: list[str], bundle=None) -> int:
    """``kvtier run ...`` parsed by the real CLI parser, run on the shared model."""
    from kvtier.cli import build_parser
    from kvtier.runners import launch

    args = build_parser().parse_args(["run", *argv])
    return launch.launch(args, bundle=bundle or demo_bundle())


def read_summary(out: Path) -> Summary:
    return msgspec.json.decode((out / SUMMARY_FILE).read_bytes(), type=Summary)


def read_meta(out: Path) -> dict:
    return json.loads((out / "run_meta.json").read_text())


def request_lines(out: Path) -> list[dict]:
    """``requests.jsonl``: one line per admitted request, ids 0, 1, 2, ... (checked)."""
    rows = [json.loads(line) for line in (out / REQUESTS_FILE).read_text().splitlines()]
    assert [r["request_id"] for r in rows] == list(range(len(rows)))
    return rows


def trace_lines(out: Path) -> list[dict]:
    """The records as dicts, each with the ``sample_id`` of its request added from
    ``requests.jsonl`` (the loader's id: what the tests compare against)."""
    path = out / TRACE_FILE
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = {r["request_id"]: r.get("sample_id") for r in request_lines(out)} if recs else {}
    for r in recs:
        r["sample_id"] = names[r["request_id"]]
    return recs


def check_run(out: Path, dataset: str, dataset_id: str) -> tuple[Summary, dict, list[dict]]:
    """What every finished run must satisfy: the trace validates, the summary equals one
    recomputed from the trace, run_meta.json carries provenance."""
    from spec52 import check_trace_dir

    from kvtier.trace.summary import recompute_summary
    from kvtier.trace.validate import validate_trace

    report = validate_trace(out)
    assert report.ok, report.messages
    assert check_trace_dir(out) == []  # the design note's §5.2 / §5.3, checked independently
    summary = read_summary(out)
    records = trace_lines(out)
    assert summary.records == len(records) == report.records > 0
    assert summary.dataset == dataset
    again = recompute_summary(out, keep_from=summary)
    assert msgspec.to_builtins(again) == msgspec.to_builtins(summary)
    meta = read_meta(out)
    assert meta["status"] == "finished" and meta["interrupted"] is False
    assert meta["random_weights"] is True and "warning" in meta
    assert meta["dataset"]["dataset_id"] == dataset_id
    for key in ("file", "split", "revision"):
        assert key in meta["dataset"]
    assert meta["packages"]["torch"] and meta["packages"]["numpy"]
    assert set(meta["git"]) == {"commit", "dirty"}
    assert meta["config"]["model"]["index_topk"] == demo_bundle().args.index_topk
    assert meta["skipped"] == (summary.skipped or {})
    return summary, meta, records
