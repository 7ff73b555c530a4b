"""Reading a trace once: its records as Arrow columns, parsed once and cached beside the trace.

Every offline command (replay, sweep, mrc, the analysis wing) starts from the same records.
``read_columns`` parses a trace's JSONL into one Arrow table with the record's fields
flattened to dotted names, and keeps that table as a *columnar twin*: an Arrow IPC file in the
trace directory, reused while the trace files are unchanged. Later reads memory-map the twin
and take the columns asked for in place. A Parquet trace is already columnar: it is read
directly, only the fields asked for.

Public API::

    read_columns(trace, columns=None, *, cache=True, skipped=None) -> pyarrow.Table
    COLUMNS                      # every column name, in record order
    column_cache_path(trace)     # where the twin of a trace lives (or would live)
    iter_twin(path, columns)     # a twin's record batches as tables (bounded memory)

Columns (one row per record, in trace order; names as in ``docs/INSTRUMENTATION.md``):
``event``, ``run_name``, ``dataset``, ``rank``, ``world_size``, ``request_id``, ``layer_id``,
``step_idx``, ``seq_len_current``, ``unique_token_pos_count``, ``offset_min``, ``offset_p50``,
``offset_max``, ``block_size_tokens``, ``selected_block_ids`` (list), ``unique_blocks``,
``tokens_per_touched_block.{mean,p50,p95}``, ``kv_fetch.<tier>.{hit_blocks, bytes_read,
read_ops, latency_us, batch_size}`` for tier in hbm, local_pool, remote_pool,
``prefix.{prefix_cache_hit, prefix_cached_blocks, prefix_key, intersection_ratio,
intersection_blocks}``, ``selected_token_pos`` (list), ``scores_stats.{min,mean,max}`` (null
when the record has none) and ``scores_topk`` (list; null when not stored). Ints are int64,
floats float64, lists ``list<int64>`` / ``list<double>``; the nullable ones are
``kv_fetch.<tier>.latency_us``, ``prefix.prefix_key``, ``scores_stats.*`` and ``scores_topk``.

Lines that are not records (a killed run's truncated last line, a malformed line) are skipped
and counted by reason (``kvtier.trace.reader.SkippedLines``, the rule of that module); the
twin records them, so every later read reports the same counts. ``read_columns`` fills
``skipped`` when given, else warns once (``SkippedLinesWarning``); a trace of which no line is
a record raises ``TraceError``.

The twin is keyed on the size and mtime of every record file and on ``FORMAT_VERSION``; it is
written atomically (temporary file + rename) as ``.trace_steps.columns.arrow`` in the trace
directory, or, where that directory is not writable, under ``$KVTIER_CACHE_DIR`` (default
``$XDG_CACHE_HOME/kvtier/columns`` or ``~/.cache/kvtier/columns``); if neither can be written
the table is returned uncached. Its physical form (``encode_twin`` / ``decode_twin``) is the
one speed trick of this module, see there. No torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec
import numpy as np

from kvtier.schema import EVENT_DSA_TOPK, SCHEMA_VERSION, TopkRecord, TraceError
from kvtier.trace.arrays import list_parts
from kvtier.trace.parquet import arrow_schema, flat_fields, flatten, read_parquet_flat
from kvtier.trace.reader import (
    SkippedLines,
    TraceFiles,
    bisect_lines,
    classify_line,
    find_trace,
    nothing_kept,
    warn_skipped,
)

#: bump when the twin's layout changes (old twins are then rebuilt, never misread):
#: 1 = lz4 IPC of the logical columns; 2 = never released (block lists derived from the
#: positions); 3 = uncompressed, int lists as int32 where their values fit
FORMAT_VERSION = 3
CACHE_NAME = ".trace_steps.columns.arrow"
_KEY = b"kvtier.columnar"
_SKIPPED_KEY = b"kvtier.skipped"
#: bytes the bulk JSON parser reads at a time (a block must hold whole lines)
_BLOCK_BYTES = 1 << 24
#: bytes of whole lines parsed at a time where a file has lines that are not records
_ISOLATE_BYTES = 8 << 20
#: records per record batch of the twin (a list column of a batch also stays below 2**30
#: values, so its int32 offsets never overflow)
TWIN_BATCH_RECORDS = 8192
_BATCH_VALUES = 1 << 30


def flat_schema():
    """The Arrow schema of ``read_columns``' table (every record field, dotted names)."""
    import pyarrow as pa

    return pa.schema(flat_fields(arrow_schema()))


