"""A step's records as JSONL bytes, written two ways that give the same bytes.

``NumpyRecords`` formats each record with the bytes templates of ``record_layout.SEGMENTS``
around its int lists, which are spans of one encoded buffer per step (``kvtier.trace.intlist_json``);
``NumbaRecords`` (records without scores, numba installed) runs ``record_layout``'s program in
one kernel that writes every record of the step into one buffer. tests/test_tracer_fast.py
checks the two byte for byte. Both hand the written records' statistics to the summary and the
bytes to the trace writer uncopied; the buffers come from, and once on disk go back to, one
``BufferPool``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple

import msgspec
import numpy as np

from kvtier.schema import TIER_NAMES
from kvtier.trace import step_numba
from kvtier.trace.intlist_json import encode_int_rows
from kvtier.trace.prefix import PrefixState
from kvtier.trace.record_layout import (
    CLOSE,
    FAST_KINDS,
    FAST_LIT_STARTS,
    FAST_LITS,
    FIELD,
    SEGMENTS,
    digit_table,
    list_width,
)
from kvtier.trace.record_lists import RecordLists
from kvtier.trace.step_numpy import StepStats
from kvtier.trace.summary import SummaryBuilder
from kvtier.trace.writer import TraceWriter

_NO_HIST = np.zeros(1, np.int64)  # emit_records' offset histogram when step_rows counted already


class BufferPool:
    """Output buffers the writer has finished with. Reusing them spares the fresh pages (page
    faults) of a few MB per step; a buffer returns here (a deque: appends from the writer
    thread are atomic) once its bytes are on disk. Which buffer a step gets never changes
    what is written (tests/test_tracer_fast.py: the two paths, each with its own reuse,
    write the same bytes)."""

    def __init__(self) -> None:
        self.free: deque[np.ndarray] = deque()

    def take(self, size: int) -> np.ndarray:
        """A buffer of at least ``size`` bytes: a free one, or a new one."""
        free = self.free
        while free:
            buf = free.popleft()
            if len(buf) >= size:
                return buf
        return np.empty(int(size * 1.25), np.uint8)


def _owner(buf: np.ndarray) -> np.ndarray:
    """The array a buffer is a view of, to be reused as scratch by the next step (the fallback
    encoder returns a view of ``bytes``, which cannot be reused)."""
    if isinstance(buf.base, np.ndarray):
        return buf.base
    return buf if buf.flags.writeable else np.zeros(0, np.uint8)


class BatchRows(NamedTuple):
    """Per row of the admitted batch: the text of the record fields that are the same in all
    of its records, and its prefix block count."""

    head: list[bytes]  # '{"event":...,"request_id":<id>'
    cache_hit: list[bytes]  # b"true" / b"false"
    cached_blocks: list[int]
    prefix_key: list[bytes]  # b'"<hex>"' or b"null"
    n_prefix: np.ndarray  # prefix blocks (point D)

    @classmethod
    def of(cls, run_head: bytes, request_ids: Sequence[int],
           prefix_states: Sequence[PrefixState]) -> BatchRows:
        """``run_head`` is the record's text up to the request id (the same for the run)."""
        return cls([run_head + b"%d" % r for r in request_ids],
                   [b"true" if s.cache_hit else b"false" for s in prefix_states],
                   [s.cached_blocks for s in prefix_states],
                   [b"null" if s.key is None else b'"%s"' % s.key.encode() for s in prefix_states],
                   np.array([s.n_prefix_blocks for s in prefix_states], dtype=np.int64))


