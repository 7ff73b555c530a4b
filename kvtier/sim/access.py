"""The access stream: a trace's top-k selections as compact numpy columns.

Policies, single-tier sweeps and the tiered replay only need *who read which token when*, not the
whole ``dsa_topk`` record, so a trace directory (JSONL, sharded JSONL or ``trace_steps.parquet``)
becomes per-record columns plus one concatenated array of sorted token positions, taken from
the trace's columnar twin (``kvtier.trace.columnar``: parsed once, then reused).
Re-bucketing to any block size and building the single-tier key stream are vectorised.
No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtier.policies.base import MAX_BLOCK_ID, MAX_LAYER, block_keys_columns
from kvtier.schema import META_FILE
from kvtier.trace.arrays import as_numpy, list_parts
from kvtier.trace.columnar import read_columns
from kvtier.trace.reader import SkippedLines, TraceError, find_trace


class TraceReadError(ValueError):
    """A trace file that cannot be read; the message names file, line and field."""


@dataclass(slots=True)
class AccessStream:
    """One row per trace record, in trace order; token positions concatenated.

    Record ``i`` read tokens ``pos[offsets[i]:offsets[i+1]]`` (sorted, unique). The arrays
    may be read-only views of the trace's columns: treat them as read-only.
    ``req`` indexes ``request_ids``, the trace's integer request ids in order of first
    appearance (for kvtier's traces: 0, 1, 2, ..., the admission order).
    """

    request_ids: list[int]
    req: np.ndarray  # int64 [n]
    layer: np.ndarray  # int64 [n]
    step: np.ndarray  # int64 [n]
    seq_len: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n + 1]
    pos: np.ndarray  # int64 [offsets[-1]]
    block_size: int  # the block size the trace was recorded with

    def __len__(self) -> int:
        return int(self.req.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def record_of_element(self) -> np.ndarray:
        """Record index of every element of ``pos``."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.offsets))


@dataclass(slots=True)
class BlockStream:
    """An access stream re-bucketed to ``block_size``: unique sorted block ids per record."""

    stream: AccessStream
    block_size: int
    offsets: np.ndarray  # int64 [n + 1]
    blocks: np.ndarray  # int64, ascending within each record
    _keys: np.ndarray | None = None

    def keys(self) -> np.ndarray:
        """Single-tier key stream ``block_key(request, layer, block)`` in trace order
        (computed once, then cached; treat as read-only)."""
        if self._keys is None:
            self._keys = block_stream_keys(self)
        return self._keys

    def __len__(self) -> int:
        return int(self.blocks.shape[0])


# ---------------------------------------------------------------------------------------------
# reading


def trace_files(trace: str | Path) -> tuple[str, list[Path]]:
    """``(format, files)`` for a trace directory (or a single trace file), in record order:
    ``kvtier.trace.reader.find_trace`` (one rule for every reader), its errors as TraceReadError."""
    try:
        tf = find_trace(trace)
    except TraceError as exc:
        raise TraceReadError(str(exc)) from None
    return tf.format, tf.files


#: the record fields an access stream is made of
ACCESS_COLUMNS = ("request_id", "layer_id", "step_idx", "seq_len_current", "block_size_tokens",
                  "selected_token_pos")


def _int_column(table, name: str) -> np.ndarray:
    return as_numpy(table.column(name)).astype(np.int64, copy=False)


def read_access_stream(trace: str | Path, skipped: SkippedLines | None = None) -> AccessStream:
    """Decode a trace directory (or one trace file) into an ``AccessStream``.

    Built on ``kvtier.trace.columnar.read_columns``: the trace's JSONL is parsed once into
    its columnar twin, and later reads take the six access columns from there.
    Token positions are sorted and de-duplicated per record if the producer did not.
    Lines that are not records (a killed run's half line, a malformed line) are skipped:
    counted into ``skipped`` when given, else reported by one ``SkippedLinesWarning``.
    Raises ``TraceReadError`` naming the file, line and field on a trace that cannot be
    read, of the earlier format, or of which no line is a record.
    """
    try:
        table = read_columns(trace, ACCESS_COLUMNS, skipped=skipped)
    except TraceError as exc:
        raise TraceReadError(str(exc)) from None
    return stream_from_columns(table, trace)


def stream_from_columns(table, trace: str | Path) -> AccessStream:
    """The ``AccessStream`` of a ``read_columns`` table holding (at least) ``ACCESS_COLUMNS``;
    ``trace`` names it in errors (and gives the block size of a trace without records)."""
    n = table.num_rows
    # number requests by first appearance
    rid = _int_column(table, "request_id")
    uniq, first, inverse = np.unique(rid, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    req = rank[inverse.reshape(-1)] if n else np.zeros(0, np.int64)
    request_ids = uniq[order].tolist()
    offsets, pos = list_parts(table.column("selected_token_pos"))
    pos = pos.astype(np.int64, copy=False)  # a read-only view of the columns where it can be
    bsz = _int_column(table, "block_size_tokens")
    block_size = int(bsz[0]) if n else _meta_block_size(trace)
    if n and (bsz != block_size).any():
        i = int(np.flatnonzero(bsz != block_size)[0])
        raise TraceReadError(
            f"{trace}: record {i + 1}: field `block_size_tokens` = {int(bsz[i])} differs from "
            f"the first record's {block_size}")
    stream = AccessStream(
        request_ids=request_ids, req=req, layer=_int_column(table, "layer_id"),
        step=_int_column(table, "step_idx"), seq_len=_int_column(table, "seq_len_current"),
        offsets=offsets, pos=pos, block_size=block_size)
    _check_stream(stream, trace)
    return _normalise_positions(stream)


def _meta_block_size(trace: str | Path) -> int:
    """Block size of a trace without records: ``config.trace.kv_block_size`` in the meta file,
    else 1."""
    meta_path = Path(trace) / META_FILE
    try:
        meta = json.loads(meta_path.read_bytes())
        return max(1, int(meta["config"]["trace"]["kv_block_size"]))
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def _check_stream(s: AccessStream, where: str | Path) -> None:
    def bad(mask: np.ndarray, field: str, what: str) -> None:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            raise TraceReadError(f"{where}: record {i + 1}: field `{field}` {what}")

    bad(s.layer < 0, "layer_id", "is negative")
    bad(s.layer > MAX_LAYER, "layer_id", f"exceeds {MAX_LAYER}")
    bad(s.step < 0, "step_idx", "is negative")
    if s.n_tokens and (s.pos < 0).any():
        i = int(np.searchsorted(s.offsets, np.flatnonzero(s.pos < 0)[0], side="right")) - 1
        raise TraceReadError(
            f"{where}: record {i + 1}: field `selected_token_pos` has a negative position")


def _normalise_positions(s: AccessStream) -> AccessStream:
    """Sort and de-duplicate positions within each record (vectorised; a no-op when they are:
    the only non-increasing steps of ``pos`` are then at record boundaries)."""
    if s.n_tokens < 2:
        return s
    down = np.flatnonzero(s.pos[1:] <= s.pos[:-1])
    if not down.size or np.isin(down + 1, s.offsets).all():
        return s
    rec = s.record_of_element()
    order = np.lexsort((s.pos, rec))
    pos = s.pos[order]
    keep = np.ones(pos.shape[0], dtype=bool)
    keep[1:] = (pos[1:] != pos[:-1]) | (rec[1:] != rec[:-1])
    counts = np.bincount(rec[keep], minlength=len(s))
    offsets = np.zeros(len(s) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    s.pos, s.offsets = pos[keep], offsets
    return s


# ---------------------------------------------------------------------------------------------
# re-bucketing and keys


def rebucket(stream: AccessStream, block_size: int) -> BlockStream:
    """Unique sorted block ids ``pos // block_size`` per record, for any block size."""
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    pos = stream.pos
    b = pos >> (block_size.bit_length() - 1) if block_size & (block_size - 1) == 0 \
        else pos // block_size
    n = len(stream)
    if b.shape[0] == 0:
        return BlockStream(stream, block_size, np.zeros(n + 1, np.int64), b)
    keep = np.empty(b.shape[0], dtype=bool)
    keep[0] = True
    np.not_equal(b[1:], b[:-1], out=keep[1:])
    starts = stream.offsets[:-1][np.diff(stream.offsets) > 0]
    keep[starts] = True  # a record's first block is always kept
    # blocks per record: kept elements up to each record end (cumulative count of keep)
    kept_before = np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))
    offsets = kept_before[stream.offsets]
    blocks = b[keep]
    if blocks.shape[0] and int(blocks.max()) > MAX_BLOCK_ID:
        raise ValueError(f"block id {int(blocks.max())} exceeds MAX_BLOCK_ID={MAX_BLOCK_ID} "
                         f"at block_size={block_size}")
    return BlockStream(stream, block_size, offsets, blocks)


def block_stream_keys(bs: BlockStream) -> np.ndarray:
    """``block_key(request, layer, block)`` for every block of every record, in trace order."""
    counts = np.diff(bs.offsets)
    req = np.repeat(bs.stream.req, counts)
    layer = np.repeat(bs.stream.layer, counts)
    return block_keys_columns(req, layer, bs.blocks)


def key_stream(trace_or_stream: str | Path | AccessStream, block_size: int | None = None
               ) -> np.ndarray:
    """The single-tier key stream of a trace at ``block_size`` (default: the recorded one)."""
    s = (trace_or_stream if isinstance(trace_or_stream, AccessStream)
         else read_access_stream(trace_or_stream))
    return rebucket(s, block_size or s.block_size).keys()


def working_set(keys: np.ndarray) -> int:
    """Number of distinct keys (the capacity at which every policy only has cold misses)."""
    return int(np.unique(keys).shape[0])
