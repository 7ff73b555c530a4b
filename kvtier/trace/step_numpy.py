"""Points A and B for a whole decode step at once: every (layer, row) as one 2-D problem.

Rows are sorted once (``np.sort`` along the row, or a per-row bitmap in the numba kernel of
``kvtier.trace.step_numba`` when it is available: same results), then everything else is a pass over flat
arrays: block ids are ``pos // block_size`` (a shift for powers of two), a block starts where
the id changes, per-block token counts are gaps between block starts, and per-row percentiles
come from sorted rows (offsets) or per-row histograms (tokens per block), with the arithmetic of
``kvtier.trace.percentiles`` so they equal ``np.percentile`` exactly. Negative indices are padding and are
dropped, as are duplicates; only then do rows differ in length (the slower general path).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kvtier.trace import step_numba
from kvtier.trace.percentiles import percentile_hist_rows, percentile_sorted_rows


@dataclass(slots=True)
class StepStats:
    """Per-row results of one step (rows = layers x active batch rows, layer-major)."""

    positions: np.ndarray  # flat, each row sorted ascending, unique
    row_starts: np.ndarray  # [R + 1] into positions
    positions_2d: np.ndarray | None  # [R, K] view when every row has K positions
    block_ids: np.ndarray  # flat, each row sorted unique
    block_starts: np.ndarray  # [R + 1] into block_ids
    block_counts: np.ndarray  # selected tokens per touched block, aligned with block_ids
    count_hist: np.ndarray  # [R, W]: per row, how many blocks hold 0..W-1 selected tokens
    unique_blocks: np.ndarray
    tpb_mean: np.ndarray
    tpb_p50: np.ndarray
    tpb_p95: np.ndarray
    offset_min: np.ndarray
    offset_p50: np.ndarray
    offset_max: np.ndarray
    n_prefix: np.ndarray  # prefix blocks of the row's request
    intersection: np.ndarray
    ratio: np.ndarray
    scores: np.ndarray | None  # flat, permuted like positions (only when kept)
    scores_min: np.ndarray | None
    scores_mean: np.ndarray | None
    scores_max: np.ndarray | None
    position_hist: np.ndarray | None = None  # [seq_len]: rows selecting each position (numba path)

    def subset(self, rows: np.ndarray) -> StepStats:
        """The same statistics for a subset of rows (sampling)."""
        pos, pstarts = _take_rows(self.positions, self.row_starts, rows)
        blk, bstarts = _take_rows(self.block_ids, self.block_starts, rows)
        cnt, _ = _take_rows(self.block_counts, self.block_starts, rows)
        sc = None if self.scores is None else _take_rows(self.scores, self.row_starts, rows)[0]
        per_row = {
            name: (None if getattr(self, name) is None else getattr(self, name)[rows])
            for name in ("unique_blocks", "tpb_mean", "tpb_p50", "tpb_p95", "offset_min",
                         "offset_p50", "offset_max", "n_prefix", "intersection", "ratio",
                         "scores_min", "scores_mean", "scores_max")
        }
        p2d = None if self.positions_2d is None else self.positions_2d[rows]
        return replace(self, positions=pos, row_starts=pstarts, positions_2d=p2d, block_ids=blk,
                       block_starts=bstarts, block_counts=cnt, count_hist=self.count_hist[rows],
                       scores=sc, position_hist=None, **per_row)

    def prefix_touches(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, block id) of every touched block inside its request's prefix. These are the
        first ``intersection[row]`` entries of each row's sorted block ids."""
        counts = np.diff(self.block_starts)
        row_of_block = np.repeat(np.arange(len(counts)), counts)
        inside = self.block_ids < self.n_prefix[row_of_block]
        return row_of_block[inside], self.block_ids[inside]


def _take_rows(flat: np.ndarray, starts: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.diff(starts)[rows]
    new_starts = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=new_starts[1:])
    idx = np.repeat(starts[:-1][rows] - new_starts[:-1], counts) + np.arange(new_starts[-1])
    return flat[idx], new_starts


