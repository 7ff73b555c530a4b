"""Single-tier simulation and the one-pass LRU miss-ratio curve."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.policies import load_policy
from kvtier.sim.access import rebucket
from kvtier.sim.cachesim import lru_mrc, simulate, stack_distances
from kvtier.sim.synth import SynthConfig, synth_stream


def ref_stack_distances(keys: list[int]) -> list[int]:
    stack: list[int] = []  # most recent first
    out = []
    for k in keys:
        if k in stack:
            d = stack.index(k)
            stack.pop(d)
        else:
            d = -1
        stack.insert(0, k)
        out.append(d)
    return out


def lru_hits(keys: np.ndarray, cap: int) -> int:
    return load_policy("lru")(cap).access_many(keys)


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.integers(0, 20), max_size=200))
def test_stack_distances_match_reference(keys):
    assert stack_distances(np.array(keys, dtype=np.int64)).tolist() == ref_stack_distances(keys)


def test_mrc_equals_per_capacity_lru_on_realistic_stream():
    keys = rebucket(synth_stream(SynthConfig(requests=3, layers=3, steps=20)), 16).keys()
    curve = lru_mrc(keys)
    ws = int(np.unique(keys).shape[0])
    assert curve.hits.shape[0] == ws + 1
    assert curve.accesses == keys.shape[0]
    for cap in sorted({0, 1, 2, 7, 50, 200, 333, ws // 2, ws - 1, ws, ws + 5}):
        assert curve.hits_at(cap) == lru_hits(keys, cap), cap
    # every capacity at once on a shorter prefix
    short = keys[:3000]
    c2 = lru_mrc(short)
    assert c2.hits.tolist() == [lru_hits(short, c) for c in range(c2.hits.shape[0])]
    # at the working set only cold misses remain
    assert curve.hits[-1] == keys.shape[0] - ws
    assert np.isclose(curve.miss_ratio[-1], ws / keys.shape[0])
    assert np.all(np.diff(curve.hits) >= 0)


def test_mrc_edge_cases():
    assert lru_mrc(np.zeros(0, np.int64)).hits.tolist() == [0]
    c = lru_mrc(np.array([7, 7, 7]))
    assert c.hits.tolist() == [0, 2]
    assert c.hits_at(np.array([0, 1, 5])).tolist() == [0, 2, 2]


def test_simulate_counts_and_context():
    bs = rebucket(synth_stream(SynthConfig(requests=2, layers=2, steps=10)), 64)
    keys = bs.keys()
    for name in ("lru", "fifo", "belady", "distance", "dsa_aware"):
        r = simulate(load_policy(name)(50), bs)
        assert r.accesses == keys.shape[0] and r.hits + r.misses == r.accesses
        assert 0.0 <= r.hit_ratio <= 1.0
    assert simulate(load_policy("lru")(50), keys).hits == simulate(load_policy("lru")(50), bs).hits


def test_simulate_context_policy_needs_block_stream():
    import pytest

    with pytest.raises(ValueError, match="needs context"):
        simulate(load_policy("distance")(4), np.arange(5))
