"""The access stream: a trace's top-k selections as compact numpy columns.

Policies, single-tier sweeps and the tiered replay only need *who read which token when*, not the
whole ``dsa_topk`` record, so a trace directory (JSONL, sharded JSONL or ``trace_steps.parquet``)
is decoded once into per-record columns plus one concatenated array of sorted token positions.
Re-bucketing to any block size and building the single-tier key stream are vectorised.
No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from kvtier.policies.base import MAX_BLOCK_ID, MAX_LAYER, block_keys_columns
from kvtier.schema import META_FILE
from kvtier.trace.reader import TraceError, find_trace


class TraceReadError(ValueError):
    """A trace file that cannot be read; the message names file, line and field."""


class _AccessFields(msgspec.Struct):
    """Only the fields the access stream needs; msgspec skips the rest of each record."""

    request_id: str
    layer_id: int
    step_idx: int
    seq_len_current: int
    block_size_tokens: int
    selected_token_pos: list[int]


class _AccessFieldsRaw(msgspec.Struct):
    """Fast path: positions kept as raw JSON text, parsed for all records in one numpy call."""

    request_id: str
    layer_id: int
    step_idx: int
    seq_len_current: int
    block_size_tokens: int
    selected_token_pos: msgspec.Raw


# bytes allowed inside a list of JSON integers (digits, minus, comma, JSON whitespace)
_INT_LIST_BYTES = np.zeros(256, dtype=bool)
_INT_LIST_BYTES[np.frombuffer(b"0123456789-, \t\r\n", dtype=np.uint8)] = True


@dataclass(slots=True)
class AccessStream:
    """One row per trace record, in trace order; token positions concatenated.

    Record ``i`` read tokens ``pos[offsets[i]:offsets[i+1]]`` (sorted, unique).
    ``req`` indexes ``request_ids`` (order of first appearance).
    """

    request_ids: list[str]
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


def _locate_error(path: Path, data: bytes, dec: msgspec.json.Decoder) -> TraceReadError:
    """Re-decode line by line to name the first bad line (the slow path, only on error)."""
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            dec.decode(line)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return TraceReadError(f"{path}:{lineno}: {exc}")
    return TraceReadError(f"{path}: could not decode")


def _read_jsonl(path: Path) -> dict:
    """Columns of one JSONL file. Fast path: positions as raw text parsed in one
    ``np.fromstring`` call, accepted only if every byte is integer-list syntax and the count
    matches; anything else goes through the strict typed decoder, which names the bad line."""
    data = path.read_bytes()
    try:
        raw = msgspec.json.Decoder(_AccessFieldsRaw).decode_lines(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        raw = None
    if raw is not None:
        cols = _columns_fast(raw)
        if cols is not None:
            return cols
    dec = msgspec.json.Decoder(_AccessFields)
    try:
        records = dec.decode_lines(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise _locate_error(path, data, dec) from None
    return _columns_from_records(records)


def _columns_fast(records: list[_AccessFieldsRaw]) -> dict | None:
    import warnings

    inner = []
    for r in records:
        b = bytes(r.selected_token_pos).strip()
        if b[:1] != b"[" or b[-1:] != b"]":
            return None
        inner.append(b[1:-1].strip())
    lens = np.fromiter((x.count(b",") + 1 if x else 0 for x in inner), dtype=np.int64,
                       count=len(inner))
    buf = b",".join(x for x in inner if x)
    if not _INT_LIST_BYTES[np.frombuffer(buf, dtype=np.uint8)].all():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pos = np.fromstring(buf, dtype=np.int64, sep=",") if buf else np.zeros(0, np.int64)
    except (ValueError, DeprecationWarning):
        return None
    if pos.shape[0] != int(lens.sum()):
        return None
    cols = _columns_from_records(records, positions=False)
    cols["lens"], cols["pos"] = lens, pos
    return cols


def _columns_from_records(records: list, positions: bool = True) -> dict:
    n = len(records)
    rid = [r.request_id for r in records]
    layer = np.fromiter((r.layer_id for r in records), dtype=np.int64, count=n)
    step = np.fromiter((r.step_idx for r in records), dtype=np.int64, count=n)
    seq = np.fromiter((r.seq_len_current for r in records), dtype=np.int64, count=n)
    bsz = np.fromiter((r.block_size_tokens for r in records), dtype=np.int64, count=n)
    out = {"rid": rid, "layer": layer, "step": step, "seq": seq, "bsz": bsz}
    if positions:
        out["lens"] = np.fromiter((len(r.selected_token_pos) for r in records), dtype=np.int64,
                                  count=n)
        flat: list[int] = []
        ext = flat.extend
        for r in records:
            ext(r.selected_token_pos)
        out["pos"] = np.array(flat, dtype=np.int64)
    return out


def _read_parquet(path: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    need = ["request_id", "layer_id", "step_idx", "seq_len_current", "block_size_tokens",
            "selected_token_pos"]
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TraceReadError(f"{path}: not a readable Parquet file: {exc}") from None
    missing = [c for c in need if c not in schema.names]
    if missing:
        raise TraceReadError(f"{path}: missing column(s) {missing}")
    table = pq.read_table(path, columns=need)
    sel = table.column("selected_token_pos").combine_chunks()
    if sel.null_count:
        raise TraceReadError(f"{path}: column `selected_token_pos` has nulls")
    offs = np.asarray(sel.offsets, dtype=np.int64)
    pos = np.asarray(sel.values[offs[0]: offs[-1]] if len(offs) else [], dtype=np.int64)

    def col(name: str) -> np.ndarray:
        c = table.column(name)
        if c.null_count:
            raise TraceReadError(f"{path}: column `{name}` has nulls")
        return np.asarray(c.to_numpy(), dtype=np.int64)

    return {
        "rid": table.column("request_id").to_pylist(),
        "layer": col("layer_id"),
        "step": col("step_idx"),
        "seq": col("seq_len_current"),
        "bsz": col("block_size_tokens"),
        "lens": np.diff(offs),
        "pos": pos,
    }


def _iter_columns(fmt: str, files: list[Path]) -> Iterator[tuple[Path, dict]]:
    for f in files:
        if fmt == "parquet" or f.suffix == ".parquet":
            yield f, _read_parquet(f)
        else:
            yield f, _read_jsonl(f)


def read_access_stream(trace: str | Path) -> AccessStream:
    """Decode a trace directory (or one trace file) into an ``AccessStream``.

    Token positions are sorted and de-duplicated per record if the producer did not.
    Raises ``TraceReadError`` naming the file, line and field on bad input.
    """
    fmt, files = trace_files(trace)
    parts = list(_iter_columns(fmt, files))
    rid_all: list[str] = []
    for _, c in parts:
        rid_all.extend(c["rid"])
    cat = {k: np.concatenate([c[k] for _, c in parts]) if parts else np.zeros(0, np.int64)
           for k in ("layer", "step", "seq", "bsz", "lens", "pos")}
    n = len(rid_all)
    # number requests by first appearance (a dict keeps insertion order)
    index: dict[str, int] = {}
    setdefault = index.setdefault
    req = np.fromiter((setdefault(r, len(index)) for r in rid_all), dtype=np.int64, count=n)
    request_ids = list(index)
    bsz = cat["bsz"]
    block_size = int(bsz[0]) if n else _meta_block_size(trace)
    if n and (bsz != block_size).any():
        i = int(np.flatnonzero(bsz != block_size)[0])
        raise TraceReadError(
            f"{trace}: record {i + 1}: field `block_size_tokens` = {int(bsz[i])} differs from "
            f"the first record's {block_size}")
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(cat["lens"], out=offsets[1:])
    stream = AccessStream(
        request_ids=request_ids, req=np.asarray(req, dtype=np.int64),
        layer=cat["layer"].astype(np.int64), step=cat["step"].astype(np.int64),
        seq_len=cat["seq"].astype(np.int64), offsets=offsets, pos=cat["pos"].astype(np.int64),
        block_size=block_size)
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
    """Sort and de-duplicate positions within each record (vectorised; a no-op when they are)."""
    if s.n_tokens < 2:
        return s
    rec = s.record_of_element()
    d = np.diff(s.pos)
    same_rec = rec[1:] == rec[:-1]
    if not ((d <= 0) & same_rec).any():
        return s
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
    b = stream.pos // block_size
    n = len(stream)
    if b.shape[0] == 0:
        return BlockStream(stream, block_size, np.zeros(n + 1, np.int64), b)
    keep = np.ones(b.shape[0], dtype=bool)
    keep[1:] = b[1:] != b[:-1]
    starts = stream.offsets[:-1][np.diff(stream.offsets) > 0]
    keep[starts] = True  # a record's first block is always kept
    rec = stream.record_of_element()
    counts = np.bincount(rec[keep], minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
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