def compute_step_stats(positions: np.ndarray, seq_len: int, block_size: int, n_prefix: np.ndarray,
                       scores: np.ndarray | None = None, keep_scores: bool = False,
                       in_place: bool = False, fast: bool | None = None,
                       scratch: dict | None = None) -> StepStats:
    """Points A and B for rows of top-k indices [R, K] of one decode step (``seq_len`` =
    ``step_idx + 1``); ``n_prefix[r]`` is the number of prefix blocks of row r's request.
    ``in_place`` lets the sort reuse ``positions`` (a scratch buffer of the caller). ``fast``:
    None uses the numba kernels when available (rows without scores), False forces numpy.
    ``scratch``: a dict the numba path keeps its output buffers in between calls (the caller's;
    results then stay valid only until its next call), sparing fresh pages every step."""
    p = np.asarray(positions)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"top-k indices must be a non-empty [rows, K] array, got shape {list(p.shape)}")
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"top-k indices must be integers, got {p.dtype}")
    n_rows, k = p.shape
    pmax = int(p.max())
    if pmax >= seq_len:
        raise ValueError(f"selected position {pmax} >= seq_len_current {seq_len} "
                         f"(a decode step at start_pos {seq_len - 1} sees positions 0..{seq_len - 1})")
    dtype = np.int32 if seq_len < 2**31 else np.int64
    n_prefix = np.asarray(n_prefix, dtype=np.int64)
    kern = step_numba.load() if fast is None or fast else None
    if fast and kern is None:
        raise RuntimeError("fast=True needs numba (extra 'fast'; unset KVTIER_NO_NUMBA)")
    if scores is None and kern is not None:
        (flat, row_starts, pos2d, block_ids, block_starts, block_counts, hist,
         intersection, _) = _blocks_numba(kern, p.astype(dtype, copy=False), seq_len, block_size, n_prefix,
                            {} if scratch is None else scratch)
        sflat = None
    else:
        (flat, row_starts, pos2d, sflat, block_ids, block_starts, block_counts, hist,
         intersection) = _blocks_numpy(p, dtype, scores, in_place, block_size, n_prefix)
    if sflat is not None and not np.isfinite(sflat).all():
        raise ValueError("indexer scores of selected positions must be finite")
    return _finish(flat, row_starts, pos2d, sflat, block_ids, block_starts, block_counts, hist,
                   intersection, seq_len, n_prefix, keep_scores)


def step_stats_from_bits(bits: np.ndarray, k: int, seq_len: int, block_size: int,
                         n_prefix: np.ndarray, scratch: dict | None = None) -> StepStats:
    """``compute_step_stats`` for rows given as bitmaps [R, ceil(seq_len / 64)] of their
    (at most ``k``) selected positions, as ``step_numba.set_bits`` fills them from the indices
    (numba path only; no scores)."""
    kern = step_numba.load()
    if kern is None:
        raise RuntimeError("step_stats_from_bits needs numba (extra 'fast'; unset KVTIER_NO_NUMBA)")
    n_prefix = np.asarray(n_prefix, dtype=np.int64)
    parts = _blocks_numba(kern, None, seq_len, block_size, n_prefix,
                          {} if scratch is None else scratch, bits=bits, k=k)
    flat, row_starts, pos2d, block_ids, block_starts, block_counts, hist, intersection, phist = parts
    st = _finish(flat, row_starts, pos2d, None, block_ids, block_starts, block_counts, hist,
                 intersection, seq_len, n_prefix, False)
    st.position_hist = phist
    return st


def _finish(flat: np.ndarray, row_starts: np.ndarray, pos2d: np.ndarray | None,
            sflat: np.ndarray | None, block_ids: np.ndarray, block_starts: np.ndarray,
            block_counts: np.ndarray, hist: np.ndarray, intersection: np.ndarray, seq_len: int,
            n_prefix: np.ndarray, keep_scores: bool) -> StepStats:
    """Per-row statistics from sorted rows and their blocks (shared by every path)."""
    n_tok = np.diff(row_starts)
    unique = np.diff(block_starts)
    tpb_mean = n_tok / unique
    tpb_p50 = percentile_hist_rows(hist, 50.0)
    tpb_p95 = percentile_hist_rows(hist, 95.0)
    # point A: offsets (end - 1) - pos; reflected, so min/max swap ends of the sorted row
    last = seq_len - 1
    offset_min = last - flat[row_starts[1:] - 1].astype(np.int64)
    offset_max = last - flat[row_starts[:-1]].astype(np.int64)
    offset_p50 = last - percentile_sorted_rows(flat, row_starts, 50.0)
    ratio = intersection / unique
    if sflat is not None:
        smin = np.minimum.reduceat(sflat, row_starts[:-1])
        smax = np.maximum.reduceat(sflat, row_starts[:-1])
        smean = np.add.reduceat(sflat, row_starts[:-1]) / n_tok
    else:
        smin = smax = smean = None
    return StepStats(
        positions=flat, row_starts=row_starts, positions_2d=pos2d, block_ids=block_ids,
        block_starts=block_starts, block_counts=block_counts, count_hist=hist, unique_blocks=unique,
        tpb_mean=tpb_mean, tpb_p50=tpb_p50, tpb_p95=tpb_p95, offset_min=offset_min,
        offset_p50=offset_p50, offset_max=offset_max, n_prefix=n_prefix,
        intersection=intersection, ratio=ratio,
        scores=sflat if keep_scores else None, scores_min=smin, scores_mean=smean, scores_max=smax,
    )


