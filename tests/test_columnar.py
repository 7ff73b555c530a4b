"""The columnar twin of a trace (``kvtier.trace.columnar``): the same table as decoding every
record, parsed once, reused while the trace is unchanged, rebuilt when it changes."""

from __future__ import annotations

import json
import os

import msgspec
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.schema import TopkRecord, TraceError
from kvtier.sim.synth import SynthConfig, synth_stream, write_trace
from kvtier.trace import columnar
from kvtier.trace.columnar import COLUMNS, column_cache_path, read_columns

CFG = SynthConfig(requests=3, layers=2, steps=5, prompt_len=200, prompt_jitter=30, topk=40,
                  block_size=16)


@pytest.fixture()
def trace_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path / "user-cache"))
    d = tmp_path / "t"
    write_trace(synth_stream(CFG), d)
    return d


def naive_table(path) -> dict[str, list]:
    """Column name -> values, straight from json.loads of every line (nested keys joined
    with dots; an absent scores_topk is None)."""
    cols: dict[str, list] = {c: [] for c in COLUMNS}

    def walk(prefix, obj):
        for k, v in obj.items():
            if isinstance(v, dict) and f"{prefix}{k}" not in cols:
                walk(f"{prefix}{k}.", v)
            else:
                cols[f"{prefix}{k}"].append(v)

    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec.setdefault("scores_topk", None)
        if rec["scores_stats"] is None:
            rec["scores_stats"] = {"min": None, "mean": None, "max": None}
        walk("", rec)
    return cols


def test_columns_equal_every_record_field(trace_dir):
    table = read_columns(trace_dir)
    assert table.column_names == list(COLUMNS)
    assert table.to_pydict() == naive_table(trace_dir / "trace_steps.jsonl")
    assert table.schema == columnar.flat_schema()


def test_twin_is_reused_then_rebuilt_when_the_trace_changes(trace_dir):
    assert column_cache_path(trace_dir) is None
    first = read_columns(trace_dir)
    twin = column_cache_path(trace_dir)
    assert twin == trace_dir / columnar.CACHE_NAME and twin.is_file()
    built = twin.stat().st_mtime_ns
    again = read_columns(trace_dir, ["step_idx", "kv_fetch.hbm.bytes_read"])
    assert again.column_names == ["step_idx", "kv_fetch.hbm.bytes_read"]
    assert again.column("step_idx").equals(first.column("step_idx"))
    assert twin.stat().st_mtime_ns == built  # read, not rewritten
    # append one record: the twin no longer matches, the next read rebuilds it
    path = trace_dir / "trace_steps.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines) + lines[0])
    assert column_cache_path(trace_dir) is None
    grown = read_columns(trace_dir)
    assert grown.num_rows == first.num_rows + 1
    assert column_cache_path(trace_dir) == twin


def test_same_size_rewrite_is_noticed(trace_dir):
    read_columns(trace_dir)
    path = trace_dir / "trace_steps.jsonl"
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"layer_id":1', b'"layer_id":3', 1))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert 3 in read_columns(trace_dir, ["layer_id"]).column("layer_id").to_pylist()


def test_unwritable_trace_dir_falls_back_to_user_cache(trace_dir, tmp_path):
    (trace_dir / columnar.CACHE_NAME).mkdir()  # the twin's place is taken: cannot write there
    table = read_columns(trace_dir)
    twin = column_cache_path(trace_dir)
    assert twin is not None and twin.parent == tmp_path / "user-cache"
    assert read_columns(trace_dir).equals(table)


def test_no_writable_place_still_reads(trace_dir, tmp_path, monkeypatch):
    (trace_dir / columnar.CACHE_NAME).mkdir()
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(blocker / "sub"))
    assert read_columns(trace_dir).num_rows == len(synth_stream(CFG))
    assert column_cache_path(trace_dir) is None


def test_cache_false_writes_nothing(trace_dir):
    assert read_columns(trace_dir, cache=False).num_rows > 0
    assert column_cache_path(trace_dir) is None


def test_single_file_and_directory_twins_differ(trace_dir):
    read_columns(trace_dir / "trace_steps.jsonl")
    assert column_cache_path(trace_dir / "trace_steps.jsonl").name == ".trace_steps.jsonl.columns.arrow"
    assert column_cache_path(trace_dir) is None


def test_unknown_column_and_bad_lines_are_named(trace_dir):
    with pytest.raises(TraceError, match="unknown column"):
        read_columns(trace_dir, ["kv_fetch.hbm"])
    path = trace_dir / "trace_steps.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["prefix"]["prefix_key"] = 7
    lines[2] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"trace_steps.jsonl:3: \$.prefix.prefix_key"):
        read_columns(trace_dir)
    assert column_cache_path(trace_dir) is None  # nothing cached from a bad trace
    del rec["prefix"]["prefix_key"]
    lines[2] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"trace_steps.jsonl:3: .*prefix_key"):
        read_columns(trace_dir)


def test_truncated_last_line(trace_dir):
    path = trace_dir / "trace_steps.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # a complete record without its newline: still truncated
    with pytest.raises(TraceError, match=r"trace_steps.jsonl:\d+: truncated final line"):
        read_columns(trace_dir)


