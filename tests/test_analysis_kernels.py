"""The analysis kernels (kvtier/analysis/kernels.py): the numba set equals the numpy set, and
both equal plain loops, on random chunks fed in several pieces (state carried across chunks,
tables that grow and move)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from kvtier.analysis.kernels import AMP_LEVELS, NUMPY, numba_kernels
from kvtier.analysis.state import IoUState, StepOrdinals, StreamState
from kvtier.policies.belady import BeladyPolicy
from kvtier.sim.cachesim import simulate

KERNELS = [pytest.param(NUMPY, id="numpy")]
if numba_kernels() is not None:
    KERNELS.append(pytest.param(numba_kernels(), id="numba"))


def random_chunk(rng, n, span, k_max, streams):
    """n records of sorted unique block ids in [0, span), stream ids in [0, streams)."""
    sid = rng.integers(0, streams, n).astype(np.int64)
    lens = rng.integers(1, k_max + 1, n)
    blocks = [np.sort(rng.choice(span, min(int(x), span), replace=False)) for x in lens]
    boff = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([b.shape[0] for b in blocks], out=boff[1:])
    return sid, boff, np.concatenate(blocks).astype(np.int64)


def ref_lru(sid, boff, blocks, caps, caches):
    hits = np.zeros(len(caps), dtype=np.int64)
    for i in range(sid.shape[0]):
        for b in blocks[boff[i]:boff[i + 1]].tolist():
            for j, c in enumerate(caps):
                cache = caches.setdefault((int(sid[i]), j), OrderedDict())
                if b in cache:
                    hits[j] += 1
                    cache.move_to_end(b)
                else:
                    cache[b] = True
                    if len(cache) > c:
                        cache.popitem(last=False)
    return hits


@pytest.mark.parametrize("kern", KERNELS)
@pytest.mark.parametrize("seed", range(6))
def test_stream_lru_equals_ordereddict(kern, seed):
    rng = np.random.default_rng(seed)
    caps = np.array(sorted(set(rng.integers(1, 12, 4).tolist()) | {1}), dtype=np.int64)
    st = StreamState(4, caps)
    caches: dict = {}
    total = np.zeros(caps.shape[0], dtype=np.int64)
    expect = np.zeros(caps.shape[0], dtype=np.int64)
    span = 6
    ords = StepOrdinals()
    hist = np.zeros(3, dtype=np.int64)
    t = 0
    for _ in range(8):  # block ids grow over the chunks, so tables move
        sid, boff, blocks = random_chunk(rng, 40, span, 5, 4)
        step = np.arange(t, t + 40, dtype=np.int64)
        t += 40
        st.prepare(sid, boff, blocks)
        jacc, ws = np.empty(40), np.zeros((40, 1), dtype=np.int64)
        kern.stream_pass(st, sid, step, ords(sid, step), boff, blocks, np.array([1]), 2, hist,
                         jacc, ws, caps, total)
        expect += ref_lru(sid, boff, blocks, caps.tolist(), caches)
        assert total.tolist() == expect.tolist()
        span += 30


@pytest.mark.parametrize("kern", KERNELS)
@pytest.mark.parametrize("seed", range(4))
def test_stream_pass_equals_loops(kern, seed):
    rng = np.random.default_rng(seed)
    windows = np.array([1, 2, 5], dtype=np.int64)
    cap = 3
    st = StreamState(int(windows.max()), np.array([4], dtype=np.int64))
    hist = np.zeros(cap + 1, dtype=np.int64)
    last_step: dict = {}
    prev: dict = {}
    history: dict = {}
    ordn: dict = {}
    ref_hist = np.zeros(cap + 1, dtype=np.int64)
    ref_first = first = 0
    step_of = {}
    for chunk in range(6):
        sid, boff, blocks = random_chunk(rng, 30, 12 + 20 * chunk, 6, 3)
        # steps advance per stream; some records repeat the step (layers of one step)
        step = np.empty(sid.shape[0], dtype=np.int64)
        for i, s in enumerate(sid.tolist()):
            step_of[s] = step_of.get(s, 0) + int(rng.integers(0, 3))
            step[i] = step_of[s]
        sord = np.empty_like(step)
        for i, s in enumerate(sid.tolist()):
            o = ordn.get(s)
            if o is None or o[1] != step[i]:
                o = ordn[s] = ((o[0] + 1) if o else 0, int(step[i]))
            sord[i] = o[0]
        st.prepare(sid, boff, blocks)
        jacc = np.empty(sid.shape[0])
        ws = np.zeros((sid.shape[0], windows.shape[0]), dtype=np.int64)
        first += kern.stream_pass(st, sid, step, sord, boff, blocks, windows, cap, hist, jacc, ws,
                                  np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        for i, s in enumerate(sid.tolist()):
            bset = set(blocks[boff[i]:boff[i + 1]].tolist())
            if s in prev:
                assert jacc[i] == pytest.approx(len(prev[s] & bset) / len(prev[s] | bset))
            else:
                assert np.isnan(jacc[i])
            prev[s] = bset
            for b in sorted(bset):
                if (s, b) in last_step:
                    ref_hist[min(max(int(step[i]) - last_step[(s, b)], 0), cap)] += 1
                else:
                    ref_first += 1
                last_step[(s, b)] = int(step[i])
            history.setdefault(s, []).append((int(sord[i]), bset))
            for j, w in enumerate(windows.tolist()):
                want = set().union(*[bb for o, bb in history[s] if o > sord[i] - w])
                assert ws[i, j] == len(want)
        assert hist.tolist() == ref_hist.tolist() and first == ref_first


@pytest.mark.parametrize("kern", KERNELS)
def test_iou_pass_equals_sets(kern):
    rng = np.random.default_rng(3)
    st = IoUState()
    prev: dict = {}
    g = 0
    for chunk in range(5):
        n = 40
        req, boff, blocks = random_chunk(rng, n, 10 + 15 * chunk, 6, 3)
        step = np.array([chunk * 10 + i // 12 for i in range(n)], dtype=np.int64)
        layer = rng.integers(0, 4, n).astype(np.int64)
        gidx = np.arange(g, g + n, dtype=np.int64)
        g += n
        st.prepare(req, boff, blocks)
        iou = np.empty(n)
        kern.iou_pass(st, req, gidx, step, layer, boff, blocks, iou)
        for i in range(n):
            r = int(req[i])
            bset = set(blocks[boff[i]:boff[i + 1]].tolist())
            p = prev.get(r)
            if p is not None and p[0] == step[i] and p[1] == layer[i] - 1:
                assert iou[i] == pytest.approx(len(p[2] & bset) / len(p[2] | bset))
            else:
                assert np.isnan(iou[i])
            prev[r] = (int(step[i]), int(layer[i]), bset)


def positions(rng, n, ctx):
    seq = rng.integers(ctx // 4, ctx, n).astype(np.int64)
    pos = [np.sort(rng.choice(s, int(rng.integers(1, min(s, 300) + 1)), replace=False))
           for s in seq]
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([p.shape[0] for p in pos], out=off[1:])
    return np.concatenate(pos).astype(np.int64), off, seq


@pytest.mark.parametrize("seed", range(4))
def test_records_pass_equals_loops(seed):
    rng = np.random.default_rng(seed)
    pos, off, seq = positions(rng, 50, 5000)
    edges = np.array([0, 1, 3, 10, 100, 4000], dtype=np.int64)
    cut = rng.integers(0, 500, 50).astype(np.int64)
    wins = np.array([0, 2, 9], dtype=np.int64)
    sizes = [1, 7, 16, 64]
    # one record with a position past seq_len
    pos[off[4] - 1] = seq[3] + 5  # still ascending
    sets = [k for k in (NUMPY, numba_kernels()) if k is not None]
    for kern in sets:
        rp = kern.records_pass(pos, off, seq, edges, cut, sizes, wins, {})
        assert rp.bad.tolist() == [i == 3 for i in range(50)] and not rp.unsorted
        for i in range(50):
            p = pos[off[i]:off[i + 1]]
            offs = seq[i] - 1 - p
            assert rp.ge[i].tolist() == [int((offs >= e).sum()) for e in edges]
            assert rp.amp[i].tolist() == [len(set((p >> lv).tolist())) for lv in range(AMP_LEVELS)]
            assert rp.below[i] == int((p < cut[i]).sum())
        for bs in sizes:
            boff, blocks, counts, span, slogc, gini, nearb, sumdist = rp.blocks[bs]
            for i in range(50):
                if i == 3:
                    continue
                p = pos[off[i]:off[i + 1]]
                b, c = np.unique(p // bs, return_counts=True)
                assert blocks[boff[i]:boff[i + 1]].tolist() == b.tolist()
                assert counts[boff[i]:boff[i + 1]].tolist() == c.tolist()
                assert span[i] == b[-1] - b[0] + 1
                assert slogc[i] == pytest.approx(float((c * np.log(c)).sum()))
                xs = np.sort(c)
                u = xs.shape[0]
                g = 2 * (np.arange(1, u + 1) * xs).sum() / (u * xs.sum()) - (u + 1) / u
                assert gini[i] == pytest.approx(g, abs=1e-12)
                cur = (seq[i] - 1) // bs
                assert nearb[i].tolist() == [int((cur - b <= w).sum()) for w in wins]
                assert sumdist[i] == int((cur - b).sum())
        swapped = pos.copy()
        swapped[off[5]], swapped[off[5] + 1] = swapped[off[5] + 1], swapped[off[5]]
        assert kern.records_pass(swapped, off, seq, edges, cut, sizes, wins).unsorted


@pytest.mark.parametrize("seed", range(4))
def test_opt_and_sampling_kernels(seed):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 60, 3000).astype(np.int64) * 7919
    caps = np.array([0, 1, 5, 20, 59, 100], dtype=np.int64)
    want = [simulate(BeladyPolicy(int(c)), keys).hits if c else 0 for c in caps]
    for kern in (k for k in (NUMPY, numba_kernels()) if k is not None):
        assert kern.opt_hits(keys, caps).tolist() == want
    req = rng.integers(0, 5, 30).astype(np.int64)
    layer = rng.integers(0, 61, 30).astype(np.int64)
    _, boff, blocks = random_chunk(rng, 30, 100, 8, 1)
    for thr in (1 << 24, 1 << 22, 12345, 1):
        out = [k.sample_keys(req, layer, boff, blocks, thr).tolist()
               for k in (NUMPY, numba_kernels()) if k is not None]
        assert all(o == out[0] for o in out)
    full = NUMPY.sample_keys(req, layer, boff, blocks, 1 << 24)
    assert full.shape[0] == blocks.shape[0]
