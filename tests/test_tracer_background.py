"""The background record builder (``build_in_background``) against the synchronous one:
byte-identical traces and summaries, bounded and reported back-pressure, errors surfaced."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from kvtier.backend import HBMOnlyBackend
from kvtier.trace.reader import find_trace, iter_records
from kvtier.trace.settings import TraceSettings
from kvtier.trace.tracer import Tracer


def drive(tr: Tracer, seed: int, with_scores: bool, batches: int = 2, steps: int = 6) -> int:
    """A few batches of random decode steps; returns the number of records expected."""
    rng = np.random.default_rng(seed)
    n = 0
    for b in range(batches):
        ids = list(range(3 * b, 3 * b + 3))
        prompts = [rng.integers(0, 40, int(rng.integers(20, 90))).tolist() for _ in ids]
        tr.begin_batch(ids, prompts)
        for step in range(90, 90 + steps):
            active = rng.random(3) < 0.8
            tr.start_step(step, active.tolist())
            for layer in range(4):
                idx = np.stack([rng.choice(step + 1, 16, replace=False) for _ in ids])
                sc = rng.normal(size=idx.shape).astype(np.float32)
                tr.on_topk(layer, idx, sc if with_scores else None)
            tr.end_step(0.001 * step)
            n += 4 * int(active.sum())
        tr.end_batch()
    return n


@pytest.mark.parametrize("seed, with_scores", [(0, False), (1, True), (2, False)])
def test_background_builder_writes_the_same_trace(tmp_path, seed, with_scores):
    settings = TraceSettings(kv_block_size=16, store_scores=with_scores, sample_rate=0.7)
    files = {}
    for mode in ("never", "always"):
        out = tmp_path / mode
        tr = Tracer(settings, out, run_name="r", dataset="d", kv_bytes_per_token=10,
                    build_in_background=mode, max_pending_steps=2)
        n = drive(tr, seed, with_scores)
        with warnings.catch_warnings():  # a queue of 2 may fill up: waits are fine here
            warnings.simplefilter("ignore")
            summary = tr.close()
        assert summary is not None
        stats = tr.build_stats
        assert stats["background_steps" if mode == "always" else "caller_steps"] == 12
        files[mode] = (b"".join(f.read_bytes() for f in find_trace(out).files),
                       (out / "summary.json").read_bytes())
        assert 0 < len(list(iter_records(find_trace(out)))) <= n
    assert files["always"] == files["never"]


class SlowBackend(HBMOnlyBackend):
    def fetch(self, access):
        time.sleep(0.02)
        return super().fetch(access)


def test_backpressure_is_bounded_counted_and_reported(tmp_path):
    tr = Tracer(TraceSettings(), tmp_path / "t", run_name="r", dataset="d",
                backend=SlowBackend(10), build_in_background="always", max_pending_steps=1)
    t0 = time.perf_counter()
    n = drive(tr, 3, False, batches=1, steps=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.close()
    assert time.perf_counter() - t0 >= 6 * 4 * 0.02  # nothing was skipped to keep up
    assert tr.build_stats["waits"] >= 1 and tr.build_stats["wait_s"] > 0
    assert any("waited" in str(w.message) and "no step was dropped" in str(w.message)
               for w in caught)
    assert len(list(iter_records(find_trace(tmp_path / "t")))) == n


class FailingBackend(HBMOnlyBackend):
    calls = 0

    def fetch(self, access):
        FailingBackend.calls += 1
        if FailingBackend.calls == 3:
            raise OSError("pool unreachable")
        return super().fetch(access)


def test_builder_errors_reach_the_caller(tmp_path):
    tr = Tracer(TraceSettings(), tmp_path / "t", run_name="r", dataset="d",
                backend=FailingBackend(10), build_in_background="always")
    tr.begin_batch([0], [[1, 2, 3]])
    for step in (3, 4):  # 2 layers per step: the 3rd fetch (step 4) fails on the builder
        tr.start_step(step)
        tr.on_topk(0, np.array([[0, 1]]))
        tr.on_topk(1, np.array([[1, 2]]))
        tr.end_step(None)
    with pytest.raises(RuntimeError, match="record builder failed: pool unreachable"):
        tr.end_batch()  # waits for the queued steps, then raises
    tr.close()
    recs = list(iter_records(find_trace(tmp_path / "t")))
    assert [r.step_idx for r in recs] == [3, 3]  # the steps before the failure are kept


def test_bad_mode_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="build_in_background"):
        Tracer(TraceSettings(), tmp_path / "t", run_name="r", dataset="d", kv_bytes_per_token=1,
               build_in_background="sometimes")
