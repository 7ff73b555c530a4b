"""Ctrl-C during a run: the trace and summary.json describe the same records, run_meta.json
says the run was interrupted, and the KeyboardInterrupt reaches the caller (exit 130)."""

from __future__ import annotations

import json

import msgspec
import pytest
from run_helpers import demo_bundle, read_meta, read_summary, trace_lines

from kvtier.runners.requests import Request, Workload
from kvtier.runners.run import RunOptions, execute
from kvtier.trace.settings import TraceSettings
from kvtier.trace.summary import recompute_summary
from kvtier.trace.tracer import Tracer
from kvtier.trace.validate import validate_trace


def _interrupt_after(monkeypatch, n_calls: int, warm_up: bool = False) -> None:
    """KeyboardInterrupt from inside the model after the n-th layer's top-k (mid-step) of
    the run's tracer (``warm_up``: of the warm-up's throw-away tracer)."""
    original = Tracer.on_topk
    calls = {"n": 0}

    def on_topk(self, layer_id, indices, scores=None):
        original(self, layer_id, indices, scores)
        if (self.run_name == "warmup") != warm_up:
            return
        calls["n"] += 1
        if calls["n"] == n_calls:
            raise KeyboardInterrupt

    monkeypatch.setattr(Tracer, "on_topk", on_topk)


def _check_consistent(out, empty: bool = False):
    from spec52 import check_trace_dir

    report = validate_trace(out)
    assert report.ok, report.messages
    assert check_trace_dir(out) == (["0 records"] if empty else [])
    summary = read_summary(out)
    assert summary.records == len(trace_lines(out)) == report.records
    again = recompute_summary(out, keep_from=summary)
    assert msgspec.to_builtins(again) == msgspec.to_builtins(summary)
    meta = read_meta(out)
    assert meta["status"] == "interrupted" and meta["interrupted"] is True
    return summary, meta


def test_interrupt_mid_step_keeps_trace_and_summary_consistent(tmp_path, monkeypatch):
    bundle = demo_bundle()
    layers = bundle.args.n_layers
    wl = Workload("chat", [
        Request("r0", messages=[{"role": "user", "content": "Tell me a story about a cat."}]),
        Request("r1", messages=[{"role": "user", "content": "And one about a dog."}]),
    ])  # fmt: skip
    # 3 whole decode steps, then Ctrl-C after 2 layers of the 4th: that step is dropped
    _interrupt_after(monkeypatch, 3 * layers + 2)
    opts = RunOptions(dataset="chat", out_dir=tmp_path / "out", run_name="int",
                      max_new_tokens=10, limit=None)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        execute(opts, wl, bundle, TraceSettings())
    summary, meta = _check_consistent(tmp_path / "out")
    assert summary.records == 3 * layers
    assert meta["requests_run"] == 0 and meta["requests_prepared"] == 2


def test_interrupt_during_serving_replay(tmp_path, monkeypatch):
    bundle = demo_bundle()
    layers = bundle.args.n_layers
    wl = Workload("burstgpt", [
        Request(f"b{i}", prompt_len=6 + i, max_new_tokens=3, arrival_s=float(i)) for i in range(3)
    ])  # fmt: skip
    # the first request is served (2 decode steps), the second is interrupted mid-step
    _interrupt_after(monkeypatch, 2 * layers + 1)
    opts = RunOptions(dataset="burstgpt", out_dir=tmp_path / "out", run_name="int",
                      max_new_tokens=3, limit=None, serving=True)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        execute(opts, wl, bundle, TraceSettings())
    summary, meta = _check_consistent(tmp_path / "out")
    assert summary.records == 2 * layers
    rows = [json.loads(x) for x in (tmp_path / "out" / "serving_requests.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in rows] == ["b0"]
    assert summary.serving.requests == 1 == meta["requests_run"]


def test_interrupt_during_warm_up(tmp_path, monkeypatch):
    """Ctrl-C in the warm-up: nothing was measured or traced; the run says interrupted."""
    bundle = demo_bundle()
    wl = Workload("chat", [Request("r0", messages=[{"role": "user", "content": "Hi."}])])
    _interrupt_after(monkeypatch, 1, warm_up=True)
    opts = RunOptions(dataset="chat", out_dir=tmp_path / "out", run_name="int",
                      max_new_tokens=4, limit=None)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        execute(opts, wl, bundle, TraceSettings())
    summary, meta = _check_consistent(tmp_path / "out", empty=True)
    assert summary.records == 0 and meta["requests_run"] == 0 and meta["warmup_s"] is None