#: every column name ``read_columns`` returns, in record field order
COLUMNS: tuple[str, ...] = tuple(f.name for f in flat_fields(arrow_schema()))


# ---------------------------------------------------------------------------------------------
# The twin's physical form: the speed trick, in one place.
#
# What it buys: a second command reads the columns it needs straight out of the page cache
# (memory-mapped, no decompression, no copy). Version 1 compressed everything with lz4:
# decompressing ``selected_token_pos`` (2048 int64 per DSA record) took ~4 s of the ~10 s
# `kvtier analyze` spent on a 250,000-record trace (docs/BENCHMARKS.md). Version 2 is
# uncompressed and stores every int list as list<int32> when all its values fit (positions,
# block ids), else list<int64>: half the bytes of int64, and the analysis reads the int32
# positions as they are. The casts are Arrow's (checked, in Arrow's memory pool: fresh numpy
# temporaries of this size cost more in page faults on a VM than the work).
# ``decode_twin(encode_twin(t)) == t`` for any flat table (tests/test_columnar.py pins it).

_INT_LISTS = ("selected_block_ids", "kv_fetch.hbm.hit_blocks", "kv_fetch.local_pool.hit_blocks",
              "kv_fetch.remote_pool.hit_blocks", "prefix.intersection_blocks",
              "selected_token_pos")


def _int_list_type(width):
    import pyarrow as pa

    return pa.list_(pa.field("element", width, nullable=False))


def twin_schema(flat):
    """The physical schema of a twin of ``flat`` (the whole table, so every batch has it):
    list<int32> for an int list column whose values all fit, else list<int64>."""
    import pyarrow as pa

    fields = []
    for f in flat.schema:
        if f.name in _INT_LISTS:
            fits = all(vals.shape[0] == 0 or (int(vals.min()) >= -(1 << 31)
                                              and int(vals.max()) < (1 << 31))
                       for _, vals in _chunk_parts(flat.column(f.name)))
            f = f.with_type(_int_list_type(pa.int32() if fits else pa.int64()))
        fields.append(f)
    return pa.schema(fields)


def encode_twin(flat, schema=None):
    """A flat (logical) table, or one batch of it, in the twin's physical form (``schema``:
    the whole twin's, ``twin_schema``; default: this table's own)."""
    # one chunk per column: a batch of the twin is then one record batch (no combining
    # copy when it is read)
    return flat.combine_chunks().cast(schema if schema is not None else twin_schema(flat))


def decode_twin(phys, columns: Sequence[str] | None = None, *, narrow: bool = False):
    """Physical twin columns (one batch or a whole table) back into the logical flat columns
    ``columns`` (default: all it has). ``narrow``: int lists come as stored
    (``list<int32>`` where the values fit), without a copy, for readers that take int32
    (the analysis)."""
    import pyarrow as pa

    logical = {f.name: f for f in flat_fields(arrow_schema())}
    want = list(columns) if columns is not None else [c for c in COLUMNS
                                                       if c in phys.column_names]
    arrays, fields = [], []
    for name in want:
        col, f = phys.column(name), logical[name]
        if col.type != f.type and not (narrow and name in _INT_LISTS):
            col = col.cast(f.type)
        arrays.append(col)
        fields.append(f.with_type(col.type))
    return pa.table(arrays, schema=pa.schema(fields))


