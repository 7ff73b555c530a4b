"""One chunk of records as numpy columns, validated: the unit every metric consumes.

``ChunkBuilder.build`` turns a flattened Arrow table from ``kvtier.analysis.source`` into a
``Chunk`` (the access-stream columns of ``kvtier.sim.access.AccessStream`` plus the other
per-record fields the analysis reads). Request ids are opaque (str or int) and numbered in
order of first appearance, as the access stream and the tier emulator number them. Records that
cannot be analysed are dropped here and counted by reason; positions are sorted and
de-duplicated per record when a producer did not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kvtier.trace.arrays import as_numpy, list_parts, one_array, validity

BASE_COLUMNS = ("request_id", "layer_id", "step_idx", "seq_len_current", "block_size_tokens",
                "selected_token_pos")
PREFIX_COLUMNS = ("prefix.prefix_cache_hit", "prefix.prefix_cached_blocks",
                  "prefix.intersection_ratio", "prefix.intersection_blocks")
TIER_FIELDS = ("hit_blocks", "bytes_read", "read_ops", "latency_us", "batch_size")
TIER_COLUMNS = tuple(f"kv_fetch.{t}.{f}" for t in ("hbm", "local_pool", "remote_pool")
                     for f in TIER_FIELDS)
ALL_COLUMNS = BASE_COLUMNS + PREFIX_COLUMNS + TIER_COLUMNS
REQUIRED = ("request_id", "layer_id", "step_idx", "seq_len_current", "selected_token_pos")


@dataclass
class Chunk:
    """``n`` records in trace order with every field present, layer, step >= 0, seq_len >= 1
    and a non-empty selection ``pos[offsets[i]:offsets[i + 1]]`` (the analysis then drops
    records with a position outside [0, seq_len) and sorts the rest, ``normalise``).
    ``gidx`` numbers the records of the whole trace (increasing, with gaps)."""

    req: np.ndarray
    layer: np.ndarray
    step: np.ndarray
    seq_len: np.ndarray
    offsets: np.ndarray
    pos: np.ndarray
    gidx: np.ndarray
    table: pa.Table  # the valid rows, every requested column (prefix, kv_fetch, ...)
    block_size: int | None  # block_size_tokens of the first record (None if absent)

    @property
    def n(self) -> int:
        return int(self.req.shape[0])

    def lens(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, keep: np.ndarray) -> Chunk:
        """The records where ``keep`` is True (positions re-packed)."""
        if keep.all():
            return self
        lens = self.lens()
        sel = np.repeat(keep, lens)
        offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(lens[keep], out=offsets[1:])
        return Chunk(self.req[keep], self.layer[keep], self.step[keep], self.seq_len[keep],
                     offsets, self.pos[sel], self.gidx[keep],
                     self.table.filter(pa.array(keep)), self.block_size)


@dataclass
class Skipped:
    """Records not analysed, by reason."""

    missing_field: int = 0
    empty_selection: int = 0
    invalid: int = 0  # negative layer/step, seq_len < 1, a position outside [0, seq_len)
    max_steps_per_stream: int = 0
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"missing_field": self.missing_field, "empty_selection": self.empty_selection,
                "invalid": self.invalid, "max_steps_per_stream": self.max_steps_per_stream}


def int_column(table: pa.Table, name: str, fill: int = 0) -> np.ndarray:
    """An integer column as int64 (nulls -> ``fill``); a list column gives its lengths (the
    design-note form of block fields is a list of ids, the older form a count). Read from
    the Arrow buffers (``kvtier.trace.arrays``): pyarrow's ``to_numpy`` imports pandas on
    first use, ~0.3 s of every ``kvtier analyze``; other column types take that path."""
    col = table.column(name)
    arr = one_array(col)
    try:
        if pa.types.is_list(arr.type):
            out = np.diff(list_parts(arr)[0])
            valid = validity(arr)
            if valid is not None:
                out[~valid] = fill
            return out
        if not arr.null_count:
            return as_numpy(arr).astype(np.int64, copy=False)
    except TypeError:  # not a fixed-width numeric column
        pass
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        col = pc.list_value_length(col)
    arr = col.to_numpy(zero_copy_only=False)
    if arr.dtype == object or np.issubdtype(arr.dtype, np.floating):
        arr = np.asarray(pc.fill_null(col, fill).to_numpy(zero_copy_only=False))
    return np.asarray(arr, dtype=np.int64)


def float_column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64, nulls as NaN (without pandas where the column is
    fixed-width numeric, see ``int_column``)."""
    col = table.column(name)
    try:
        return as_numpy(col).astype(np.float64)
    except (TypeError, ValueError):
        pass
    return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False),
                      dtype=np.float64)


