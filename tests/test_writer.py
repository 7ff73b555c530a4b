"""Trace writer: complete lines only, sharding, no overwrite without force, error surfacing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest

from kvtier.schema import TraceMeta
from kvtier.trace.writer import TraceWriter, prepare_out_dir


def meta() -> TraceMeta:
    return TraceMeta(schema_version=1, run_name="r", dataset="d", config={"x": 1})


@pytest.mark.parametrize("background", [True, False])
def test_writes_chunks_in_order(tmp_path, background):
    w = TraceWriter(tmp_path / "t", meta(), background=background)
    for i in range(50):
        w.write(b"".join(b'{"i":%d}\n' % (i * 3 + j) for j in range(3)), 3)
    w.close()
    lines = (tmp_path / "t" / "trace_steps.jsonl").read_bytes().splitlines()
    assert [msgspec.json.decode(x)["i"] for x in lines] == list(range(150))
    m = msgspec.json.decode((tmp_path / "t" / "trace_meta.json").read_bytes(), type=TraceMeta)
    assert m.shards == ["trace_steps.jsonl"] and m.config == {"x": 1}
    with pytest.raises(RuntimeError):
        w.write(b"x\n", 1)


def test_sharding(tmp_path):
    w = TraceWriter(tmp_path / "t", meta(), shard_records=4)
    for _ in range(5):
        w.write(b'{"a":1}\n{"a":2}\n', 2)
    w.close()
    names = sorted(p.name for p in (tmp_path / "t").glob("trace_steps.*.jsonl"))
    assert names == ["trace_steps.00000.jsonl", "trace_steps.00001.jsonl", "trace_steps.00002.jsonl"]
    m = msgspec.json.decode((tmp_path / "t" / "trace_meta.json").read_bytes(), type=TraceMeta)
    assert m.shards == names
    assert sum(len((tmp_path / "t" / n).read_bytes().splitlines()) for n in names) == 10


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "t"
    TraceWriter(out, meta()).close()
    (out / "notes.txt").write_text("keep me")
    (out / "trace_steps.jsonl").write_bytes(b"old\n")
    with pytest.raises(FileExistsError, match="--force"):
        TraceWriter(out, meta())
    assert (out / "trace_steps.jsonl").read_bytes() == b"old\n"
    TraceWriter(out, meta(), force=True).close()
    assert (out / "trace_steps.jsonl").read_bytes() == b""
    assert (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        prepare_out_dir(tmp_path / "file", force=True)


def test_background_errors_surface(tmp_path):
    w = TraceWriter(tmp_path / "t", meta())
    os.close(w._fd)  # simulate the disk going away under the writer thread
    w.write(b"a\n", 1)
    deadline = time.time() + 5
    while w._error is None and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="trace writer failed"):
        w.write(b"b\n", 1)
    w._fd = None
    with pytest.raises(OSError):
        w.close()


def test_killed_writer_leaves_complete_lines(tmp_path):
    out = tmp_path / "t"
    code = (
        "import sys\nfrom kvtier.trace.writer import TraceWriter\nfrom kvtier.schema import TraceMeta\n"
        f"w = TraceWriter({str(out)!r}, TraceMeta(schema_version=1, run_name='r', dataset='d', config={{}}))\n"
        "line = b'{\"pad\":\"' + b'x' * 5000 + b'\"}\\n'\n"
        "print('ready', flush=True)\n"
        "while True:\n    w.write(line * 50, 50)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = (out / "trace_steps.jsonl").read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    assert complete, "nothing was written before the kill"
    for line in complete.splitlines():
        assert msgspec.json.decode(line)["pad"] == "x" * 5000


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("limit", [None, 1, 7, 64])
def test_buffer_lists_are_written_in_order_through_partial_writes(tmp_path, monkeypatch,
                                                                  background, limit):
    """A chunk given as a list of buffers (the tracer's numpy path) lands byte for byte as
    their concatenation, also when writev writes only part of them (``limit`` bytes per
    call) and with more buffers than one writev takes; ``done`` runs after each write."""
    import kvtier.trace.writer as wmod

    real = os.writev
    if limit is not None:
        def short(fd, bufs):
            data = b"".join(bytes(b) for b in bufs)[:limit]
            return real(fd, [data])
        monkeypatch.setattr(wmod.os, "writev", short)
    monkeypatch.setattr(wmod, "_IOV_MAX", 5)
    done: list[int] = []
    w = TraceWriter(tmp_path / "t", meta(), background=background)
    want = b""
    for i in range(6):
        pieces = [b'{"i":%d,' % i, memoryview(b'"pad":"' + b"x" * (i * 13) + b'"'), b"}\n"] * 4
        w.write(pieces, 4, done=lambda i=i: done.append(i))
        want += b"".join(bytes(p) for p in pieces)
    w.close()
    assert (tmp_path / "t" / "trace_steps.jsonl").read_bytes() == want
    assert done == list(range(6)) and w.bytes == len(want)
