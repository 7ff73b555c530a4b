"""Reading a trace for the analysis: record columns as Arrow tables, a bounded chunk at a time.

``iter_columns`` is the one function that touches trace files. It yields flattened
``pyarrow.Table`` chunks with dotted column names (``request_id``, ``selected_token_pos``,
``prefix.prefix_cached_blocks``, ``kv_fetch.hbm.bytes_read``, ...), from

- the columnar twin of a JSONL trace (``kvtier.trace.columnar``: parsed once by
  ``read_columns``, cached beside the trace as an Arrow IPC file), memory-mapped and read one
  record batch at a time, only the requested columns touched, int lists as stored (int32
  positions: no copy); it is built on first use when the parse fits in memory;
- ``trace_steps.parquet`` (row batches, only the requested columns decoded);
- otherwise JSONL or JSONL shards streamed a few MB of lines at a time, parsed by Arrow's C++
  JSON reader with an explicit schema, every other field skipped.

Memory stays bounded by one chunk on the streamed paths whatever the trace size. Lines that
are not records are skipped and counted by reason (``kvtier.trace.reader.SkippedLines``),
never shifted into other rows: the twin records the ones it was built without; a streamed
chunk that fails is split in halves until the bad lines are isolated. Streaming reads only the
fields the analysis needs, so there a line counts as bad only if one of those does not parse.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pyarrow as pa

from kvtier.trace.reader import SkippedLines, TraceError, TraceFiles, bisect_lines, find_trace

#: bytes of JSONL parsed per chunk (the chunk is split at a line boundary)
JSONL_CHUNK_BYTES = 8 << 20
#: records per chunk for Parquet and the columnar twin: 4096 (half a twin batch) halves the
#: per-chunk Python and numpy overhead of 1024 (~0.3 s CPU of a 5 s analysis of 250K records);
#: at K = 2048 a chunk is 8 M positions, with ~130 MB of block scratch per block size
CHUNK_RECORDS = 4096

I64, F64 = pa.int64(), pa.float64()
#: Arrow type of every column the analysis may read (the design note's field types). Fields
#: whose form changed (request ids, block lists) are detected per file, see ``_detect``.
COLUMN_TYPES: dict[str, pa.DataType] = {
    "request_id": pa.string(),
    "layer_id": I64,
    "step_idx": I64,
    "seq_len_current": I64,
    "block_size_tokens": I64,
    "selected_token_pos": pa.list_(I64),
    "prefix.prefix_cache_hit": pa.bool_(),
    "prefix.prefix_cached_blocks": I64,
    "prefix.intersection_ratio": F64,
    "prefix.intersection_blocks": pa.list_(I64),
    **{f"kv_fetch.{t}.{f}": typ for t in ("hbm", "local_pool", "remote_pool")
       for f, typ in (("hit_blocks", pa.list_(I64)), ("bytes_read", I64), ("read_ops", I64),
                      ("latency_us", F64), ("batch_size", I64))},
}
TIERS = ("hbm", "local_pool", "remote_pool")
#: columns read only in the count form of older traces: in the design-note schema a tier's
#: ``hit_blocks`` is a list whose length is that tier's ``batch_size``, so the lists (as many
#: ids as selected blocks) are never decoded; absent columns come back as nulls
COUNT_ONLY = frozenset(f"kv_fetch.{t}.hit_blocks" for t in TIERS)


@dataclass
class ReadLog:
    """What reading skipped: the lines that are not records (by reason, with the first few
    locations), and notes on how the trace was read."""

    skipped: SkippedLines = field(default_factory=SkippedLines)
    notes: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        if len(self.notes) < 5:
            self.notes.append(message)


def open_trace_files(trace: str | Path) -> TraceFiles:
    """``kvtier.trace.reader.find_trace`` (one rule for every reader)."""
    return find_trace(trace)


def iter_columns(trace: str | Path | TraceFiles, columns: Sequence[str],
                 log: ReadLog | None = None) -> Iterator[pa.Table]:
    """Flattened Arrow chunks of ``columns`` over the whole trace, in record order.

    Columns the trace does not have come back as all-null columns of their ``COLUMN_TYPES``
    type, so callers treat "absent" and "null" alike.
    """
    tf = trace if isinstance(trace, TraceFiles) else open_trace_files(trace)
    log = log if log is not None else ReadLog()
    twin = _twin_file(tf, trace, log)
    if twin is not None:
        from kvtier.trace.columnar import twin_skipped

        log.skipped.update(twin_skipped(twin))
        yield from _iter_twin(twin, columns)
        return
    for path in tf.files:
        if tf.format == "parquet" or path.suffix == ".parquet":
            yield from _iter_parquet(path, columns)
        else:
            yield from _iter_jsonl(path, columns, log)


def _twin_reader():
    """``kvtier.trace.columnar.read_columns``, or None where it does not exist."""
    try:
        from kvtier.trace import columnar
    except ImportError:
        return None
    return getattr(columnar, "read_columns", None)


#: share of the available memory building a twin may take (else: the trace is streamed)
TWIN_MEMORY_SHARE = 0.6


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


def _twin_bytes(tf: TraceFiles) -> int | None:
    """Memory ``read_columns`` needs to build the twin: every column of every record, about
    8 bytes per selected position and ~4 per block id (position lists, block lists and hbm hit
    lists; summary.json counts the positions), so ~14 bytes per position; without a summary,
    2.5x the JSONL size."""
    import json

    try:
        summ = json.loads((tf.root / "summary.json").read_bytes())
        return int(14 * int(summ["offsets"]["count"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return int(2.5 * sum(f.stat().st_size for f in tf.files))
    except OSError:
        return None


def _twin_file(tf: TraceFiles, trace, log: ReadLog) -> Path | None:
    """The columnar twin of a JSONL trace (``kvtier.trace.columnar``), building it first if
    there is none and the parse fits in ``TWIN_MEMORY_SHARE`` of the available memory
    (``read_columns`` builds the whole table once); None to stream the record files instead:
    Parquet (already columnar), no twin module, not enough memory to build it, or a trace the
    twin refuses (no line is a whole record of the schema, or one of the earlier format:
    streaming reads only the fields the analysis needs, in either form)."""
    read_columns = _twin_reader()
    if read_columns is None or tf.format == "parquet":
        return None
    from kvtier.trace.columnar import column_cache_path

    target = trace if not isinstance(trace, TraceFiles) else tf.root
    try:
        path = column_cache_path(target)
        if path is not None:
            return path
        need = _twin_bytes(tf)
        if need is None or need > TWIN_MEMORY_SHARE * _available_memory():
            return None
        read_columns(target, ["layer_id"], skipped=SkippedLines())  # parses, writes the twin
        return column_cache_path(target)
    except (TraceError, ValueError, OSError) as exc:
        msg = str(exc).split("\n")[0]
        log.note(f"columnar twin not used ({msg}); records read line by line")
        return None


def _iter_twin(path: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    """The twin read one record batch at a time (``read_columns`` would build whole columns
    at once: for K = 2048 that is gigabytes of fresh memory, whose page faults cost more than
    the analysis), int lists as stored (``narrow``: the positions are int32 views of the
    mapped file, which the kernels take as they are)."""
    from kvtier.trace.columnar import COLUMNS, iter_twin

    want = [c for c in columns if c not in COUNT_ONLY and c in COLUMNS]
    for batch in iter_twin(path, want, narrow=True):
        parts = max(1, round(batch.num_rows / CHUNK_RECORDS))  # ~CHUNK_RECORDS, no stubs
        size = -(-batch.num_rows // parts)
        for start in range(0, batch.num_rows, size):
            yield _complete(batch.slice(start, size), columns)


def _flatten(table: pa.Table) -> pa.Table:
    while any(pa.types.is_struct(f.type) for f in table.schema):
        table = table.flatten()
    return table


def _complete(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """``table`` with exactly ``columns`` (missing ones as nulls), in that order."""
    names = set(table.column_names)
    arrays = []
    for c in columns:
        if c in names:
            arrays.append(table.column(c))
        else:
            arrays.append(pa.nulls(table.num_rows, COLUMN_TYPES.get(c, pa.null())))
    return pa.table(arrays, names=list(columns))


# ------------------------------------------------------------------------------------------
# Parquet


def _iter_parquet(path: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TraceError(f"{path}: not a readable Parquet file: {exc}") from None
    schema = pf.schema_arrow
    paths = []
    for c in columns:
        parts = c.split(".")
        if parts[0] not in schema.names:
            continue
        typ = schema.field(parts[0]).type
        for p in parts[1:]:
            typ = typ.field(p).type if pa.types.is_struct(typ) and typ.get_field_index(p) >= 0 \
                else None
            if typ is None:
                break
        if typ is None or (c in COUNT_ONLY and pa.types.is_list(typ)):
            continue
        paths.append(c)  # nested fields by dotted path: only those leaves are decoded
    for batch in pf.iter_batches(batch_size=CHUNK_RECORDS, columns=paths):
        yield _complete(_flatten(pa.Table.from_batches([batch])), columns)


# ------------------------------------------------------------------------------------------
# JSONL


def _detect(path: Path, columns: Sequence[str]) -> dict[str, pa.DataType]:
    """Column types for one JSONL file: ``COLUMN_TYPES``, with request ids (str or int) and
    block fields (a count or a list of block ids) as the file's first parseable record has
    them, so traces written before and after the design-note schema both read."""
    types = {c: COLUMN_TYPES[c] for c in columns}
    with open(path, "rb") as fh:
        for _, line in zip(range(64), fh, strict=False):
            try:
                rec = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            for c in columns:
                v: object = rec
                for part in c.split("."):
                    v = v.get(part) if isinstance(v, dict) else None
                if c == "request_id" and isinstance(v, int) and not isinstance(v, bool):
                    types[c] = I64
                elif types[c] == pa.list_(I64) and isinstance(v, int) and not isinstance(v, bool):
                    types[c] = I64
            break
    # list-form hit_blocks are not parsed (their count is batch_size)
    return {c: t for c, t in types.items() if not (c in COUNT_ONLY and pa.types.is_list(t))}


def _schema(types: dict[str, pa.DataType]) -> pa.Schema:
    """Nested Arrow schema from dotted names."""
    tree: dict = {}
    for name, typ in types.items():
        node = tree
        parts = name.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = typ

    def build(node: dict) -> list[pa.Field]:
        return [pa.field(k, pa.struct(build(v)) if isinstance(v, dict) else v)
                for k, v in node.items()]

    return pa.schema(build(tree))


def _iter_jsonl(path: Path, columns: Sequence[str], log: ReadLog) -> Iterator[pa.Table]:
    import pyarrow.json as pj

    types = _detect(path, columns)
    opts = pj.ParseOptions(explicit_schema=_schema(types), unexpected_field_behavior="ignore")

    def parse(lines: list[bytes]) -> pa.Table:
        data = b"\n".join(lines) + b"\n"
        return pj.read_json(io.BytesIO(data), parse_options=opts,
                            read_options=pj.ReadOptions(block_size=len(data) + 1))

    for first, lines, open_end in _line_chunks(path):
        keep = [(i, ln) for i, ln in enumerate(lines) if ln.strip()]
        last = len(lines) - 1 if open_end else -1
        for t in _isolate(keep, first, parse, path, log, last) if keep else ():
            if t.num_rows:
                yield _complete(_flatten(t), columns)


def _line_chunks(path: Path) -> Iterator[tuple[int, list[bytes], bool]]:
    """(number of the first line, lines, whether the last of them lacks its newline) for
    about ``JSONL_CHUNK_BYTES`` of whole lines at a time; a last line without newline (a
    killed writer) is yielded too and parses or not."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from None
    with fh:
        lineno, rest = 1, b""
        while True:
            block = fh.read(JSONL_CHUNK_BYTES)
            data = rest + block
            if not block:
                if data:
                    yield lineno, data.split(b"\n"), True
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than the chunk: read on
                rest = data
                continue
            data, rest = data[:cut - 1], data[cut:]
            lines = data.split(b"\n")
            yield lineno, lines, False
            lineno += len(lines)


