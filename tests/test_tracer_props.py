"""Property tests: vectorised block mapping, statistics and int-list encoding vs references."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from trace_ref import pct, ref_fields

from kvtier.trace.intlist_json import encode_int_rows
from kvtier.trace.percentiles import (
    distribution,
    hist_distribution,
    percentile_hist_rows,
    percentile_sorted_rows,
)
from kvtier.trace.step_numpy import compute_step_stats


@st.composite
def step_rows(draw):
    seq_len = draw(st.integers(1, 300))
    n_rows = draw(st.integers(1, 5))
    k = draw(st.integers(1, 40))
    rows = [draw(st.lists(st.integers(-1, seq_len - 1), min_size=k, max_size=k)) for _ in range(n_rows)]
    for r in rows:  # every row keeps at least one real position
        if max(r) < 0:
            r[0] = draw(st.integers(0, seq_len - 1))
    bs = draw(st.sampled_from([1, 3, 16, 64]))
    n_prefix = draw(st.lists(st.integers(0, 20), min_size=n_rows, max_size=n_rows))
    return seq_len, np.array(rows, dtype=np.int64), bs, np.array(n_prefix)


@settings(max_examples=150, deadline=None)
@given(step_rows())
def test_step_stats_match_reference(case):
    seq_len, idx, bs, n_prefix = case
    scores = np.arange(idx.size, dtype=np.float64).reshape(idx.shape) / 7.0
    st_ = compute_step_stats(idx, seq_len, bs, n_prefix, scores, keep_scores=True)
    for r in range(len(idx)):
        ref = ref_fields(idx[r].tolist(), seq_len - 1, bs, int(n_prefix[r]), scores[r].tolist())
        p0, p1 = st_.row_starts[r], st_.row_starts[r + 1]
        b0, b1 = st_.block_starts[r], st_.block_starts[r + 1]
        assert st_.positions[p0:p1].tolist() == ref["selected_token_pos"]
        assert st_.block_ids[b0:b1].tolist() == ref["selected_block_ids"]
        assert st_.block_counts[b0:b1].tolist() == ref["block_counts"]
        assert st_.unique_blocks[r] == ref["unique_blocks"]
        assert st_.offset_min[r] == ref["offset_min"] and st_.offset_max[r] == ref["offset_max"]
        assert math.isclose(st_.offset_p50[r], ref["offset_p50"], rel_tol=1e-12)
        for got, want in zip((st_.tpb_mean[r], st_.tpb_p50[r], st_.tpb_p95[r]), ref["tpb"], strict=True):
            assert math.isclose(got, want, rel_tol=1e-12)
        assert st_.intersection[r] == ref["intersection_blocks"]
        assert st_.scores[p0:p1].tolist() == ref["scores"]
        # exact agreement with numpy's percentile (the project-wide definition)
        counts = np.array(ref["block_counts"])
        assert st_.tpb_p95[r] == np.percentile(counts, 95)
        assert st_.offset_p50[r] == np.percentile(seq_len - 1 - np.array(ref["selected_token_pos"]), 50)
    rows, blocks = st_.prefix_touches()
    for r in range(len(idx)):
        b0 = st_.block_starts[r]
        assert blocks[rows == r].tolist() == st_.block_ids[b0:b0 + st_.intersection[r]].tolist()
    sub = st_.subset(np.array([len(idx) - 1]))
    assert sub.positions.tolist() == st_.positions[st_.row_starts[-2]:].tolist()
    assert sub.block_counts.tolist() == st_.block_counts[st_.block_starts[-2]:].tolist()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 999_999), min_size=1, max_size=30), min_size=1, max_size=6),
       st.booleans())
def test_int_rows_encode_as_json(rows, as_2d):
    if as_2d:
        k = min(map(len, rows))
        rows = [r[:k] for r in rows]
        buf, lo, hi = encode_int_rows(np.array(rows, dtype=np.int64))
    else:
        starts = np.concatenate(([0], np.cumsum([len(r) for r in rows])))
        buf, lo, hi = encode_int_rows(np.concatenate([np.array(r) for r in rows]), starts)
    for r, a, b in zip(rows, lo, hi, strict=True):
        assert json.loads(b"[" + bytes(buf[a:b])) == r


def test_int_rows_widest_values():
    for rows in ([[0, 999_999, 5], [10, 100, 99_999]], [[0, 2**40, 5], [10, 100, 1_000_000]]):
        buf, lo, hi = encode_int_rows(np.array(rows))
        assert [json.loads(b"[" + bytes(buf[a:b])) for a, b in zip(lo, hi, strict=True)] == rows
        starts = np.array([0, 3, 6])
        buf, lo, hi = encode_int_rows(np.array(rows).ravel(), starts)
        assert [json.loads(b"[" + bytes(buf[a:b])) for a, b in zip(lo, hi, strict=True)] == rows
    for bad in (np.array([[-1]]), np.zeros((1, 0), np.int64)):
        try:
            encode_int_rows(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} was accepted")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=0, max_size=60))
def test_hist_distribution_equals_sample_distribution(xs):
    d = hist_distribution(np.bincount(np.array(xs, dtype=np.int64), minlength=1))
    ref = distribution(np.array(xs))
    assert d.count == ref.count
    if xs:
        s = sorted(xs)
        assert (d.min, d.max) == (s[0], s[-1])
        assert d.p50 == ref.p50 and d.p95 == ref.p95
        assert math.isclose(d.p95, pct(s, 95), rel_tol=1e-12)
        assert math.isclose(d.mean, sum(s) / len(s), rel_tol=1e-12)
    else:
        assert d.p50 is None and d.mean is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 16), min_size=1, max_size=20), min_size=1, max_size=5),
       st.floats(0, 100))
def test_row_percentiles_equal_numpy(rows, q):
    flat = np.concatenate([np.sort(r) for r in rows])
    starts = np.concatenate(([0], np.cumsum([len(r) for r in rows])))
    hist = np.stack([np.bincount(r, minlength=17) for r in rows])
    want = [np.percentile(r, q) for r in rows]
    assert percentile_sorted_rows(flat, starts, q).tolist() == want
    assert percentile_hist_rows(hist, q).tolist() == want