class NumpyRecords:
    """The numpy path: per record the ``SEGMENTS`` templates % (fields) around its lists."""

    def __init__(self, block_size: int, store_scores: bool, enc: msgspec.json.Encoder,
                 pool: BufferPool, summary: SummaryBuilder, writer: TraceWriter) -> None:
        self.block_size, self.store_scores, self.enc = block_size, store_scores, enc
        self.pool, self.summary, self.writer = pool, summary, writer

    def write(self, step: int, layer_ids: list[int], rows: np.ndarray, ids: list[int],
              sub: StepStats, sel: np.ndarray, lists: RecordLists, batch: BatchRows) -> None:
        """Write the kept records of one step: ``sel`` are their indices among the step's
        (layer, active row) pairs, layer-major, ``sub`` and ``lists`` their statistics and
        lists; ``rows`` the active batch rows and ``ids`` their request ids."""
        n_rows = len(rows)
        n_sel = len(sel)
        # the encoded lists are handed to the writer uncopied: their buffers come from (and,
        # once written, go back to) the pool of output buffers
        scratch = self.pool.take(8 * len(sub.positions) + 8)
        if sub.positions_2d is not None:
            pos_buf, pos_lo, pos_hi = encode_int_rows(sub.positions_2d, None, scratch)
        else:
            pos_buf, pos_lo, pos_hi = encode_int_rows(sub.positions, sub.row_starts, scratch)
        pos_mv = memoryview(pos_buf)
        pos_lo, pos_hi = pos_lo.tolist(), pos_hi.tolist()
        sel_list = sel.tolist()
        span_text, list_buf = lists.texts(self.pool.take(8 * len(lists.lv) + 8))
        # summary (only what is written, so `kvtier summarize` sees the same records)
        rec_ids = [ids[i % n_rows] for i in sel_list]
        prefix_rows, prefix_blocks = sub.prefix_touches()
        end = step + 1
        self.summary.add(rec_ids, sub.unique_blocks, sub.block_counts, None,
                         sub.ratio, prefix_rows, prefix_blocks,
                         offset_hist=np.bincount(sub.positions, minlength=end)[::-1])
        # python scalars for the per-record fields
        unique = sub.unique_blocks.tolist()
        n_unique_tok = np.diff(sub.row_starts).tolist()
        off_min = sub.offset_min.tolist()
        off_p50 = sub.offset_p50.tolist()
        off_max = sub.offset_max.tolist()
        tpb_mean, tpb_p50, tpb_p95 = sub.tpb_mean.tolist(), sub.tpb_p50.tolist(), sub.tpb_p95.tolist()
        ratio = sub.ratio.tolist()
        tiers = []
        for t in range(len(TIER_NAMES)):
            span = lists.tier_span[t].tolist()
            nbytes, ops, batch_size = (x.tolist() for x in lists.ints[t])
            lat = [lists.lat_texts[x] for x in lists.lat[t].tolist()]
            tiers.append((span, nbytes, ops, lat, batch_size))
        (h_sp, h_by, h_op, h_la, h_ba), (l_sp, l_by, l_op, l_la, l_ba), (r_sp, r_by, r_op, r_la, r_ba) = tiers
        if sub.scores_min is not None:
            smin, smean, smax = sub.scores_min.tolist(), sub.scores_mean.tolist(), sub.scores_max.tolist()
        else:
            smin = None
        store = self.store_scores and sub.scores is not None
        enc = self.enc
        # per active row: its head and its prefix facts (identical for every layer)
        row_list = rows.tolist()
        row_head = [batch.head[r] for r in row_list]
        row_prefix = [(batch.cache_hit[r], batch.cached_blocks[r], batch.prefix_key[r]) for r in row_list]
        bs = self.block_size
        s0_, s1_, s2_, s3_, s4_, s5_ = SEGMENTS
        pieces: list = []
        add = pieces.extend
        for j, i in enumerate(sel_list):
            li, r = divmod(i, n_rows)
            hit, cached, key = row_prefix[r]
            if smin is None:
                tail = CLOSE
            else:
                tail = b',"scores_stats":{"min":%r,"mean":%r,"max":%r}' % (smin[j], smean[j], smax[j])
                if store:
                    a, b = sub.row_starts[j], sub.row_starts[j + 1]
                    tail += b',"scores_topk":' + enc.encode(sub.scores[a:b].tolist())
                tail += b"}\n"
            add((
                s0_ % (row_head[r], layer_ids[li], step, end, n_unique_tok[j], off_min[j],
                       off_p50[j], off_max[j], bs),
                span_text[j],
                s1_ % (unique[j], tpb_mean[j], tpb_p50[j], tpb_p95[j]),
                span_text[h_sp[j]],
                s2_ % (h_by[j], h_op[j], h_la[j], h_ba[j]),
                span_text[l_sp[j]],
                s3_ % (l_by[j], l_op[j], l_la[j], l_ba[j]),
                span_text[r_sp[j]],
                s4_ % (r_by[j], r_op[j], r_la[j], r_ba[j], hit, cached, key, ratio[j]),
                span_text[n_sel + j],
                s5_,
                pos_mv[pos_lo[j]:pos_hi[j]],
                tail,
            ))
        # writev of the pieces: the lists go from their encoded buffers to the file uncopied
        owners = [_owner(b) for b in (pos_buf, list_buf) if b is not None]
        owners = [b for b in owners if len(b)]
        self.writer.write(pieces, n_sel, partial(self.pool.free.extend, owners))