def _blocks_numpy(p: np.ndarray, dtype: type, scores: np.ndarray | None, in_place: bool,
                  block_size: int, n_prefix: np.ndarray) -> tuple:
    """Sorted unique rows, blocks, per-row count histograms and prefix overlap with numpy:
    one sort of the whole step, then shifted-compare masks and gaps between block starts."""
    n_rows, k = p.shape
    if scores is None:
        if in_place and p.dtype == dtype and p.flags.c_contiguous and p.flags.writeable:
            p.sort(axis=1)
            s = p
        else:
            s = np.sort(p.astype(dtype, copy=False), axis=1)
        sc = None
    else:
        order = np.argsort(p, axis=1, kind="stable")
        s = np.take_along_axis(p, order, axis=1).astype(dtype, copy=False)
        sc = np.take_along_axis(np.asarray(scores), order, axis=1).astype(np.float64)
    dup = s[:, 1:] == s[:, :-1]
    if s[:, 0].min() >= 0 and not dup.any():
        flat = s.ravel()
        row_starts = np.arange(n_rows + 1, dtype=np.int64) * k
        pos2d: np.ndarray | None = s
        sflat = None if sc is None else sc.ravel()
    else:
        valid = s >= 0
        valid[:, 1:] &= ~dup
        counts = valid.sum(axis=1)
        if counts.min() == 0:
            raise ValueError(f"row {int(np.argmin(counts))} has no selected position (all padding)")
        flat = s[valid]
        row_starts = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(counts, out=row_starts[1:])
        pos2d = None
        sflat = None if sc is None else sc[valid]
    n = len(flat)
    # point B: blocks
    if block_size & (block_size - 1) == 0:
        blocks = flat >> (block_size.bit_length() - 1)
    else:
        blocks = flat // block_size
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(blocks[1:], blocks[:-1], out=first[1:])
    first[row_starts[:-1]] = True
    bidx = np.flatnonzero(first)
    block_ids = blocks[bidx]
    block_counts = np.empty(len(bidx), dtype=np.int64)
    np.subtract(bidx[1:], bidx[:-1], out=block_counts[:-1])
    block_counts[-1] = n - bidx[-1]
    block_starts = np.searchsorted(bidx, row_starts).astype(np.int64)
    unique = np.diff(block_starts)
    row_of_block = np.repeat(np.arange(n_rows), unique)
    width = int(block_counts.max()) + 1
    hist = np.bincount(row_of_block * width + block_counts, minlength=n_rows * width).reshape(n_rows, width)
    # point D: touched blocks inside the prefix (block ids 0..n_prefix-1: a prefix of each row)
    inside = block_ids < n_prefix[row_of_block]
    intersection = np.add.reduceat(inside, block_starts[:-1], dtype=np.int64)
    return flat, row_starts, pos2d, sflat, block_ids, block_starts, block_counts, hist, intersection


def _buffer(scratch: dict, name: str, n: int, dtype: type) -> np.ndarray:
    buf = scratch.get(name)
    if buf is None or buf.dtype != dtype or len(buf) < n:
        buf = scratch[name] = np.empty(max(n, 1), dtype)
    return buf[:n]


def _blocks_numba(kern: Any, p: np.ndarray | None, seq_len: int, block_size: int,
                  n_prefix: np.ndarray, scratch: dict, bits: np.ndarray | None = None,
                  k: int = 0) -> tuple:
    """The same with one compiled pass per row (bitmap sort, see ``kvtier.trace.step_numba``), from
    indices ``p`` [R, K] or from per-row bitmaps ``bits`` [R, words] of K indices each."""
    if bits is None:
        assert p is not None
        n_rows, k = p.shape
        n_words = (seq_len + 63) >> 6 if seq_len <= step_numba.BITMAP_MAX_SEQ else 0
        one = scratch.get("bitmap")
        if one is None or one.shape[1] < n_words:  # the kernel leaves it all zero
            one = scratch["bitmap"] = np.zeros((1, n_words), np.uint64)
        bitmap = one[:, :n_words] if n_words else np.zeros((0, 0), np.uint64)
        dtype = p.dtype
    else:
        n_rows = len(bits)
        bitmap = bits
        dtype = np.dtype(np.int32 if seq_len < 2**31 else np.int64)
        p = np.zeros((n_rows, 0), dtype)
    n = n_rows * k
    flat = _buffer(scratch, "flat", n, dtype)
    blk = _buffer(scratch, "blk", n, dtype)
    cnt = _buffer(scratch, "cnt", n, np.int64)
    row_starts = np.empty(n_rows + 1, np.int64)
    block_starts = np.empty(n_rows + 1, np.int64)
    hist = np.zeros((n_rows, min(block_size, k) + 1), np.int64)
    inter = np.empty(n_rows, np.int64)
    phist = np.zeros(seq_len if bits is not None else 0, np.int64)
    bad = kern.step_rows(np.ascontiguousarray(p), bitmap, bits is not None, seq_len, block_size,
                         n_prefix, flat, row_starts, blk, cnt, block_starts, hist, inter, phist)
    if bad >= 0:
        raise ValueError(f"row {bad} has no selected position (all padding)")
    m, nb = int(row_starts[-1]), int(block_starts[-1])
    pos2d = flat.reshape(n_rows, k) if m == n else None
    return flat[:m], row_starts, pos2d, blk[:nb], block_starts, cnt[:nb], hist, inter, phist
