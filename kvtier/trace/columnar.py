"""Reading a trace once: its records as Arrow columns, parsed once and cached beside the trace.

Every offline command (replay, sweep, mrc, the analysis wing) starts from the same records.
``read_columns`` parses a trace's JSONL into one Arrow table with the record's fields
flattened to dotted names, and keeps that table as a *columnar twin*: an Arrow IPC file (lz4)
in the trace directory, reused while the trace files are unchanged. The second and later
reads memory-map the twin and decompress only the columns asked for. A Parquet trace is
already columnar: it is read directly, only the fields asked for.

Public API::

    read_columns(trace, columns=None, *, cache=True) -> pyarrow.Table
    COLUMNS                      # every column name, in record order
    column_cache_path(trace)     # where the twin of a trace lives (or would live)

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

The twin is keyed on the size and mtime of every record file and on ``FORMAT_VERSION``; it is
written atomically (temporary file + rename) as ``.trace_steps.columns.arrow`` in the trace
directory, or, where that directory is not writable, under ``$KVTIER_CACHE_DIR`` (default
``$XDG_CACHE_HOME/kvtier/columns`` or ``~/.cache/kvtier/columns``); if neither can be written
the table is returned uncached. Bad records raise ``TraceError`` naming file, line and field
(the strict per-line decoder runs only when the bulk parse refuses the file). No torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import msgspec

from kvtier.schema import EVENT_DSA_TOPK, SCHEMA_VERSION, TopkRecord, TraceError
from kvtier.trace.parquet import arrow_schema, flat_fields, flatten, read_parquet_flat
from kvtier.trace.reader import TraceFiles, find_trace, iter_records

#: bump when the twin's layout changes (old twins are then rebuilt)
FORMAT_VERSION = 1
CACHE_NAME = ".trace_steps.columns.arrow"
_KEY = b"kvtier.columnar"
#: bytes the bulk JSON parser reads at a time (a block must hold whole lines)
_BLOCK_BYTES = 1 << 24


def flat_schema():
    """The Arrow schema of ``read_columns``' table (every record field, dotted names)."""
    import pyarrow as pa

    return pa.schema(flat_fields(arrow_schema()))


#: every column name ``read_columns`` returns, in record field order
COLUMNS: tuple[str, ...] = tuple(f.name for f in flat_fields(arrow_schema()))


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
        if _cached_key(path) == key:
            return path
    return None


def _cached_key(path: Path) -> bytes | None:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as src:
            meta = pa.ipc.open_file(src).schema.metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    return meta.get(_KEY)


def _read_cache(path: Path, columns: Sequence[str] | None):
    import pyarrow as pa
    import pyarrow.feather as feather

    try:
        return feather.read_table(str(path), columns=list(columns) if columns else None,
                                  memory_map=True)
    except (OSError, pa.ArrowInvalid):
        return None


def _write_cache(table, key: bytes, paths: list[Path]) -> Path | None:
    """Write the twin to the first place that takes it; None if none does."""
    import pyarrow as pa

    table = table.replace_schema_metadata({_KEY: key})
    for path in paths:
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            os.close(fd)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as readable as the trace files (mkstemp: 0600)
            # one record batch (columns then read as single chunks, without a combining
            # copy); pyarrow.ipc rather than feather.write_feather, which imports pandas
            opts = pa.ipc.IpcWriteOptions(compression="lz4")
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema, options=opts) as w:
                w.write_table(table, max_chunksize=max(table.num_rows, 1))
            os.replace(tmp, path)
            return path
        except (OSError, pa.ArrowException):
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
    return None


def _strict_table(path: Path):
    """The slow path: decode line by line (names the first bad line), then build the table."""
    import pyarrow as pa

    tf = TraceFiles(path.parent, None, [path], "jsonl")
    rows = []
    for rec in iter_records(tf, TopkRecord):
        row = msgspec.to_builtins(rec)
        row.setdefault("scores_topk", None)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=arrow_schema())


def _required_ok(flat) -> bool:
    """No nulls where the record has none (checked on the flat columns, so nested fields
    count too), and only ``dsa_topk`` events (compared on the string buffers: no
    pyarrow.compute, whose first use costs ~0.5 s)."""
    import numpy as np

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


def _parse_jsonl(path: Path):
    """One JSONL file as a flat table: the bulk Arrow JSON parser with the record's schema;
    anything it refuses (or a record it reads with nulls where none may be) goes through the
    strict decoder, which either names the bad line or builds the same table."""
    import pyarrow as pa
    import pyarrow.json as pj

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from None
    schema = arrow_schema()
    if size == 0:
        return flatten(schema.empty_table())
    table = None
    try:
        table = pj.read_json(
            path, read_options=pj.ReadOptions(block_size=min(max(size, 1 << 16), _BLOCK_BYTES)),
            parse_options=pj.ParseOptions(explicit_schema=schema,
                                          unexpected_field_behavior="error",
                                          newlines_in_values=False))
        table = table.select(schema.names)
        if [f.type for f in table.schema] != [f.type for f in schema]:
            table = table.cast(schema)
        with open(path, "rb") as fh:  # a killed run's last line lacks its newline
            fh.seek(-1, os.SEEK_END)
            complete = fh.read(1) == b"\n"
        if not complete or not _required_ok(flatten(table)):
            table = None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError):
        table = None
    if table is None:
        table = _strict_table(path)
    return flatten(table)


def _build(tf: TraceFiles, columns: list[str] | None = None):
    """The flat table of a trace: JSONL parsed in full; Parquet (already columnar, so never
    cached) reading only the top-level fields that ``columns`` need."""
    import pyarrow as pa

    if tf.format == "parquet":
        parts = [read_parquet_flat(f, columns) for f in tf.files]
    else:
        parts = [_parse_jsonl(f) for f in tf.files]
    if not parts:
        table = flatten(arrow_schema().empty_table())
    else:
        table = pa.concat_tables(parts).combine_chunks() if len(parts) > 1 else parts[0]
    return table if columns is None or tf.format == "parquet" else table.select(columns)


def read_columns(trace: str | Path, columns: Sequence[str] | None = None, *,
                 cache: bool = True):
    """The records of ``trace`` (a trace directory or one record file) as a ``pyarrow.Table``
    with flattened dotted column names (see the module doc), in trace order.

    ``columns`` picks and orders columns by name (default: all of ``COLUMNS``). The first call
    parses a JSONL trace and writes its columnar twin; later calls read the twin while every
    record file keeps its size and mtime. ``cache=False`` neither reads nor writes a twin.
    A Parquet trace is read directly (only the fields asked for), without a twin.
    Raises ``TraceError`` (file, line, field) on a bad record or an unknown column name.
    """
    if columns is not None:
        columns = list(columns)
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise TraceError(f"unknown column(s) {unknown}; columns are: {', '.join(COLUMNS)}")
    tf = find_trace(trace)
    if not cache or tf.format == "parquet":
        return _build(tf, columns)
    key = _source_key(tf)
    paths = _cache_paths(tf, Path(trace).is_file())
    for path in paths:
        if _cached_key(path) == key:
            table = _read_cache(path, columns)
            if table is not None:
                return table.replace_schema_metadata(None)
    table = _build(tf)
    _write_cache(table, key, paths)
    return table.select(columns) if columns is not None else table
