"""Finding and reading the record files of a trace directory (JSONL shards or Parquet).

Readers yield records with their location (file, 1-based line or row), so every consumer can
name exactly where a bad record sits.

**Lines that are not records** (docs/INSTRUMENTATION.md, "Lines that are not records"): every
reader of a trace but ``kvtier validate`` skips them and counts them by reason in a
``SkippedLines``: ``truncated_final_line`` (the last line of a file, without its newline, that
does not decode: what a killed writer leaves), ``malformed_json`` (a line that is not JSON) and
``invalid_record`` (JSON that is not a record of the schema: a wrong type, a missing or unknown
field). A final line without newline that decodes as a whole record is kept. A line of kvtier's
earlier format (schema 1) is not skipped: the trace is refused, saying how to upgrade it. The
consumer reports the count in one warning line (``SkippedLinesWarning``) and, where its output
has a summary, there; a read that keeps nothing is an error.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from kvtier.schema import META_FILE, PARQUET_FILE, TRACE_FILE, TopkRecord, TraceError, TraceMeta
from kvtier.trace import legacy
from kvtier.trace.parquet import iter_parquet_records

__all__ = ["PARQUET_FILE", "SKIP_REASONS", "SkippedLines", "SkippedLinesWarning", "TraceError",
           "TraceFiles", "find_trace", "iter_records", "iter_records_with_lines", "read_meta"]

#: why a line is not a record (the keys of ``SkippedLines.counts``, in this order)
SKIP_REASONS = ("truncated_final_line", "malformed_json", "invalid_record")
#: locations kept as examples
SKIP_EXAMPLES = 5


class SkippedLinesWarning(UserWarning):
    """Lines of a trace that are not records were skipped (counted by reason)."""


@dataclass
class SkippedLines:
    """Lines of a trace's record files that are not records, skipped and counted.

    ``counts``: reason (``SKIP_REASONS``) -> lines; ``lines``: record file name -> the skipped
    1-based line numbers, ascending (what a reader that maps records back to lines, such as
    ``kvtier replay``, leaves out); ``examples``: the first few ``file:line: reason: detail``.
    """

    counts: dict[str, int] = field(default_factory=dict)
    lines: dict[str, list[int]] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, path: Path, lineno: int, reason: str, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.lines.setdefault(path.name, []).append(lineno)
        if len(self.examples) < SKIP_EXAMPLES:
            self.examples.append(f"{path.name}:{lineno}: {reason}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def update(self, other: SkippedLines) -> None:
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        for name, nums in other.lines.items():
            self.lines[name] = sorted(self.lines.get(name, []) + nums)
        self.examples.extend(other.examples[:SKIP_EXAMPLES - len(self.examples)])

    def by_reason(self) -> dict[str, int]:
        """Every reason with its count (0 where none), in ``SKIP_REASONS`` order."""
        return {r: self.counts.get(r, 0) for r in SKIP_REASONS}

    def to_json(self) -> bytes:
        return json.dumps({"counts": self.counts, "lines": self.lines,
                           "examples": self.examples}).encode()

    @classmethod
    def from_json(cls, data: bytes | None) -> SkippedLines:
        if not data:
            return cls()
        obj = json.loads(data)
        return cls(dict(obj.get("counts", {})), {k: list(v) for k, v in obj.get("lines", {}).items()},
                   list(obj.get("examples", [])))

    def describe(self) -> str:
        """``3 lines (truncated_final_line 1, malformed_json 2); first: FILE:LINE: ...``"""
        n = self.total
        reasons = ", ".join(f"{r} {c}" for r, c in self.by_reason().items() if c)
        first = f"; first: {self.examples[0]}" if self.examples else ""
        return f"{n:,} line{'s' if n != 1 else ''} ({reasons}){first}"


def warn_skipped(skipped: SkippedLines, where: str | Path, kept: int, stacklevel: int = 3
                 ) -> None:
    """The one warning line of a read that skipped lines (nothing when it skipped none)."""
    if skipped:
        warnings.warn(f"{where}: skipped {skipped.describe()}; read the other {kept:,} records "
                      "(kvtier validate lists every bad line)", SkippedLinesWarning,
                      stacklevel=stacklevel)


def nothing_kept(skipped: SkippedLines, where: str | Path) -> TraceError:
    """The error of a read whose every line was skipped."""
    return TraceError(f"{where}: no record could be read: skipped {skipped.describe()}")


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


def iter_records(tf: TraceFiles, record_type: type = TopkRecord,
                 skipped: SkippedLines | None = None) -> Iterator:
    """Every record of the trace, in order. Strict without ``skipped`` (a TraceError at the
    first line that is not a record, a truncated final line included); with it, such lines
    are skipped and counted there (the rule of the module doc).

    ``record_type`` is the msgspec struct JSONL lines decode into (a subset of the record's
    fields, or ``TopkRecord`` with some fields as ``msgspec.Raw``, to skip work); Parquet rows
    are always full ``TopkRecord``s, which have every attribute such a type names."""
    for rec, _line in iter_records_with_lines(tf, record_type, skipped):
        yield rec


def bisect_lines(lines: list, parse, refused) -> list:
    """The results of parsing ``lines`` (any items, in order) in as few ``parse`` calls as
    possible: ``parse(lines)`` returns one result, or None where it refuses any of them; a
    refused group is split in halves down to single items, each handed to ``refused(item)``
    (a list of results, empty to skip it). The columnar twin's bulk parse and the analysis's
    streamed parse isolate the lines that are not records with it."""
    got = parse(lines)
    if got is not None:
        return [got]
    if len(lines) == 1:
        return refused(lines[0])
    half = len(lines) // 2
    return bisect_lines(lines[:half], parse, refused) + bisect_lines(lines[half:], parse, refused)


def classify_line(line: bytes, dec, path: Path, lineno: int, complete: bool, tf: TraceFiles
                  ) -> tuple[object, str, str]:
    """``(record, "", "")`` for a line that decodes, else ``(None, reason, detail)``; raises
    TraceError for a line of the earlier format (the whole trace is of that form)."""
    try:
        return dec.decode(line), "", ""
    except msgspec.ValidationError as exc:
        old = legacy.describe(line, tf.root if len(tf.files) > 1 else path)
        if old is not None:
            raise TraceError(old) from None
        if not complete:
            return None, "truncated_final_line", "no newline, and not a whole record"
        field_, msg = location_of(exc)
        return None, "invalid_record", f"{field_}: {msg}"
    except msgspec.DecodeError as exc:
        if not complete:
            return None, "truncated_final_line", "no newline, and not a whole record"
        return None, "malformed_json", f"malformed JSON: {exc}"


def iter_records_with_lines(tf: TraceFiles, record_type: type = TopkRecord,
                            skipped: SkippedLines | None = None
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
            if skipped is None and not complete:
                raise TraceError(f"{path}:{lineno}: truncated final line (no newline); "
                                 "the records before it are intact")
            rec, reason, detail = classify_line(line, dec, path, lineno, complete, tf)
            if rec is not None:
                yield rec, line
            elif skipped is not None:
                skipped.add(path, lineno, reason, detail)
            else:
                raise TraceError(f"{path}:{lineno}: {detail}")
