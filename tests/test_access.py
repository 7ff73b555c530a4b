"""Reading traces into the access stream, re-bucketing and the single-tier key stream."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from kvtier.policies import block_key
from kvtier.sim.access import (
    AccessStream,
    TraceReadError,
    key_stream,
    read_access_stream,
    rebucket,
    trace_files,
    working_set,
)
from kvtier.sim.synth import SynthConfig, synth_stream, write_trace
from kvtier.trace.reader import SkippedLines, SkippedLinesWarning

CFG = SynthConfig(requests=3, layers=2, steps=6, prompt_len=300, prompt_jitter=50, topk=48,
                  block_size=16)


@pytest.fixture(scope="module")
def stream() -> AccessStream:
    return synth_stream(CFG)


@pytest.fixture()
def trace_dir(tmp_path, stream):
    write_trace(stream, tmp_path / "t")
    return tmp_path / "t"


def assert_same(a: AccessStream, b: AccessStream) -> None:
    assert a.request_ids == b.request_ids
    for f in ("req", "layer", "step", "seq_len", "offsets", "pos"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert a.block_size == b.block_size


def test_jsonl_roundtrip(trace_dir, stream):
    assert_same(read_access_stream(trace_dir), stream)
    assert_same(read_access_stream(trace_dir / "trace_steps.jsonl"), stream)


def naive_keys(path, block_size):
    """Straight from the JSON: per record in file order, ascending unique blocks."""
    order: dict[int, int] = {}
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        ri = order.setdefault(r["request_id"], len(order))
        for b in sorted({p // block_size for p in r["selected_token_pos"]}):
            out.append(block_key(ri, r["layer_id"], b))
    return out


@pytest.mark.parametrize("bsz", [1, 7, 16, 64, 1024])
def test_key_stream_matches_naive(trace_dir, bsz):
    keys = key_stream(trace_dir, bsz)
    assert keys.tolist() == naive_keys(trace_dir / "trace_steps.jsonl", bsz)
    assert working_set(keys) == len(set(keys.tolist()))


def test_rebucket_offsets(stream):
    bs = rebucket(stream, 32)
    for i in range(len(stream)):
        pos = stream.pos[stream.offsets[i]:stream.offsets[i + 1]]
        assert bs.blocks[bs.offsets[i]:bs.offsets[i + 1]].tolist() == np.unique(pos // 32).tolist()
    with pytest.raises(ValueError, match="block_size"):
        rebucket(stream, 0)


def test_unsorted_duplicate_positions_are_normalised(trace_dir):
    path = trace_dir / "trace_steps.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["selected_token_pos"] = list(reversed(rec["selected_token_pos"])) + rec[
        "selected_token_pos"][:3]
    lines[0] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    s = read_access_stream(trace_dir)
    first = s.pos[s.offsets[0]:s.offsets[1]]
    assert first.tolist() == sorted(set(rec["selected_token_pos"]))


def test_sharded_jsonl(tmp_path, stream):
    one = tmp_path / "one"
    write_trace(stream, one)
    lines = (one / "trace_steps.jsonl").read_bytes().splitlines(keepends=True)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "trace_steps.0.jsonl").write_bytes(b"".join(lines[:5]))
    (d / "trace_steps.1.jsonl").write_bytes(b"".join(lines[5:]))
    meta = {"schema_version": 1, "run_name": "x", "dataset": "synthetic", "config": {},
            "format": "jsonl", "shards": ["trace_steps.0.jsonl", "trace_steps.1.jsonl"]}
    (d / "trace_meta.json").write_text(json.dumps(meta))
    assert_same(read_access_stream(d), stream)
    meta["shards"].append("missing.jsonl")
    (d / "trace_meta.json").write_text(json.dumps(meta))
    with pytest.raises(TraceReadError, match="shards"):
        read_access_stream(d)


def test_parquet(tmp_path, trace_dir, stream):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [msgspec.json.decode(x) for x in (trace_dir / "trace_steps.jsonl").read_bytes().splitlines()]
    table = pa.table({
        "request_id": [r["request_id"] for r in rows],
        "layer_id": pa.array([r["layer_id"] for r in rows], pa.int16()),
        "step_idx": [r["step_idx"] for r in rows],
        "seq_len_current": [r["seq_len_current"] for r in rows],
        "block_size_tokens": [r["block_size_tokens"] for r in rows],
        "selected_token_pos": pa.array([r["selected_token_pos"] for r in rows],
                                       pa.list_(pa.int32())),
    })
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(table, d / "trace_steps.parquet", row_group_size=7)
    assert_same(read_access_stream(d), stream)
    pq.write_table(table.drop(["step_idx"]), d / "trace_steps.parquet")
    with pytest.raises(TraceReadError, match="step_idx"):
        read_access_stream(d)


def test_bad_line_is_skipped_counted_and_named(trace_dir):
    """A line that is not a record is skipped (never shifted into other columns); the one
    warning names file, line and field."""
    path = trace_dir / "trace_steps.jsonl"
    lines = path.read_text().splitlines()
    whole = read_access_stream(trace_dir, SkippedLines())
    rec = json.loads(lines[3])
    rec["layer_id"] = "three"
    lines[3] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(SkippedLinesWarning) as got:
        s = read_access_stream(trace_dir)
    msg = str(got[0].message)
    assert "trace_steps.jsonl:4: invalid_record: $.layer_id" in msg and "\n" not in msg
    assert len(s) == len(whole) - 1
    keep = np.r_[0:3, 4:len(whole)]
    assert np.array_equal(s.layer, whole.layer[keep]) and np.array_equal(s.step, whole.step[keep])
    log = SkippedLines()
    read_access_stream(trace_dir, log)  # from the twin: the same count, no warning
    assert log.counts == {"invalid_record": 1}


def test_truncated_line_and_missing_dir(trace_dir, tmp_path):
    path = trace_dir / "trace_steps.jsonl"
    data = path.read_bytes()
    n = data.count(b"\n")
    path.write_bytes(data[: len(data) - 40])
    log = SkippedLines()
    assert len(read_access_stream(trace_dir, log)) == n - 1
    assert log.counts == {"truncated_final_line": 1} and log.lines == {"trace_steps.jsonl": [n]}
    path.write_bytes(b"garbage\n" + data[:30])  # nothing is a record: an error
    with pytest.raises(TraceReadError, match=r"no record could be read"):
        read_access_stream(trace_dir)
    with pytest.raises(TraceReadError, match="no such trace"):
        read_access_stream(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceReadError, match="trace_steps.jsonl"):
        read_access_stream(tmp_path / "empty")


def test_semantic_errors(trace_dir):
    path = trace_dir / "trace_steps.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["block_size_tokens"] = 32
    lines[2] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceReadError, match="record 3: field `block_size_tokens`"):
        read_access_stream(trace_dir)
    rec["block_size_tokens"] = 16
    rec["selected_token_pos"][0] = -5
    lines[2] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceReadError, match="record 3: field `selected_token_pos`"):
        read_access_stream(trace_dir)


def test_request_order_is_first_appearance(stream):
    assert stream.request_ids == [0, 1, 2]
    first = [int(np.flatnonzero(stream.req == r)[0]) for r in range(3)]
    assert first == sorted(first)


def test_no_torch_import():
    import subprocess
    import sys

    code = ("import sys, kvtier.sim.access, kvtier.sim.cachesim, kvtier.sim.sweep, kvtier.policies.registry;"
            "from kvtier.policies import load_policy;"
            "[load_policy(n) for n in ('lru','fifo','lfu','arc','s3fifo','belady','distance',"
            "'dsa_aware')];"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_real_tracer_shards_and_parquet(tmp_path):
    """Traces written by the real tracer (kvtier sanity, sharded) and kvtier convert."""
    from kvtier.cli import main

    jl, pqd = tmp_path / "jl", tmp_path / "pq"
    assert main(["sanity", "--out", str(jl), "--trace-shard-records", "40", "--requests", "3",
                 "--new-tokens", "6"]) == 0
    assert len(list(jl.glob("trace_steps.*.jsonl"))) > 1
    assert main(["convert", str(jl), str(pqd), "--to", "parquet"]) == 0
    a, b = read_access_stream(jl), read_access_stream(pqd)
    assert_same(a, b)
    expect = []
    order: dict[int, int] = {}
    for shard in json.loads((jl / "trace_meta.json").read_text())["shards"]:
        for line in (jl / shard).read_text().splitlines():
            r = json.loads(line)
            ri = order.setdefault(r["request_id"], len(order))
            expect += [block_key(ri, r["layer_id"], x) for x in r["selected_block_ids"]]
    assert key_stream(b).tolist() == expect  # recorded blocks == re-bucketed at the same size


def test_empty_trace_takes_block_size_from_meta(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    (d / "trace_steps.jsonl").write_text("")
    assert len(read_access_stream(d)) == 0 and read_access_stream(d).block_size == 1
    meta = {"schema_version": 1, "run_name": "x", "dataset": "d", "format": "jsonl",
            "config": {"trace": {"kv_block_size": 64}}}
    (d / "trace_meta.json").write_text(json.dumps(meta))
    s = read_access_stream(d)
    assert s.block_size == 64 and rebucket(s, 64).keys().shape == (0,)


def test_one_file_finder_and_typed_record_reader(tmp_path, stream):
    """``trace_files`` is ``reader.find_trace``; ``iter_records`` decodes into any record
    type (here three fields) and still names file and line of a bad record."""
    from kvtier.trace.reader import TraceError, find_trace, iter_records

    class Few(msgspec.Struct):
        request_id: int
        layer_id: int
        step_idx: int

    d = tmp_path / "t"
    write_trace(stream, d)
    tf = find_trace(d)
    assert trace_files(d) == (tf.format, tf.files)
    got = list(iter_records(tf, Few))
    assert [r.request_id for r in got] == [stream.request_ids[i] for i in stream.req.tolist()]
    assert [r.layer_id for r in got] == stream.layer.tolist()
    path = d / "trace_steps.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"step_idx":', b'"step_idx":"x","_":', 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(TraceError, match=r"trace_steps.jsonl:2: \$.step_idx"):
        list(iter_records(find_trace(d), Few))