def list_values(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(offsets from 0, values) of a list column (nulls as empty lists), or None if the column
    is not a list; the values are int64, or int32 where the column stores int32 (the columnar
    twin's positions, read in place: every consumer takes either). Reads the Arrow buffers in
    place: ``combine_chunks`` and ``ListArray.offsets`` copy, which for K = 2048 positions per
    record costs more than analysing them."""
    col = table.column(name)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        return None
    offs_parts, val_parts, base = [], [], 0
    for arr in col.chunks:
        if arr.null_count:
            arr = pc.fill_null(arr, pa.scalar([], type=arr.type))
        if arr.type.value_type not in (pa.int64(), pa.int32()) or arr.values.null_count:
            arr = pc.cast(arr, pa.list_(pa.int64()))  # copies; nulls inside fail loudly
            arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
        bufs = arr.buffers()
        odt = np.int64 if pa.types.is_large_list(arr.type) else np.int32
        vdt = np.int32 if arr.type.value_type == pa.int32() else np.int64
        o = np.frombuffer(bufs[1], dtype=odt)[arr.offset:arr.offset + len(arr) + 1]
        o = o.astype(np.int64)
        v = np.frombuffer(bufs[3], dtype=vdt) if bufs[3] is not None else np.zeros(0, vdt)
        child_off = arr.values.offset if hasattr(arr.values, "offset") else 0
        val_parts.append(v[child_off + o[0]:child_off + o[-1]])
        offs_parts.append(o[:-1] - o[0] + base)
        base += int(o[-1] - o[0])
    if not offs_parts:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    offs = np.concatenate(offs_parts + [np.array([base], dtype=np.int64)])
    vals = val_parts[0] if len(val_parts) == 1 else np.concatenate(val_parts)
    return offs, vals


class ChunkBuilder:
    """Converts Arrow chunks into ``Chunk`` objects, numbering requests across chunks."""

    def __init__(self) -> None:
        self.request_index: dict = {}
        self.request_ids: list = []
        self.skipped = Skipped()
        self.records_read = 0
        self._g = 0
        self.block_size: int | None = None

    def _codes(self, col: pa.ChunkedArray) -> np.ndarray:
        enc = pc.dictionary_encode(col).combine_chunks()
        index = self.request_index
        mapped = []
        for v in enc.dictionary.to_pylist():
            code = index.get(v)
            if code is None:
                code = index[v] = len(self.request_ids)
                self.request_ids.append(v)
            mapped.append(code)
        lookup = np.asarray(mapped, dtype=np.int64)
        try:
            idx = as_numpy(enc.indices).astype(np.int64)
        except (TypeError, ValueError):
            idx = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        return lookup[idx] if lookup.shape[0] else idx

    def build(self, table: pa.Table) -> Chunk | None:
        n = table.num_rows
        self.records_read += n
        if n == 0:
            return None
        ok = np.ones(n, dtype=bool)
        for c in REQUIRED:
            col = table.column(c)
            if col.null_count:
                ok &= ~as_numpy(col.is_null())
        self.skipped.missing_field += int((~ok).sum())
        if not ok.all():
            table = table.filter(pa.array(ok))
            n = table.num_rows
            if n == 0:
                return None
        lv = list_values(table, "selected_token_pos")
        if lv is None:
            raise ValueError("column `selected_token_pos` is not a list")
        offs, pos = lv
        lens = np.diff(offs)
        layer = int_column(table, "layer_id")
        step = int_column(table, "step_idx")
        seq = int_column(table, "seq_len_current")
        if self.block_size is None:
            bs = table.column("block_size_tokens")
            if bs.null_count < n:
                first = pc.drop_null(bs)[0].as_py()
                self.block_size = int(first) if first else None
        bad = (layer < 0) | (step < 0) | (seq < 1)
        empty = lens == 0
        self.skipped.invalid += int((bad & ~empty).sum())
        self.skipped.empty_selection += int(empty.sum())
        keep = ~(bad | empty)
        req = self._codes(table.column("request_id"))
        gidx = np.arange(self._g, self._g + n, dtype=np.int64)
        chunk = Chunk(req, layer, step, seq, offs, pos, gidx, table, self.block_size)
        chunk = chunk.take(keep)
        chunk.gidx = np.arange(self._g, self._g + chunk.n, dtype=np.int64)
        self._g += chunk.n
        return chunk if chunk.n else None


def normalise(c: Chunk) -> None:
    """Sort and de-duplicate positions within each record (a no-op when they already are)."""
    if c.pos.shape[0] < 2:
        return
    d = np.diff(c.pos)
    inner = np.ones(d.shape[0], dtype=bool)
    bounds = c.offsets[1:-1]
    inner[bounds[(bounds > 0) & (bounds < c.pos.shape[0])] - 1] = False
    if not ((d <= 0) & inner).any():
        return
    rec = np.repeat(np.arange(c.n, dtype=np.int64), c.lens())
    order = np.lexsort((c.pos, rec))
    pos, rec = c.pos[order], rec[order]
    keep = np.ones(pos.shape[0], dtype=bool)
    keep[1:] = (pos[1:] != pos[:-1]) | (rec[1:] != rec[:-1])
    counts = np.bincount(rec[keep], minlength=c.n)
    c.offsets = np.zeros(c.n + 1, dtype=np.int64)
    np.cumsum(counts, out=c.offsets[1:])
    c.pos = pos[keep]
