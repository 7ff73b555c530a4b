"""kvtier's traces through the standalone §5.2 / §5.3 checker (``spec52.py``, written from the
design note alone): the live tracer on both paths, replays through the tier emulator,
Parquet round trips and ``kvtier generate``'s trace. Runner and demo outputs go through it
in their own tests (``run_helpers.check_run``, ``test_demo``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spec52 import check_record, check_trace_dir

from kvtier.cli import main

OLD = Path(__file__).parent / "data" / "old_format"


@pytest.mark.parametrize("no_numba", ["0", "1"])
@pytest.mark.parametrize("extra", [[], ["--trace-store-scores"], ["--kv-block-size", "7"],
                                   ["--trace-sample-rate", "0.5"]])
def test_sanity_traces_conform(tmp_path, monkeypatch, no_numba, extra):
    monkeypatch.setenv("KVTIER_NO_NUMBA", no_numba)
    out = tmp_path / "s"
    assert main(["sanity", "--out", str(out), "--requests", "5", "--batch-size", "2",
                 "--layers", "3", "--new-tokens", "4", *extra]) == 0
    assert check_trace_dir(out) == []


def test_the_numba_tracer_path_conforms(tmp_path, monkeypatch):
    """kvtier sanity passes scores (the numpy path); a run without scores takes the numba
    kernel where numba is installed."""
    import numpy as np

    from kvtier.trace.settings import TraceSettings
    from kvtier.trace.tracer import Tracer

    pytest.importorskip("numba")
    monkeypatch.delenv("KVTIER_NO_NUMBA", raising=False)
    rng = np.random.default_rng(0)
    with Tracer(TraceSettings(prefix_key_tokens=64), tmp_path / "t", run_name="r", dataset="d",
                kv_bytes_per_token=656) as tr:
        for _ in range(2):
            tr.begin_batch(None, [[7] * 80 + rng.integers(0, 9, 40).tolist() for _ in range(3)])
            for step in range(120, 124):
                tr.start_step(step, [True, step != 121, True])
                for layer in range(4):
                    tr.on_topk(layer, np.stack([rng.choice(step + 1, 64, replace=False)
                                                for _ in range(3)]))
                tr.end_step(1e-3)
            tr.end_batch()
    assert tr._kern is not None  # the kernel path wrote it
    assert check_trace_dir(tmp_path / "t") == []


@pytest.mark.parametrize("flags", [[], ["--tiers", "mooncake", "--hbm-blocks", "30"],
                                   ["--hbm-blocks", "20", "--fetch-granularity", "4"],
                                   ["--block-size", "32", "--hbm-blocks", "20"],
                                   ["--backend", "hbm"]])
def test_replayed_traces_conform(tmp_path, flags):
    src, out = tmp_path / "s", tmp_path / "r"
    assert main(["sanity", "--out", str(src), "--requests", "4", "--layers", "3"]) == 0
    assert main(["replay", str(src), "--out", str(out), "--no-progress", *flags]) == 0
    assert check_trace_dir(out) == []
    pools = [r for r in map(json.loads, (out / "trace_steps.jsonl").read_text().splitlines())
             if r["kv_fetch"]["local_pool"]["hit_blocks"] or r["kv_fetch"]["remote_pool"]["hit_blocks"]]
    if flags and flags[0] != "--backend":
        assert pools  # the tiers really split records


def test_parquet_round_trip_conforms(tmp_path):
    src = tmp_path / "s"
    assert main(["sanity", "--out", str(src), "--requests", "3", "--layers", "2"]) == 0
    assert main(["replay", str(src), "--out", str(tmp_path / "r"), "--hbm-blocks", "10",
                 "--no-progress"]) == 0
    for d in (src, tmp_path / "r"):
        assert main(["convert", str(d), str(d) + "-pq"]) == 0
        assert main(["convert", str(d) + "-pq", str(d) + "-back"]) == 0
        assert check_trace_dir(Path(str(d) + "-back")) == []


def test_the_checker_refuses_the_earlier_format():
    bad = check_trace_dir(OLD / "sanity")
    assert bad and any("request_id not an int" in b for b in bad)
    rec = json.loads((OLD / "sanity" / "trace_steps.jsonl").read_text().splitlines()[0])
    rec["request_id"] = 0
    assert any("hit_blocks not a list" in b for b in check_record(rec))
