"""The numba path of the tracer (kvtier.trace.step_numba) against the numpy path: same statistics,
byte-identical trace files and summaries. Skipped only where numba is not installed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trace_ref import ref_fields

from kvtier.backend import HBMOnlyBackend
from kvtier.schema import KVFetch, TierFetch
from kvtier.trace import step_numba
from kvtier.trace.intlist_json import encode_int_rows
from kvtier.trace.reader import find_trace, iter_records
from kvtier.trace.settings import TraceSettings
from kvtier.trace.step_numpy import compute_step_stats
from kvtier.trace.tracer import Tracer
from kvtier.trace.validate import validate_trace

pytest.importorskip("numba")  # the optional extra 'fast'

STAT_FIELDS = ("positions", "row_starts", "block_ids", "block_starts", "block_counts",
               "unique_blocks", "tpb_mean", "tpb_p50", "tpb_p95", "offset_min", "offset_p50",
               "offset_max", "n_prefix", "intersection", "ratio")


def assert_same_stats(a, b) -> None:
    for name in STAT_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert np.array_equal(x, y), name
    assert (a.positions_2d is None) == (b.positions_2d is None)
    for name in ("tpb_p50", "tpb_p95"):  # the count histograms may differ only in zero columns
        assert getattr(a, name).tolist() == getattr(b, name).tolist()
    w = min(a.count_hist.shape[1], b.count_hist.shape[1])
    assert np.array_equal(a.count_hist[:, :w], b.count_hist[:, :w])
    assert not a.count_hist[:, w:].any() and not b.count_hist[:, w:].any()


@st.composite
def step_rows(draw):
    seq_len = draw(st.integers(1, 700))
    n_rows = draw(st.integers(1, 6))
    k = draw(st.integers(1, 50))
    rows = [draw(st.lists(st.integers(-3, seq_len - 1), min_size=k, max_size=k)) for _ in range(n_rows)]
    for r in rows:
        if max(r) < 0:
            r[0] = draw(st.integers(0, seq_len - 1))
    bs = draw(st.sampled_from([1, 2, 3, 7, 16, 32, 64, 128, 256, 100]))
    n_prefix = draw(st.lists(st.integers(0, 30), min_size=n_rows, max_size=n_rows))
    return seq_len, np.array(rows, dtype=np.int64), bs, np.array(n_prefix)


@settings(max_examples=200, deadline=None)
@given(step_rows(), st.booleans())
def test_kernel_stats_equal_numpy_and_reference(case, bitmap):
    seq_len, idx, bs, n_prefix = case
    old = step_numba.BITMAP_MAX_SEQ
    step_numba.BITMAP_MAX_SEQ = old if bitmap else 0  # 0: the in-kernel sort path
    try:
        fast = compute_step_stats(idx, seq_len, bs, n_prefix, fast=True, scratch={})
    finally:
        step_numba.BITMAP_MAX_SEQ = old
    slow = compute_step_stats(idx.copy(), seq_len, bs, n_prefix, fast=False)
    assert_same_stats(fast, slow)
    for r in range(len(idx)):  # and the straightforward reference, independently
        ref = ref_fields(idx[r].tolist(), seq_len - 1, bs, int(n_prefix[r]))
        b0, b1 = fast.block_starts[r], fast.block_starts[r + 1]
        assert fast.block_ids[b0:b1].tolist() == ref["selected_block_ids"]
        assert fast.block_counts[b0:b1].tolist() == ref["block_counts"]
        assert fast.intersection[r] == ref["intersection_blocks"]


def test_kernel_errors_match_numpy():
    for bad, msg in ((np.array([[0, 5]]), "selected position 5 >= seq_len_current 5"),
                     (np.array([[1, 2], [-1, -1]]), "row 1 has no selected position")):
        for fast in (True, False):
            with pytest.raises(ValueError, match=msg):
                compute_step_stats(bad, 5, 16, np.zeros(len(bad)), fast=fast)


@pytest.mark.parametrize("width", range(2, 8))  # 8 would exceed intlist_json.MAX_VALUE
def test_digit_table_is_intlist_json_format(width):
    values = np.unique(np.concatenate([np.arange(min(10 ** (width - 1), 3000)),
                                       [10 ** (width - 1) - 1]]))
    table = step_numba.digit_table(width, int(values.max()) + 1)
    got = table[values].view(np.uint8).reshape(-1, 8)[:, :width].tobytes()
    buf, lo, hi = encode_int_rows(values[None, :])
    want = bytes(buf[lo[0]:hi[0] - 1]) + b","
    assert got == want
    assert json.loads(b"[" + got[:-1] + b"]") == values.tolist()


class SplitBackend(HBMOnlyBackend):
    """Serves a row's blocks from all three tiers (by block id mod 3, mod 2 or whole), so
    the tracer writes lists that are neither the whole row nor empty, with latencies."""

    name = "split"

    def fetch(self, access):
        out = []
        for i, blocks in enumerate(access.block_ids):
            mode = (access.step_idx + access.layer_id + i) % 3
            parts = ([blocks[blocks % 3 == t] for t in range(3)] if mode == 0 else
                     [blocks[blocks % 2 == 0], blocks[blocks % 2 == 1], blocks[:0]] if mode == 1
                     else [blocks[:0], blocks, blocks[:0]])
            tiers = [TierFetch(hit_blocks=p, bytes_read=7 * len(p), read_ops=len(p) // 2,
                               latency_us=None if not len(p) else 0.25 * (t + 1) + access.step_idx,
                               batch_size=len(p)) for t, p in enumerate(parts)]
            out.append(KVFetch(*tiers))
        return out


class GenericHBM(HBMOnlyBackend):
    """The HBM-only backend through the generic path (the tracer computes the plain
    HBMOnlyBackend's answer in closed form; a subclass goes through fetch)."""

    name = "hbm"


def _trace(tmp_path, name, steps, *, bs=16, sample_rate=1.0, shard=0, split=False,
           generic=False):
    """Run the tracer over ``steps`` = [(batch ids, prompts, [(start_pos, active, [layer
    arrays])])]; returns (trace bytes, summary text)."""
    out = tmp_path / name
    settings_ = TraceSettings(kv_block_size=bs, sample_rate=sample_rate, prefix_key_tokens=32,
                              shard_records=shard)
    with Tracer(settings_, out, run_name="r\u00e9", dataset="d", kv_bytes_per_token=7,
                backend=SplitBackend(7) if split else GenericHBM(7) if generic else None) as tr:
        for ids, prompts, decode in steps:
            tr.begin_batch(ids, prompts)
            for start, active, layers in decode:
                tr.start_step(start, active)
                for li, arr in enumerate(layers):
                    tr.on_topk(li * 3, arr)
                tr.end_step(None if start % 2 else 1.5e-3)
            tr.end_batch()
    data = b"".join(p.read_bytes() for p in sorted(out.glob("trace_steps*.jsonl")))
    return data, (out / "summary.json").read_text()


@st.composite
def runs(draw):
    shared = draw(st.lists(st.integers(0, 50), min_size=0, max_size=80))
    batches = []
    n_req = 0
    big = draw(st.booleans())  # positions past intlist_json.MAX_VALUE: the compact encoding
    for _ in range(draw(st.integers(1, 2))):
        n = draw(st.integers(1, 3))
        ids = list(range(n_req, n_req + n))
        n_req += n
        prompts = [shared + draw(st.lists(st.integers(0, 50), max_size=30)) for _ in range(n)]
        decode = []
        start = max(map(len, prompts)) + (1_000_000 if big else 0)
        k = min(draw(st.integers(1, 40)), start + 1)
        n_layers = draw(st.integers(1, 3))
        for s in range(draw(st.integers(1, 3))):
            seq = start + s + 1
            layers = []
            for _ in range(n_layers):
                if draw(st.booleans()):  # duplicates and padding
                    arr = np.array([draw(st.lists(st.integers(-1, min(seq - 1, 400)), min_size=k,
                                                  max_size=k)) for _ in range(n)])
                    arr[:, 0] = draw(st.integers(0, seq - 1))
                else:
                    arr = np.array([np.random.default_rng(draw(st.integers(0, 99))).choice(
                        seq, size=k, replace=False) for _ in range(n)])
                layers.append(arr.astype(draw(st.sampled_from([np.int64, np.int32]))))
            active = [draw(st.booleans()) for _ in range(n)] if n > 1 else None
            decode.append((start + s, active, layers))
        batches.append((ids, prompts, decode))
    bs = draw(st.sampled_from([1, 3, 16, 64, 128]))
    rate = draw(st.sampled_from([1.0, 0.5]))
    return batches, bs, rate, draw(st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs())
def test_trace_files_are_byte_identical(tmp_path_factory, monkeypatch, case):
    """Both paths write the same bytes, for the HBM-only backend (each hbm list is the row
    itself) and for a backend that splits rows over the tiers (lists of their own, empty
    lists, latencies), and every record passes validation."""
    batches, bs, rate, split = case
    tmp = tmp_path_factory.mktemp("t")
    monkeypatch.delenv("KVTIER_NO_NUMBA", raising=False)
    fast = _trace(tmp, "fast", batches, bs=bs, sample_rate=rate, split=split)
    monkeypatch.setenv("KVTIER_NO_NUMBA", "1")
    slow = _trace(tmp, "slow", batches, bs=bs, sample_rate=rate, split=split)
    assert fast[0] == slow[0]
    assert fast[1] == slow[1]
    rep = validate_trace(tmp / "fast")
    assert rep.ok, rep.messages
    if not split:  # the closed-form HBM-only answer == HBMOnlyBackend.fetch through RecordLists
        monkeypatch.delenv("KVTIER_NO_NUMBA", raising=False)
        assert _trace(tmp, "generic", batches, bs=bs, sample_rate=rate, generic=True) == fast


def test_bench_sized_step_is_identical_and_valid(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    prompts = [[7] * 3000, [7] * 2000 + [8] * 1000, [9] * 2500]
    decode = []
    for s in range(2):
        seq = 3001 + s
        layers = [np.argpartition(rng.random((3, seq)), 511, axis=1)[:, :512] for _ in range(4)]
        decode.append((3000 + s, None, layers))
    runs_ = [([0, 1, 2], prompts, decode)]
    fast = _trace(tmp_path, "fast", runs_)
    monkeypatch.setenv("KVTIER_NO_NUMBA", "1")
    slow = _trace(tmp_path, "slow", runs_)
    assert fast == slow
    recs = list(iter_records(find_trace(tmp_path / "fast")))
    assert len(recs) == 24 and all(len(r.selected_token_pos) == 512 for r in recs)
    assert any(r.prefix.prefix_cache_hit for r in recs)
    # x.5 medians and non-trivial floats went through the kernel's HALF / text fields
    line = fast[0].split(b"\n")[0]
    assert json.loads(line)["offset_p50"] == recs[0].offset_p50


def test_env_var_forces_numpy(monkeypatch):
    monkeypatch.setenv("KVTIER_NO_NUMBA", "1")
    assert step_numba.load() is None
    with pytest.raises(RuntimeError, match="needs numba"):
        compute_step_stats(np.array([[0]]), 1, 16, np.zeros(1), fast=True)
    monkeypatch.setenv("KVTIER_NO_NUMBA", "0")
    assert step_numba.load() is not None


@pytest.mark.parametrize("no_numba", ["0", "1"])
def test_bad_layers_fail_the_same_on_both_paths(tmp_path, monkeypatch, no_numba):
    """The numba path keeps bitmaps instead of copies: range, shape and padding errors must
    still name the layer / row as the numpy path does."""
    monkeypatch.setenv("KVTIER_NO_NUMBA", no_numba)
    tr = Tracer(TraceSettings(), tmp_path / "t", run_name="r", dataset="d", kv_bytes_per_token=1)
    tr.begin_batch([0, 1], [[1, 2, 3], [4, 5]])
    tr.start_step(3)
    with pytest.raises(ValueError, match="layer 4: selected position 9 >= seq_len_current 4"):
        tr.on_topk(4, np.array([[0, 9], [1, 2]]))
    tr.start_step(3)
    tr.on_topk(0, np.array([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match=r"layer 1: indices shape \[2, 3\] differs"):
        tr.on_topk(1, np.array([[0, 1, 2], [1, 2, 3]]))
    tr.start_step(3)
    tr.on_topk(0, np.array([[0, 1], [-1, -1]]))
    with pytest.raises(ValueError, match="row 1 has no selected position"):
        tr.end_step(None)
    tr.start_step(3)  # and the tracer still works afterwards
    for layer in range(9):  # more layers than the first buffer holds
        tr.on_topk(layer, np.array([[3, 1], [2, 2]], dtype=np.int32))
    tr.end_step(None)
    tr.close()
    recs = list(iter_records(find_trace(tmp_path / "t")))
    assert [r.selected_token_pos for r in recs[:2]] == [[1, 3], [2]]
    assert len(recs) == 18