def _isolate(keep: list[tuple[int, bytes]], lineno: int, parse, path: Path, log: ReadLog,
             last: int = -1) -> list[pa.Table]:
    """Parse ``keep`` (index, line) pairs in one call, or bisect around the lines that fail
    (``kvtier.trace.reader.bisect_lines``; each bad line is counted by reason with its
    number, and skipped); ``last``: the index of a final line without newline."""
    error: list[Exception] = []  # the refusal of the group just tried

    def attempt(group):
        try:
            return parse([ln for _, ln in group])
        except pa.ArrowInvalid as exc:
            error[:] = [exc]
            return None

    def refused(item):
        i, line = item
        log.skipped.add(path, lineno + i, *_reason(line, i == last, error[0]))
        return []

    return bisect_lines(keep, attempt, refused)


def _reason(line: bytes, unterminated: bool, exc: Exception) -> tuple[str, str]:
    """Why a line the streamed parse refused is not a record (``SKIP_REASONS``)."""
    try:
        obj = msgspec.json.decode(line)
    except msgspec.DecodeError as err:
        if unterminated:
            return "truncated_final_line", "no newline, and not a whole record"
        return "malformed_json", f"malformed JSON: {err}"
    what = "not a JSON object" if not isinstance(obj, dict) else str(exc).splitlines()[0]
    return "invalid_record", what