def _chunk_parts(col) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``list_parts`` of every chunk of a list column (no combining copy)."""
    for chunk in col.chunks:
        yield list_parts(chunk)


def _list_lengths(col) -> np.ndarray:
    parts = [np.diff(o) for o, _ in _chunk_parts(col)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _batch_bounds(flat) -> list[tuple[int, int]]:
    """Record ranges of the twin's batches: at most TWIN_BATCH_RECORDS records and
    _BATCH_VALUES values of any list column each (one record at least)."""
    n = flat.num_rows
    lens = np.zeros(n, np.int64)
    for name in _INT_LISTS:
        lens = np.maximum(lens, _list_lengths(flat.column(name)))
    bounds, a = [], 0
    cum = np.concatenate(([0], np.cumsum(lens)))
    while a < n:
        b = min(n, a + TWIN_BATCH_RECORDS)
        b = max(a + 1, min(b, int(np.searchsorted(cum, cum[a] + _BATCH_VALUES, side="right")) - 1))
        bounds.append((a, b))
        a = b
    return bounds


# ---------------------------------------------------------------------------------------------
# the cache


def _source_key(tf: TraceFiles) -> bytes:
    files = []
    for f in tf.files:
        try:
            st = f.stat()
        except OSError as exc:
            raise TraceError(f"{f}: {exc.strerror or exc}") from None
        files.append([f.name, st.st_size, st.st_mtime_ns])
    return json.dumps({"version": FORMAT_VERSION, "schema": SCHEMA_VERSION,
                       "format": tf.format, "files": files}).encode()


def _user_cache_dir() -> Path:
    env = os.environ.get("KVTIER_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtier" / "columns"


def _cache_paths(tf: TraceFiles, single_file: bool) -> list[Path]:
    """Where the twin may live: beside the trace (one twin for a directory, one per record
    file read on its own), then in the user's cache directory (named by a hash of the record
    files' absolute paths)."""
    ident = "\0".join(str(f.resolve()) for f in tf.files)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:24]
    local = f".{tf.files[0].name}.columns.arrow" if single_file else CACHE_NAME
    return [tf.root / local, _user_cache_dir() / f"{digest}.arrow"]


def column_cache_path(trace: str | Path) -> Path | None:
    """The columnar twin of ``trace`` that ``read_columns`` would reuse now, or None."""
    tf = find_trace(trace)
    key = _source_key(tf)
    for path in _cache_paths(tf, Path(trace).is_file()):
        if _twin_meta(path).get(_KEY) == key:
            return path
    return None


def _twin_meta(path: Path) -> dict:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_file(src).schema.metadata or {}
    except (OSError, pa.ArrowInvalid):
        return {}


def twin_skipped(path: str | Path) -> SkippedLines:
    """The lines the twin at ``path`` was built without (recorded when it was built)."""
    return SkippedLines.from_json(_twin_meta(Path(path)).get(_SKIPPED_KEY))


def iter_twin(path: str | Path, columns: Sequence[str], *, narrow: bool = False
              ) -> Iterator:
    """The twin at ``path`` one record batch at a time (``TWIN_BATCH_RECORDS`` records), as
    logical flat tables of ``columns`` (see ``decode_twin`` for ``narrow``); only the needed
    columns are touched, in place in the memory-mapped file."""
    import pyarrow as pa

    src = pa.memory_map(str(path))
    # whole batches, then the columns: with ``included_fields`` pyarrow (26) copies every
    # buffer it reads (~4 ms per 64 MB of positions), without it a batch is a view of the map
    reader = pa.ipc.open_file(src)
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i).select(list(columns))
        yield decode_twin(pa.Table.from_batches([batch]), columns, narrow=narrow)


def _read_cache(path: Path, columns: Sequence[str] | None):
    import pyarrow as pa

    want = list(columns) if columns is not None else list(COLUMNS)
    try:
        parts = list(iter_twin(path, want))
    except (OSError, pa.ArrowInvalid, KeyError):
        return None
    return pa.concat_tables(parts) if parts else None  # the writer writes one batch at least


def _write_cache(table, key: bytes, skipped: SkippedLines, paths: list[Path]) -> Path | None:
    """Write the twin to the first place that takes it; None if none does."""
    import pyarrow as pa

    bounds = _batch_bounds(table) or [(0, 0)]
    schema = twin_schema(table).with_metadata({_KEY: key, _SKIPPED_KEY: skipped.to_json()})
    for path in paths:
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            os.close(fd)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as readable as the trace files (mkstemp: 0600)
            # pyarrow.ipc rather than feather.write_feather, which imports pandas; one batch
            # at a time (the physical copy of a batch is freed once written)
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for a, b in bounds:
                    writer.write_table(encode_twin(table.slice(a, b - a), schema),
                                       max_chunksize=max(b - a, 1))
            os.replace(tmp, path)
            return path
        except (OSError, pa.ArrowException):
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
    return None