def test_parquet_trace_read_directly(trace_dir, tmp_path):
    from kvtier.trace.convert import convert_trace

    convert_trace(trace_dir, tmp_path / "pq", to="parquet")
    a = read_columns(trace_dir)
    b = read_columns(tmp_path / "pq")
    assert a.equals(b)
    assert column_cache_path(tmp_path / "pq") is None  # Parquet needs no twin
    sub = read_columns(tmp_path / "pq", ["prefix.prefix_key", "layer_id"])
    assert sub.column_names == ["prefix.prefix_key", "layer_id"]


def test_empty_trace(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    (d / "trace_steps.jsonl").write_text("")
    t = read_columns(d)
    assert t.num_rows == 0 and t.column_names == list(COLUMNS)


def _record_line(i: int, pos: list[int], sep: str) -> str:
    rec = {"event": "dsa_topk", "run_name": "r", "dataset": "d", "rank": 0, "world_size": 1,
           "request_id": 0, "layer_id": 0, "step_idx": i, "seq_len_current": i + 1,
           "unique_token_pos_count": len(pos), "offset_min": 0, "offset_p50": 0.5,
           "offset_max": 1, "block_size_tokens": 4, "selected_block_ids": [p // 4 for p in pos],
           "unique_blocks": 1,
           "tokens_per_touched_block": {"mean": 1.0, "p50": 1.0, "p95": 1.0},
           "kv_fetch": {t: {"hit_blocks": [], "bytes_read": 0, "read_ops": 0, "latency_us": None,
                            "batch_size": 0} for t in ("hbm", "local_pool", "remote_pool")},
           "prefix": {"prefix_cache_hit": False, "prefix_cached_blocks": 0, "prefix_key": None,
                      "intersection_ratio": 0.0, "intersection_blocks": "INTER"},
           "selected_token_pos": "POS", "scores_stats": None}
    body = f",{sep}".join(map(str, pos))
    inter = f",{sep}".join(map(str, pos[:2]))
    return (json.dumps(rec).replace('"POS"', f"[{sep}{body}{sep}]")
            .replace('"INTER"', f"[{sep}{inter}{sep}]"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 10**7), max_size=6),
                          st.sampled_from(["", " ", "   ", "\t"])), min_size=1, max_size=6))
def test_bulk_parse_equals_the_strict_decoder(tmp_path_factory, rows):
    """The bulk Arrow parse and the typed per-line decoder give the same table for any
    spacing inside the int lists and for empty lists (the tracer pads lists with spaces)."""
    d = tmp_path_factory.mktemp("b")
    path = d / "trace_steps.jsonl"
    path.write_text("".join(_record_line(i, p, s) + "\n" for i, (p, s) in enumerate(rows)))
    bulk = columnar._parse_jsonl(path)
    strict = columnar.flatten(columnar._strict_table(path))
    assert bulk.equals(strict)
    assert bulk.column("selected_token_pos").to_pylist() == [p for p, _ in rows]
    assert bulk.column("prefix.intersection_blocks").to_pylist() == [p[:2] for p, _ in rows]


@pytest.mark.parametrize("value", ["[[1],[2]]", "[1,[2]]", "5", "[1.5]", '["1"]', "[-1e3]"])
def test_non_integer_lists_are_refused_with_the_line(tmp_path, value):
    path = tmp_path / "trace_steps.jsonl"
    good = _record_line(0, [3], "")
    bad = _record_line(1, [3], "").replace('"selected_token_pos": [3]',
                                           f'"selected_token_pos": {value}')
    path.write_text(good + "\n" + bad + "\n")
    with pytest.raises(TraceError, match=r"trace_steps.jsonl:2: .*selected_token_pos"):
        read_columns(tmp_path)


def test_to_numpy_zero_copy_lists(trace_dir):
    """The documented way to get a list column as flat numpy + offsets."""
    col = read_columns(trace_dir, ["selected_token_pos"]).column(0).combine_chunks()
    flat = np.asarray(col.flatten())
    offs = np.asarray(col.offsets)
    recs = msgspec.json.Decoder(TopkRecord).decode_lines((trace_dir / "trace_steps.jsonl").read_bytes())
    assert flat.tolist() == [p for r in recs for p in r.selected_token_pos]
    assert np.diff(offs).tolist() == [len(r.selected_token_pos) for r in recs]
    assert isinstance(col, pa.ListArray)


def test_other_events_and_nested_nulls_are_refused(trace_dir):
    """The bulk parse accepts only dsa_topk records without nulls where the record has none
    (nested fields included); the strict decoder then names the line and field."""
    path = trace_dir / "trace_steps.jsonl"
    lines = path.read_text().splitlines()
    good = list(lines)
    lines[1] = lines[1].replace('"dsa_topk"', '"dsa_topx"', 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"trace_steps.jsonl:2: \$.event"):
        read_columns(trace_dir)
    rec = json.loads(good[2])
    rec["kv_fetch"]["local_pool"]["bytes_read"] = None
    good[2] = json.dumps(rec)
    path.write_text("\n".join(good) + "\n")
    with pytest.raises(TraceError, match=r"trace_steps.jsonl:3: \$.kv_fetch.local_pool.bytes_read"):
        read_columns(trace_dir)
