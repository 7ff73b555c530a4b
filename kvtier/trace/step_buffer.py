"""One decode step's top-k on the host, every layer in one buffer, checked as it arrives.

The numpy path keeps a ``[layers, B, K]`` int buffer (int32 while positions fit) that the
step's statistics read as one 2-D problem (``kvtier.trace.step_numpy``). The numba path keeps
per-row bitmaps over ``[0, seq_len)`` instead of a copy (the sort the statistics need, done
while copying; contexts up to ``step_numba.BITMAP_MAX_SEQ``). Either way a layer's selected
positions are range-checked before they are narrowed, so a bad index cannot wrap.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def check_topk(layer_id: int, arr: np.ndarray, n_batch: int) -> None:
    """``arr`` must be an integer [n_batch, K] array with K > 0."""
    if arr.ndim != 2 or arr.shape[0] != n_batch or arr.shape[1] == 0:
        raise ValueError(f"layer {layer_id}: indices must have shape [{n_batch}, K] with K > 0, "
                         f"got {list(arr.shape)}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"layer {layer_id}: indices must be integers, got {arr.dtype}")


def _out_of_range(layer_id: int, amax: int, seq_len: int) -> ValueError:
    return ValueError(f"layer {layer_id}: selected position {amax} >= seq_len_current {seq_len} "
                      f"(a decode step at start_pos {seq_len - 1} sees positions 0..{seq_len - 1})")


class StepBuffer:
    """The layers of the step being built: ``indices[slot]`` ([B, K], numpy path) or
    ``bits[slot]`` ([B, words] row bitmaps, numba path, with ``k`` indices per row).

    Buffers grow as needed and are reused from step to step; one step is stored at a time
    (the tracer's caller and its builder thread never store at once).
    """

    def __init__(self, kern: SimpleNamespace | None) -> None:
        self.kern = kern  # the numba kernels, or None (numpy path)
        self.indices: np.ndarray | None = None
        self.bits: np.ndarray | None = None
        self.k = 0  # indices per row of the step's first layer (bitmap path)
        self._copied = -1  # slot that _copy_checked already copied

    def store(self, slot: int, layer_id: int, arr: np.ndarray, seq_len: int, use_bits: bool) -> None:
        """Copy one layer into the step's buffer (its bitmaps with ``use_bits``), checking the
        range first so the narrowing copy cannot wrap a bad index."""
        if use_bits:
            self._store_bits(slot, layer_id, arr, seq_len)
            return
        amax = None if self.kern is None else self._copy_checked(slot, arr, seq_len)
        if amax is None:
            amax = int(arr.max())
        if amax >= seq_len:
            raise _out_of_range(layer_id, amax, seq_len)
        dtype = np.int32 if seq_len < 2**31 else np.int64
        buf = self.indices
        if (buf is None or buf.dtype != dtype or buf.shape[1:] != arr.shape
                or buf.shape[0] <= slot):
            if slot > 0 and buf is not None and buf.shape[1:] != arr.shape:
                raise ValueError(f"layer {layer_id}: indices shape {list(arr.shape)} differs from "
                                 f"the step's first layer {list(buf.shape[1:])}")
            grown = np.empty((max(2 * slot, 8), *arr.shape), dtype=dtype)
            if slot and buf is not None:
                grown[:slot] = buf[:slot]
            self.indices = buf = grown
        if self.kern is None or self._copied != slot:
            np.copyto(buf[slot], arr, casting="unsafe")

    def _store_bits(self, slot: int, layer_id: int, arr: np.ndarray, seq_len: int) -> None:
        """numba path: one pass over the indices sets the row bitmaps of this layer (what the
        step's sort needs) and takes the max for the range check; nothing else is copied."""
        assert self.kern is not None
        n_batch, k = arr.shape
        if slot == 0:
            self.k = k
        elif k != self.k:
            raise ValueError(f"layer {layer_id}: indices shape {list(arr.shape)} differs from "
                             f"the step's first layer {[n_batch, self.k]}")
        n_words = (seq_len + 63) >> 6
        bits = self.bits
        if bits is None or bits.shape[1:] != (n_batch, n_words) or bits.shape[0] <= slot:
            grown = np.empty((max(2 * slot, 8, 0 if bits is None else len(bits)), n_batch, n_words),
                             np.uint64)
            if slot and bits is not None:  # same step, so the same row shape
                grown[:slot] = bits[:slot]
            self.bits = bits = grown
        amax = int(self.kern.set_bits(np.ascontiguousarray(arr), bits[slot], seq_len))
        if amax >= seq_len:
            raise _out_of_range(layer_id, amax, seq_len)

    def _copy_checked(self, slot: int, arr: np.ndarray, seq_len: int) -> int | None:
        """numba path: copy into the step buffer and take the max in one pass (the max of the
        source, so an out-of-range index is still caught). None when the buffer must grow."""
        assert self.kern is not None
        buf = self.indices
        dtype = np.int32 if seq_len < 2**31 else np.int64
        self._copied = -1
        if buf is None or buf.dtype != dtype or buf.shape[1:] != arr.shape or buf.shape[0] <= slot:
            return None
        self._copied = slot
        return int(self.kern.copy_max(np.ascontiguousarray(arr), buf[slot]))
