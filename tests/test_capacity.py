"""``kvtier.sim.capacity``: the working-set count behind every capacity share."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.sim import capacity
from kvtier.sim.access import rebucket
from kvtier.sim.capacity import working_set_blocks
from kvtier.sim.synth import SynthConfig, synth_stream


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("seed, bsz", [(0, 1), (1, 16), (2, 64), (3, 7)])
def test_working_set_count_equals_unique(monkeypatch, dense, seed, bsz):
    """The bitmap count (the fast path) and the sort both equal ``np.unique``."""
    s = synth_stream(SynthConfig(requests=3, layers=3, steps=6, prompt_len=400,
                                 prompt_jitter=100, topk=64, block_size=16, seed=seed))
    blocked = rebucket(s, bsz)
    want = int(np.unique(blocked.keys()).shape[0])
    sorts = []
    real_unique = np.unique
    monkeypatch.setattr(capacity.np, "unique", lambda x: sorts.append(1) or real_unique(x))
    if not dense:
        monkeypatch.setattr(capacity, "_DENSE_FACTOR", 0)
        monkeypatch.setattr(capacity, "_DENSE_FLOOR", 0)
    assert working_set_blocks(blocked) == want
    assert bool(sorts) is not dense  # the path under test was taken


def test_working_set_of_nothing():
    s = synth_stream(SynthConfig(requests=1, layers=1, steps=1, prompt_len=50, topk=8))
    s.offsets = np.zeros(1, np.int64)
    s.req = s.layer = s.step = s.seq_len = np.zeros(0, np.int64)
    s.pos = np.zeros(0, np.int64)
    assert working_set_blocks(rebucket(s, 16)) == 0
