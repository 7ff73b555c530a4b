"""Finding and reading the record files of a trace directory (JSONL shards or Parquet).

Readers yield records with their location (file, 1-based line or row), so every consumer can
name exactly where a bad record sits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from kvtier.schema import META_FILE, PARQUET_FILE, TRACE_FILE, TopkRecord, TraceError, TraceMeta
from kvtier.trace import legacy
from kvtier.trace.parquet import iter_parquet_records

__all__ = ["PARQUET_FILE", "TraceError", "TraceFiles", "find_trace", "iter_records",
           "iter_records_with_lines", "read_meta"]


@dataclass(frozen=True, slots=True)
class TraceFiles:
    root: Path
    meta: TraceMeta | None
    files: list[Path]
    format: str  # "jsonl" or "parquet"


def read_meta(path: Path) -> TraceMeta:
    try:
        return msgspec.json.decode(path.read_bytes(), type=TraceMeta)
    except msgspec.ValidationError as exc:
        raise TraceError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise TraceError(f"{path}: malformed JSON: {exc}") from None
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from None


def find_trace(path: str | Path, require_meta: bool = False) -> TraceFiles:
    """The record files of a trace directory (or of a single ``.jsonl`` / ``.parquet`` file)."""
    p = Path(path)
    if p.is_file():
        fmt = "parquet" if p.suffix == ".parquet" else "jsonl"
        meta_path = p.parent / META_FILE
        meta = read_meta(meta_path) if meta_path.is_file() else None
        return TraceFiles(p.parent, meta, [p], fmt)
    if not p.is_dir():
        raise TraceError(f"{p}: no such trace directory or file")
    meta_path = p / META_FILE
    meta = None
    if meta_path.is_file():
        meta = read_meta(meta_path)
    elif require_meta:
        raise TraceError(f"{meta_path}: missing (needed to recompute the summary)")
    if meta is not None and meta.shards:
        files = [p / name for name in meta.shards]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise TraceError(f"{missing[0]}: listed in {META_FILE} field `shards` but missing")
        return TraceFiles(p, meta, files, meta.format)
    if (p / PARQUET_FILE).is_file():
        return TraceFiles(p, meta, [p / PARQUET_FILE], "parquet")
    files = sorted(p.glob("trace_steps.*.jsonl")) or ([p / TRACE_FILE] if (p / TRACE_FILE).is_file() else [])
    if not files:
        raise TraceError(f"{p}: no {TRACE_FILE}, trace_steps.NNNNN.jsonl or {PARQUET_FILE}")
    return TraceFiles(p, meta, files, "jsonl")


def iter_jsonl_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without newline, complete) for every line of a JSONL file."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            complete = line.endswith(b"\n")
            yield lineno, line.rstrip(b"\r\n") if complete else line, complete


def location_of(exc: msgspec.ValidationError) -> tuple[str, str]:
    """Split msgspec's ``message - at `$.a.b` `` into (field path, message)."""
    text = str(exc)
    if " - at `" in text:
        msg, _, path = text.rpartition(" - at `")
        return path.rstrip("`"), msg
    return "$", text


def iter_records(tf: TraceFiles, record_type: type = TopkRecord) -> Iterator:
    """Every record of the trace, in order; raises TraceError at the first bad one.

    ``record_type`` is the msgspec struct JSONL lines decode into (a subset of the record's
    fields, or ``TopkRecord`` with some fields as ``msgspec.Raw``, to skip work); Parquet rows
    are always full ``TopkRecord``s, which have every attribute such a type names."""
    for rec, _line in iter_records_with_lines(tf, record_type):
        yield rec


def iter_records_with_lines(tf: TraceFiles, record_type: type = TopkRecord
                            ) -> Iterator[tuple[object, bytes | None]]:
    """``iter_records`` that also yields each JSONL record's line (without the newline), so a
    rewriter can copy unchanged bytes; ``None`` for Parquet rows."""
    if tf.format == "parquet":
        for path in tf.files:
            for row, rec in iter_parquet_records(path):
                if isinstance(rec, Exception):
                    raise TraceError(f"{path}:row {row}: {rec}")
                yield rec, None
        return
    dec = msgspec.json.Decoder(record_type)
    for path in tf.files:
        for lineno, line, complete in iter_jsonl_lines(path):
            if not line.strip():
                continue
            if not complete:
                raise TraceError(f"{path}:{lineno}: truncated final line (no newline); "
                                 "the records before it are intact")
            try:
                yield dec.decode(line), line
            except msgspec.ValidationError as exc:
                old = legacy.describe(line, tf.root if len(tf.files) > 1 else path)
                if old is not None:
                    raise TraceError(old) from None
                field, msg = location_of(exc)
                raise TraceError(f"{path}:{lineno}: {field}: {msg}") from None
            except msgspec.DecodeError as exc:
                raise TraceError(f"{path}:{lineno}: malformed JSON: {exc}") from None