# ---------------------------------------------------------------------------------------------
# parsing JSONL


def _required_ok(flat) -> bool:
    """No nulls where the record has none (checked on the flat columns, so nested fields
    count too), and only ``dsa_topk`` events (compared on the string buffers: no
    pyarrow.compute, whose first use costs ~0.5 s)."""
    for f in flat_fields(arrow_schema()):
        if not f.nullable and flat.column(f.name).null_count:
            return False
    want = EVENT_DSA_TOPK.encode()
    for arr in flat.column("event").chunks:
        if not len(arr):
            continue
        wide = str(arr.type) == "large_string"
        offs = np.frombuffer(arr.buffers()[1], np.int64 if wide else np.int32,
                             count=len(arr) + 1, offset=arr.offset * (8 if wide else 4))
        if (np.diff(offs) != len(want)).any():
            return False
        data = arr.buffers()[2]
        if data is None or bytes(data)[offs[0]:offs[-1]] != want * (len(offs) - 1):
            return False
    return True


def _bulk(source, size: int):
    """``source`` (a path or a readable buffer) parsed by Arrow's JSON reader with the record
    schema, flat; None if it refuses any line (or a record it reads has nulls where none may
    be, or another event)."""
    import pyarrow as pa
    import pyarrow.json as pj

    schema = arrow_schema()
    try:
        table = pj.read_json(
            source, read_options=pj.ReadOptions(block_size=min(max(size, 1 << 16), _BLOCK_BYTES)),
            parse_options=pj.ParseOptions(explicit_schema=schema,
                                          unexpected_field_behavior="error",
                                          newlines_in_values=False))
        table = table.select(schema.names)
        if [f.type for f in table.schema] != [f.type for f in schema]:
            table = table.cast(schema)
        flat = flatten(table)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError):
        return None
    return flat if _required_ok(flat) else None


def _record_rows(recs: list):
    """Records decoded by msgspec (lines Arrow's reader refused but the schema accepts) as a
    flat table."""
    import pyarrow as pa

    rows = []
    for rec in recs:
        row = msgspec.to_builtins(rec)
        row.setdefault("scores_topk", None)
        rows.append(row)
    return flatten(pa.Table.from_pylist(rows, schema=arrow_schema()))


def _isolate(lines: list[tuple[int, bytes]], path: Path, tf: TraceFiles,
             skipped: SkippedLines, dec) -> list:
    """Flat tables of the records among ``lines`` ((line number, line) pairs, in order):
    parsed together, or bisected around the lines Arrow refuses; such a line is decoded on
    its own (a record of the schema is kept, anything else skipped and counted)."""

    def parse(group):
        data = b"\n".join(ln for _, ln in group) + b"\n"
        return _bulk(io.BytesIO(data), len(data))

    def refused(item):
        lineno, line = item
        rec, reason, detail = classify_line(line, dec, path, lineno, True, tf)
        if rec is not None:
            return [_record_rows([rec])]
        skipped.add(path, lineno, reason, detail)
        return []

    return bisect_lines(lines, parse, refused)


def _line_chunks(buf, end: int) -> Iterator[list[tuple[int, bytes]]]:
    """(line number, line) of the non-blank lines of ``buf[:end]`` (whole lines), about
    ``_ISOLATE_BYTES`` at a time."""
    lineno, lo = 1, 0
    while lo < end:
        hi = buf.rfind(b"\n", lo, min(end, lo + _ISOLATE_BYTES)) + 1
        if hi <= lo:  # one line longer than a chunk
            hi = buf.find(b"\n", lo, end) + 1 or end
        lines = bytes(buf[lo:hi]).split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        yield [(lineno + i, ln) for i, ln in enumerate(lines) if ln.strip()]
        lineno += len(lines)
        lo = hi


def _count_newlines(buf, end: int) -> int:
    """Newlines in ``buf[:end]`` (16 MB windows: no copy of the whole file)."""
    n, lo = 0, 0
    while lo < end:
        hi = min(end, lo + (16 << 20))
        n += int(np.count_nonzero(np.frombuffer(buf, np.uint8, hi - lo, lo) == 10))
        lo = hi
    return n


