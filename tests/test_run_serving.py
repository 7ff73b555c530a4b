"""The live serving replay's scheduler, per-row caps and fetch timing, against straightforward
references (no model: ``serve`` returns service times)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.runners.prepare import Prepared
from kvtier.runners.requests import Request
from kvtier.runners.run import CappedTracer, FetchTimer
from kvtier.runners.serving import latency_ms, replay, serving_section
from kvtier.runners.serving_sim import StepCostModel, simulate
from kvtier.schema import KVFetch, TierFetch, empty_tier


def _items(arrivals, lens=None):
    lens = lens or [4] * len(arrivals)
    return [
        Prepared(Request(f"r{i}", prompt_len=n, arrival_s=float(a)), [7] * n, 1)
        for i, (a, n) in enumerate(zip(arrivals, lens, strict=True))
    ]


def _reference_fifo(arrivals, batch_size, service):
    """A plain event loop: server idle -> jump to the next arrival; take every arrived
    request, oldest first, up to batch_size; a batch takes service(len(batch))."""
    order = sorted(range(len(arrivals)), key=lambda i: (arrivals[i], i))
    t, start, finish, k = 0.0, {}, {}, 0
    while k < len(order):
        t = max(t, arrivals[order[k]])
        batch = [i for i in order[k:] if arrivals[i] <= t][:batch_size]
        d = service(len(batch))
        for i in batch:
            start[i], finish[i] = t, t + d
        t += d
        k += len(batch)
    return start, finish


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.integers(0, 20), min_size=1, max_size=25),
    batch_size=st.integers(1, 4),
    scale=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
)
def test_replay_matches_reference_loop(arrivals, batch_size, scale):
    items = _items(arrivals)
    service = lambda n: 1.5 + 0.25 * n  # noqa: E731
    done = replay(items, batch_size, scale, lambda b: service(len(b)))
    scaled = [(a - min(arrivals)) * scale for a in arrivals]
    start, finish = _reference_fifo(scaled, batch_size, service)
    by_id = {c.sample_id: c for c in done}
    assert len(done) == len(items)
    for i in range(len(items)):
        c = by_id[f"r{i}"]
        assert c.arrival_s == pytest.approx(scaled[i])
        assert c.start_s == pytest.approx(start[i])
        assert c.finish_s == pytest.approx(finish[i])
        assert c.latency_s == pytest.approx(c.queue_s + (c.finish_s - c.start_s))
        assert c.queue_s >= -1e-12


@settings(max_examples=30, deadline=None)
@given(arrivals=st.lists(st.integers(0, 30), min_size=1, max_size=20),
       batch_size=st.integers(1, 4))  # fmt: skip
def test_replay_agrees_with_model_free_sim(arrivals, batch_size):
    """With a constant batch time, the live replay and serving_sim's simpy server (written
    independently) schedule identically."""
    items = _items(arrivals)
    done = replay(items, batch_size, 1.0, lambda b: 2.0)
    sim = simulate([it.request for it in items], StepCostModel(prefill_base_s=2.0),
                   batch_size=batch_size, max_new_tokens=1)  # fmt: skip
    ref = {rid: (s, f) for rid, s, f in zip(sim.request_ids, sim.start_s, sim.finish_s, strict=True)}
    for c in done:
        assert (c.start_s, c.finish_s) == pytest.approx(ref[c.sample_id])
    assert serving_section(done, batch_size, 1).latency_ms == sim.serving().latency_ms


def test_latency_percentiles_and_empty():
    lat = np.array([0.010, 0.020, 0.030, 0.500])
    got = latency_ms(lat)
    assert got.p50 == pytest.approx(25.0) and got.max == pytest.approx(500.0)
    assert got.p99 == pytest.approx(np.percentile(lat * 1e3, 99))
    empty = latency_ms([])
    assert empty.p50 is None and empty.max is None
    assert serving_section([], 2, 8).requests == 0


def test_replay_rejects_bad_config():
    with pytest.raises(ValueError, match="batch_size"):
        replay(_items([0]), 0, 1.0, lambda b: 1.0)
    with pytest.raises(ValueError, match="time-scale"):
        replay(_items([0]), 1, -1.0, lambda b: 1.0)


class _Recorder:
    def __init__(self):
        self.active = []

    def begin_batch(self, ids, prompts):
        pass

    def start_step(self, start_pos, active):
        self.active.append((start_pos, list(active)))

    def on_topk(self, *a):
        pass

    def end_step(self, wall):
        pass

    def end_batch(self):
        pass


def test_capped_tracer_marks_rows_done_at_their_own_cap():
    inner = _Recorder()
    lens, caps = [5, 3, 5], [4, 2, 1]
    t = CappedTracer(inner, lens, caps)
    for pos in range(3, 10):
        t.start_step(pos, [pos >= n for n in lens])  # generate's mask: prompt consumed
    for pos, act in inner.active:
        # a lone prompt of length L generating N tokens is decoded at L .. L+N-2
        assert act == [lens[i] <= pos <= lens[i] + caps[i] - 2 for i in range(3)]


class _FixedBackend:
    name = "fake"

    def __init__(self, rows):
        self.rows = rows

    def fetch(self, access):
        def tier(us):
            return TierFetch(hit_blocks=1, bytes_read=1, read_ops=1, latency_us=us, batch_size=1)

        return [KVFetch(hbm=tier(999.0), local_pool=tier(a) if a is not None else empty_tier(),
                        remote_pool=tier(b) if b is not None else empty_tier())
                for a, b in self.rows]  # fmt: skip


def test_fetch_timer_adds_the_slowest_pool_read():
    # pools are read concurrently: the step waits for the slowest one, not their sum
    timer = FetchTimer(_FixedBackend([(3.0, None), (1.0, 4.0), (None, None)]))
    timer.fetch(None)
    timer.fetch(None)
    assert timer.take_us() == pytest.approx(2 * 4.0)  # HBM latency is not added
    assert timer.take_us() == 0.0


def test_fetch_timer_prefers_the_backends_own_stall():
    class _Stalling(_FixedBackend):
        stall_total = 0.0

        def fetch(self, access):
            self.stall_total += 7.0
            return super().fetch(access)

    timer = FetchTimer(_Stalling([(3.0, 100.0)]))
    timer.fetch(None)
    assert timer.take_us() == pytest.approx(7.0)


class _AccessLog:
    name = "log"

    def __init__(self):
        self.accesses, self.events = [], []

    def admit(self, rid, prompt_len, prefix_hashes=()):
        self.events.append(("admit", rid, prompt_len))

    def append(self, rid, n=1):
        self.events.append(("append", rid, n))

    def release(self, rid):
        self.events.append(("release", rid))

    def fetch(self, access):
        self.accesses.append(access)
        t = TierFetch(hit_blocks=0, bytes_read=0, read_ops=0, latency_us=2.0, batch_size=1)
        return [KVFetch(hbm=empty_tier(), local_pool=t, remote_pool=empty_tier())
                for _ in access.request_ids]  # fmt: skip


def test_synthetic_selections_are_dsa_shaped():
    from kvtier.runners.synthetic_kv import SelectionShape, SyntheticFetchTime

    log = _AccessLog()
    shape = SelectionShape(topk=40, sink=4, window=8)
    hook = SyntheticFetchTime(log, {"a": 100, "b": 20}, {"a": 5, "b": 5}, n_layers=3,
                              block_size=16, shape=shape, seed=1)  # fmt: skip
    assert hook(["a", "b"], 0) == pytest.approx(3 * 2e-6)  # slowest row per layer
    hook(["a"], 1)
    hook.release("a")
    assert [e[0] for e in log.events] == ["admit", "admit", "append", "append", "append", "release"]
    first, later = log.accesses[:3], log.accesses[3:]
    for acc in first:
        a_pos, b_pos = acc.token_pos
        assert len(a_pos) == 40 and np.all(np.diff(a_pos) > 0)  # top-k of 101 tokens
        assert set(range(4)) <= set(a_pos.tolist()) and set(range(93, 101)) <= set(a_pos.tolist())
        assert b_pos.tolist() == list(range(21))  # context <= topk: dense
        assert acc.block_ids[0].tolist() == np.unique(a_pos // 16).tolist()
    assert [acc.layer_id for acc in log.accesses] == [0, 1, 2, 0, 1, 2]
    assert all(acc.token_pos[0].max() == 101 for acc in later)  # context grew by one
