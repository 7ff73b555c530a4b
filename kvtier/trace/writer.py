"""Trace directory writer: ``trace_meta.json`` at open, JSONL records from a background thread.

The tracer hands over chunks of complete lines (one decode step at a time); a thread writes
them with unbuffered ``write`` calls, so a killed process leaves every file valid up to its
last complete line and the model's thread never waits on the disk (bounded queue: it waits only
if the disk falls behind by ``max_pending`` chunks). Optional sharding starts a new
``trace_steps.NNNNN.jsonl`` after about ``shard_records`` records.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec

from kvtier.schema import META_FILE, REQUESTS_FILE, SUMMARY_FILE, TRACE_FILE, TraceMeta

#: buffers per writev call (POSIX IOV_MAX is at least 16; Linux and macOS have 1024)
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16

#: file names a trace directory may contain; ``force=True`` removes exactly these
TRACE_GLOBS = ("trace_steps.jsonl", "trace_steps.*.jsonl", "trace_steps.parquet",
               META_FILE, SUMMARY_FILE, REQUESTS_FILE, ".trace_steps*.columns.arrow")


def _nbytes(buf: bytes | bytearray | memoryview) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def shard_name(index: int) -> str:
    return f"trace_steps.{index:05d}.jsonl"


def existing_trace_files(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    found: list[Path] = []
    for pattern in TRACE_GLOBS:
        found.extend(sorted(out_dir.glob(pattern)))
    return found


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Create ``out_dir``; refuse to touch an existing trace unless ``force`` (then remove
    only trace files, nothing else in the directory)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    old = existing_trace_files(out_dir)
    if old and not force:
        raise FileExistsError(f"{out_dir} already holds a trace ({old[0].name}); use --force to overwrite")
    for path in old:
        path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON (indented) via a temporary file + rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(obj), indent=2) + b"\n")
    os.replace(tmp, path)


class RequestLog:
    """``requests.jsonl``: one JSON line per admitted request, keyed by its integer
    ``request_id``, appended (unbuffered, whole lines) as each batch begins, so a killed run
    keeps the lines of every request it started."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(out_dir) / REQUESTS_FILE
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
                                       0o644)
        self._enc = msgspec.json.Encoder(enc_hook=_plain)

    def write(self, rows: list[dict]) -> None:
        if self._fd is None:
            raise RuntimeError("requests log is closed")
        data = b"".join(self._enc.encode(r) + b"\n" for r in rows)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _plain(obj: object) -> object:
    """numpy scalars and arrays in dataset metadata; anything else as its str."""
    tolist = getattr(obj, "tolist", None)
    return tolist() if tolist is not None else str(obj)


class TraceWriter:
    """Writes one trace directory. Use ``write(chunk, n_records)`` then ``close()``."""

    def __init__(self, out_dir: str | os.PathLike, meta: TraceMeta, *, force: bool = False,
                 shard_records: int = 0, background: bool = True, max_pending: int = 8) -> None:
        if shard_records < 0:
            raise ValueError(f"shard_records must be >= 0, got {shard_records}")
        self.out_dir = Path(out_dir)
        prepare_out_dir(self.out_dir, force)
        self.meta = meta
        self.shard_records = shard_records
        self.records = 0
        self.bytes = 0
        self._shard_index = -1
        self._shard_count = 0
        self._fd: int | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.meta.format = "jsonl"
        self.meta.shards = []
        self._open_next()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=max_pending)
            self._thread = threading.Thread(target=self._run, name="kvtier-trace-writer", daemon=True)
            self._thread.start()

    # -- file handling (writer thread, or caller thread without background) --
    def _open_next(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._shard_index += 1
        self._shard_count = 0
        name = TRACE_FILE if self.shard_records == 0 else shard_name(self._shard_index)
        self._fd = os.open(self.out_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.meta.shards.append(name)
        write_json_atomic(self.out_dir / "trace_meta.json", self.meta)

    def _write_now(self, chunk: bytes | bytearray | memoryview | list, n_records: int,
                   done: Callable[[], None] | None = None) -> None:
        if self.shard_records and self._shard_count >= self.shard_records:
            self._open_next()
        if isinstance(chunk, list):
            self._writev(chunk)
        else:
            view = memoryview(chunk)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            del view
        self._shard_count += n_records
        if done is not None:
            done()

    def _writev(self, pieces: list) -> None:
        """Write a list of buffers in order with ``writev`` (no joining copy), resuming after
        partial writes; at most ``_IOV_MAX`` buffers per call."""
        if not hasattr(os, "writev"):  # not POSIX: one joined write
            self._write_now(b"".join(pieces), 0)
            return
        i = 0
        n = len(pieces)
        while i < n:
            batch = pieces[i:i + _IOV_MAX]
            written = os.writev(self._fd, batch)
            for buf in batch:  # skip the buffers written whole
                size = _nbytes(buf)
                if written < size:
                    break
                written -= size
                i += 1
            if written and i < n:  # a partial buffer: write its rest on its own
                rest = memoryview(pieces[i]).cast("B")[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
                i += 1

    def _run(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._write_now(*item)
                except BaseException as exc:  # surfaced to the caller on the next call
                    self._error = exc

    # -- public API (caller thread) --
    def write(self, chunk: bytes | bytearray | memoryview | list, n_records: int,
              done: Callable[[], None] | None = None) -> None:
        """Queue ``n_records`` complete JSONL lines: one buffer, or a list of buffers written in
        order (``writev``, no join). ``chunk`` must not be modified until it is written; then
        ``done()`` is called (on the writer thread), e.g. to reuse its buffer."""
        if self._closed:
            raise RuntimeError("trace writer is closed")
        if self._error is not None:
            raise OSError(f"trace writer failed: {self._error}") from self._error
        if not chunk:
            return
        self.records += n_records
        self.bytes += sum(map(_nbytes, chunk)) if isinstance(chunk, list) else _nbytes(chunk)
        if self._queue is None:
            self._write_now(chunk, n_records, done)
        else:
            self._queue.put((chunk, n_records, done))

    def close(self) -> None:
        """Drain the queue and close the file; raises the writer thread's error, if any."""
        if self._closed:
            return
        self._closed = True
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._error is not None:
            raise OSError(f"trace writer failed: {self._error}") from self._error