class NumbaRecords:
    """The numba path for records without scores: one kernel writes every record of the step
    into one buffer (same bytes as ``NumpyRecords``; only float reprs, latency texts and the
    backend's answer are gathered in Python, with C-level maps)."""

    def __init__(self, kern: SimpleNamespace, block_size: int, pool: BufferPool,
                 summary: SummaryBuilder, writer: TraceWriter) -> None:
        self.kern, self.block_size = kern, block_size
        self.pool, self.summary, self.writer = pool, summary, writer

    def write(self, step: int, layer_ids: list[int], rows: np.ndarray, ids: list[int],
              sub: StepStats, sel: np.ndarray, lists: RecordLists, batch: BatchRows) -> None:
        """As ``NumpyRecords.write``."""
        n_rows = len(rows)
        n_sel = len(sel)
        end = step + 1
        # text spans: per active row (head, cache hit, key), latency texts, then float reprs
        row_list = rows.tolist()
        texts: list[bytes] = [batch.head[r] for r in row_list]
        texts.extend(batch.cache_hit[r] for r in row_list)
        texts.extend(batch.prefix_key[r] for r in row_list)
        lat0 = len(texts)
        texts.extend(lists.lat_texts)
        lens = [len(t) for t in texts]
        # floats: repr of each distinct value once (all are >= 0, so no -0.0 to tell apart)
        float_cols = []
        float_texts = []
        for arr in (sub.tpb_mean, sub.tpb_p95, sub.ratio):
            uniq, inv = np.unique(arr, return_inverse=True)
            strs = list(map(repr, uniq.tolist()))
            float_cols.append(len(lens) + inv)
            float_texts.append("".join(strs))
            lens.extend(map(len, strs))
        text_buf = np.frombuffer(b"".join(texts) + "".join(float_texts).encode() + bytes(8), np.uint8)
        text_starts = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=text_starts[1:])
        j = np.arange(n_sel, dtype=np.int64)
        li, r = np.divmod(sel, n_rows)
        kinds = FAST_KINDS.copy()
        vals = np.empty((n_sel, len(kinds)), np.int64)
        f = FIELD
        vals[:, f["head"]] = r
        vals[:, f["layer"]] = np.array(layer_ids, np.int64)[li]
        vals[:, f["step"]] = step
        vals[:, f["seq"]] = end
        vals[:, f["n_tok"]] = np.diff(sub.row_starts)
        vals[:, f["off_min"]] = sub.offset_min
        vals[:, f["off_max"]] = sub.offset_max
        vals[:, f["bs"]] = self.block_size
        vals[:, f["blocks"]] = j
        vals[:, f["unique"]] = sub.unique_blocks
        vals[:, f["tpb_mean"]] = float_cols[0]
        vals[:, f["tpb_p95"]] = float_cols[1]
        for t, name in enumerate(("hbm", "local", "remote")):
            vals[:, f[name]] = lists.tier_span[t]
            nbytes, ops, batch_size = lists.ints[t]
            vals[:, f[name + "_bytes"]] = nbytes
            vals[:, f[name + "_ops"]] = ops
            vals[:, f[name + "_lat"]] = lat0 + lists.lat[t]
            vals[:, f[name + "_batch"]] = batch_size
        vals[:, f["hit"]] = n_rows + r
        vals[:, f["cached"]] = np.array([batch.cached_blocks[x] for x in row_list], np.int64)[r]
        vals[:, f["key"]] = 2 * n_rows + r
        vals[:, f["ratio"]] = float_cols[2]
        vals[:, f["inter"]] = n_sel + j
        vals[:, f["pos"]] = j
        for col, arr in ((f["off_p50"], sub.offset_p50), (f["tpb_p50"], sub.tpb_p50)):
            twice = arr * 2.0
            if (twice >= 0).all() and (twice < 2.0**52).all() and (twice == np.floor(twice)).all():
                vals[:, col] = twice.astype(np.int64)
            else:  # not x.0 / x.5: Python's repr
                strs = [repr(x).encode() for x in arr.tolist()]
                base = len(text_starts) - 1
                text_buf = np.concatenate([text_buf[:-8], np.frombuffer(b"".join(strs) + bytes(8), np.uint8)])
                text_starts = np.concatenate([text_starts, text_starts[-1] + np.cumsum([len(x) for x in strs])])
                kinds[col] = step_numba.TEXT
                vals[:, col] = base + j
        pos_w = list_width(int(sub.positions[sub.row_starts[1:] - 1].max()))
        blk_w = lists.width
        row_max = max(map(len, texts[:3 * n_rows]))
        n_lists = len(lists.lv) + int(sub.intersection.sum()) + 2 * int(sub.block_starts[-1])
        bound = (n_sel * (len(FAST_LITS) + 24 * len(kinds) + 3 * row_max) + len(text_buf)
                 + len(sub.positions) * (pos_w or 21) + n_lists * (blk_w or 21) + 16)
        out = self.pool.take(bound)
        counted = sub.position_hist is not None
        ohist = sub.position_hist[::-1] if counted else np.zeros(end, np.int64)
        n_bytes = self.kern.emit_records(
            out, FAST_LITS, FAST_LIT_STARTS, kinds, vals, text_buf, text_starts,
            sub.positions, sub.row_starts, pos_w, digit_table(pos_w), lists.lv, lists.lo, lists.hi,
            blk_w, digit_table(blk_w), _NO_HIST if counted else ohist, -1 if counted else step)
        hot = np.zeros((n_rows, int(batch.n_prefix.max(initial=0))), np.int64)
        self.kern.prefix_hist(sub.block_ids, sub.block_starts, sub.intersection, r, hot)
        self.summary.add([ids[i] for i in r.tolist()], sub.unique_blocks, None, None, sub.ratio,
                         None, None, offset_hist=ohist, tpb_hist=sub.count_hist.sum(axis=0),
                         hot_counts=(ids, hot))
        self.writer.write(memoryview(out)[:n_bytes], n_sel, partial(self.pool.free.append, out))