def _parse_jsonl(path: Path, skipped: SkippedLines, tf: TraceFiles | None = None):
    """One JSONL file as a flat table of its records. The whole file goes through Arrow's
    bulk JSON reader with the record schema; only where it refuses something are the lines
    parsed in chunks, bisected down to the lines that are not records (skipped and counted in
    ``skipped``). A last line without newline is decoded on its own: kept if it is a whole
    record, else skipped as ``truncated_final_line``."""
    import mmap

    import pyarrow as pa

    tf = tf or TraceFiles(path.parent, None, [path], "jsonl")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from None
    if size == 0:
        return flatten(arrow_schema().empty_table())
    dec = msgspec.json.Decoder(TopkRecord)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        body = buf.rfind(b"\n") + 1  # whole lines end here; a killed run's last line follows
        tail = bytes(buf[body:])
        parts = []
        if body:
            if body == size:
                table = _bulk(str(path), body)
            else:  # the whole lines, in place (no copy of the file)
                with pa.memory_map(str(path)) as mf:
                    table = _bulk(pa.BufferReader(mf.read_buffer(body)), body)
            if table is not None:
                parts.append(table)
            else:
                for lines in _line_chunks(buf, body):
                    if lines:
                        parts.extend(_isolate(lines, path, tf, skipped, dec))
        if tail.strip():
            lineno = _count_newlines(buf, body) + 1
            rec, reason, detail = classify_line(tail, dec, path, lineno, False, tf)
            if rec is not None:
                parts.append(_record_rows([rec]))
            else:
                skipped.add(path, lineno, reason, detail)
    parts = [p for p in parts if p.num_rows] or [flatten(arrow_schema().empty_table())]
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def _build(tf: TraceFiles, skipped: SkippedLines, columns: list[str] | None = None):
    """The flat table of a trace: JSONL parsed in full; Parquet (already columnar, so never
    cached) reading only the top-level fields that ``columns`` need."""
    import pyarrow as pa

    if tf.format == "parquet":
        parts = [read_parquet_flat(f, columns) for f in tf.files]
    else:
        parts = [_parse_jsonl(f, skipped, tf) for f in tf.files]
    if not parts:
        table = flatten(arrow_schema().empty_table())
    else:
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return table if columns is None or tf.format == "parquet" else table.select(columns)


def read_columns(trace: str | Path, columns: Sequence[str] | None = None, *,
                 cache: bool = True, skipped: SkippedLines | None = None):
    """The records of ``trace`` (a trace directory or one record file) as a ``pyarrow.Table``
    with flattened dotted column names (see the module doc), in trace order.

    ``columns`` picks and orders columns by name (default: all of ``COLUMNS``). The first call
    parses a JSONL trace and writes its columnar twin; later calls read the twin while every
    record file keeps its size and mtime. ``cache=False`` neither reads nor writes a twin.
    A Parquet trace is read directly (only the fields asked for), without a twin.
    Lines that are not records are skipped: counted into ``skipped`` when given, else
    reported by one ``SkippedLinesWarning``. Raises ``TraceError`` (file, line, field) on an
    unreadable trace, a trace of the earlier format, an unknown column name, or when no line
    at all is a record.
    """
    if columns is not None:
        columns = list(columns)
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise TraceError(f"unknown column(s) {unknown}; columns are: {', '.join(COLUMNS)}")
    tf = find_trace(trace)
    log = SkippedLines()
    table = None
    if not cache or tf.format == "parquet":
        table = _build(tf, log, columns)
    else:
        key = _source_key(tf)
        paths = _cache_paths(tf, Path(trace).is_file())
        for path in paths:
            if _twin_meta(path).get(_KEY) == key:
                table = _read_cache(path, columns)
                if table is not None:
                    log = twin_skipped(path)
                    break
        if table is None:
            table = _build(tf, log)
            if table.num_rows or not log:
                _write_cache(table, key, log, paths)
            if columns is not None:
                table = table.select(columns)
    if log and not table.num_rows:
        raise nothing_kept(log, trace)
    if skipped is not None:
        skipped.update(log)
    else:
        warn_skipped(log, trace, table.num_rows)
    return table
