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
from kvtier.trace.parquet import arrow_schema, flatten
from kvtier.trace.reader import SkippedLines, SkippedLinesWarning, TraceFiles, iter_records

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
    n = len(lines)
    rec = json.loads(lines[2])
    rec["prefix"]["prefix_key"] = 7
    lines[2] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    log = SkippedLines()
    assert read_columns(trace_dir, skipped=log).num_rows == n - 1
    assert log.counts == {"invalid_record": 1} and log.lines == {"trace_steps.jsonl": [3]}
    assert log.examples[0].startswith("trace_steps.jsonl:3: invalid_record: $.prefix.prefix_key")
    del rec["prefix"]["prefix_key"]
    lines[2] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    log = SkippedLines()
    read_columns(trace_dir, skipped=log)
    assert log.counts == {"invalid_record": 1} and "prefix_key" in log.examples[0]


def test_truncated_last_line(trace_dir):
    path = trace_dir / "trace_steps.jsonl"
    data = path.read_bytes()
    n = data.count(b"\n")
    path.write_bytes(data[:-1])  # a whole record without its newline: kept
    log = SkippedLines()
    assert read_columns(trace_dir, skipped=log).num_rows == n and not log
    path.write_bytes(data[:-40])  # cut inside the last record: skipped, counted
    log = SkippedLines()
    table = read_columns(trace_dir, skipped=log)
    assert table.num_rows == n - 1
    assert log.counts == {"truncated_final_line": 1} and log.lines == {"trace_steps.jsonl": [n]}
    assert table.to_pydict() == naive_table_of(data[:data.rfind(b"\n", 0, len(data) - 1) + 1])


def naive_table_of(data: bytes) -> dict[str, list]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.jsonl"
        p.write_bytes(data)
        return naive_table(p)


def test_skips_are_remembered_by_the_twin_and_warned_once(trace_dir):
    """The second read reports what the first skipped (from the twin, without parsing
    again); without ``skipped`` the read warns in one line."""
    path = trace_dir / "trace_steps.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    n = len(lines)
    lines.insert(4, b"garbage that is not JSON\n")
    path.write_bytes(b"".join(lines)[:-25])  # and a killed run's half line at the end
    with pytest.warns(SkippedLinesWarning) as got:
        first = read_columns(trace_dir)
    assert len(got) == 1
    msg = str(got[0].message)
    assert "skipped 2 lines (truncated_final_line 1, malformed_json 1)" in msg
    assert "trace_steps.jsonl:5: malformed_json" in msg and "\n" not in msg
    assert first.num_rows == n - 1
    twin = column_cache_path(trace_dir)
    built = twin.stat().st_mtime_ns
    log = SkippedLines()
    again = read_columns(trace_dir, ["step_idx"], skipped=log)
    assert twin.stat().st_mtime_ns == built and again.num_rows == n - 1
    assert log.counts == {"truncated_final_line": 1, "malformed_json": 1}
    assert log.lines == {"trace_steps.jsonl": [5, n + 1]}
    assert columnar.twin_skipped(twin).counts == log.counts


def test_a_trace_of_no_records_is_an_error(tmp_path):
    d = tmp_path / "g"
    d.mkdir()
    (d / "trace_steps.jsonl").write_text('garbage\n{"event": "dsa_topk"}\n[1, 2]\n{"half')
    with pytest.raises(TraceError, match=r"no record could be read: skipped 4 lines "
                                         r"\(truncated_final_line 1, malformed_json 1, "
                                         r"invalid_record 2\)"):
        read_columns(d)
    assert column_cache_path(d) is None


def test_a_schema_1_trace_is_refused_not_skipped(tmp_path):
    from kvtier.trace.legacy import describe  # noqa: F401  (the message's source)

    d = tmp_path / "old"
    write_trace(synth_stream(CFG), d)
    path = d / "trace_steps.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    for r in recs:
        r["request_id"] = f"req-{r['request_id']}"
        for t in r["kv_fetch"].values():
            t["hit_blocks"] = len(t["hit_blocks"])
        r["prefix"]["intersection_blocks"] = len(r["prefix"]["intersection_blocks"])
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(TraceError, match="earlier|schema 1|upgrade"):
        read_columns(d)


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


def plain_table(path):
    """The plain version of ``_parse_jsonl``: every line decoded on its own by msgspec, the
    lines that are not records skipped (``iter_records`` with a log)."""
    log = SkippedLines()
    rows = []
    tf = TraceFiles(path.parent, None, [path], "jsonl")
    for rec in iter_records(tf, TopkRecord, log):
        row = msgspec.to_builtins(rec)
        row.setdefault("scores_topk", None)
        rows.append(row)
    return flatten(pa.Table.from_pylist(rows, schema=arrow_schema())), log


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 10**7), max_size=6),
                          st.sampled_from(["", " ", "   ", "\t"])), min_size=1, max_size=6))
def test_bulk_parse_equals_the_strict_decoder(tmp_path_factory, rows):
    """The bulk Arrow parse and the typed per-line decoder give the same table for any
    spacing inside the int lists and for empty lists (the tracer pads lists with spaces)."""
    d = tmp_path_factory.mktemp("b")
    path = d / "trace_steps.jsonl"
    path.write_text("".join(_record_line(i, p, s) + "\n" for i, (p, s) in enumerate(rows)))
    bulk = columnar._parse_jsonl(path, SkippedLines())
    strict, log = plain_table(path)
    assert bulk.equals(strict) and not log
    assert bulk.column("selected_token_pos").to_pylist() == [p for p, _ in rows]
    assert bulk.column("prefix.intersection_blocks").to_pylist() == [p[:2] for p, _ in rows]


BAD_LINES = ["not json", '{"event": "dsa_topk", "run_name": ', "[1, 2, 3]", "7",
             "@@KEY@@", "@@TYPE@@", "@@EVENT@@", "@@NULL@@", "   "]


def _bad_line(kind: str, good: str) -> str:
    rec = json.loads(good)
    if kind == "@@KEY@@":
        rec["extra_field"] = 1
    elif kind == "@@TYPE@@":
        rec["layer_id"] = "zero"
    elif kind == "@@EVENT@@":
        rec["event"] = "other"
    elif kind == "@@NULL@@":
        rec["kv_fetch"]["hbm"]["read_ops"] = None
    else:
        return kind
    return json.dumps(rec)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(BAD_LINES)), min_size=1, max_size=12),
       st.sampled_from(["", "\n", "cut", "whole"]), st.sampled_from([64, 300, 1 << 20]))
def test_isolating_bad_lines_equals_the_plain_decoder(tmp_path_factory, lines, end, chunk):
    """The bulk parse, its bisection around lines that are not records (with small and
    large chunks) and its handling of the last line give exactly the records and the skips
    of decoding every line on its own."""
    d = tmp_path_factory.mktemp("i")
    path = d / "trace_steps.jsonl"
    out = []
    for i, (ok, kind) in enumerate(lines):
        good = _record_line(i, [i, i + 3], "")
        out.append(good if ok else _bad_line(kind, good))
    text = "\n".join(out) + "\n"
    last = _record_line(99, [5, 9], "")
    text += {"": "", "\n": "\n", "cut": last[:len(last) // 2], "whole": last}[end]
    path.write_text(text)
    got_log = SkippedLines()
    saved = columnar._ISOLATE_BYTES
    columnar._ISOLATE_BYTES = chunk
    try:
        got = columnar._parse_jsonl(path, got_log)
    finally:
        columnar._ISOLATE_BYTES = saved
    want, want_log = plain_table(path)
    assert got.equals(want)
    assert got_log.counts == want_log.counts and got_log.lines == want_log.lines
    assert got_log.examples == want_log.examples


@pytest.mark.parametrize("value", ["[[1],[2]]", "[1,[2]]", "5", "[1.5]", '["1"]', "[-1e3]"])
def test_non_integer_lists_are_refused_with_the_line(tmp_path, value):
    path = tmp_path / "trace_steps.jsonl"
    good = _record_line(0, [3], "")
    bad = _record_line(1, [3], "").replace('"selected_token_pos": [3]',
                                           f'"selected_token_pos": {value}')
    path.write_text(good + "\n" + bad + "\n")
    log = SkippedLines()
    assert read_columns(tmp_path, skipped=log).num_rows == 1
    assert log.counts == {"invalid_record": 1}
    assert log.examples[0].startswith("trace_steps.jsonl:2: invalid_record: "
                                      "$.selected_token_pos")


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
    log = SkippedLines()
    read_columns(trace_dir, skipped=log)
    assert log.examples == ["trace_steps.jsonl:2: invalid_record: $.event: Expected `str` "
                            "matching 'dsa_topk', got `str`"] or "$.event" in log.examples[0]
    rec = json.loads(good[2])
    rec["kv_fetch"]["local_pool"]["bytes_read"] = None
    good[2] = json.dumps(rec)
    path.write_text("\n".join(good) + "\n")
    log = SkippedLines()
    read_columns(trace_dir, skipped=log)
    assert log.examples[0].startswith(
        "trace_steps.jsonl:3: invalid_record: $.kv_fetch.local_pool.bytes_read")


# -- the twin's physical form (columnar.encode_twin / decode_twin), pinned to the plain table --


@st.composite
def _records(draw):
    """Flat record tables of any list contents: sorted or unsorted positions, block lists
    that are or are not what the positions imply, values past int32."""
    n = draw(st.integers(0, 6))
    big = draw(st.booleans())
    rows = []
    for i in range(n):
        bs = draw(st.sampled_from([1, 3, 16]))
        hi = (1 << 40) if big else 5000
        pos = sorted(set(draw(st.lists(st.integers(0, hi), max_size=8))))
        if draw(st.booleans()):
            pos = pos[::-1]
        blocks = sorted({p // bs for p in pos})
        if draw(st.integers(0, 3)) == 0:
            blocks = blocks[1:] + [10**6]
        local = [b for b in blocks if draw(st.booleans())]
        rest = [b for b in blocks if b not in local]
        hbm = rest if draw(st.integers(0, 3)) else rest[:1] + [7]
        rec = json.loads(_record_line(i, pos, ""))
        rec["block_size_tokens"] = bs
        rec["selected_block_ids"] = blocks
        rec["kv_fetch"]["hbm"]["hit_blocks"] = hbm
        rec["kv_fetch"]["local_pool"]["hit_blocks"] = local
        rec["prefix"]["intersection_blocks"] = blocks[:2]
        rec["scores_topk"] = None
        rows.append(rec)
    return flatten(pa.Table.from_pylist(rows, schema=arrow_schema()))


@settings(max_examples=80, deadline=None)
@given(_records())
def test_twin_form_round_trips(flat):
    phys = columnar.encode_twin(flat)
    assert columnar.decode_twin(phys).equals(flat)
    some = ["kv_fetch.hbm.hit_blocks", "layer_id", "selected_block_ids"]
    assert columnar.decode_twin(phys, some).equals(flat.select(some))
    narrow = columnar.decode_twin(phys, ["selected_token_pos", "prefix.intersection_blocks"],
                                  narrow=True)
    for name in narrow.column_names:
        assert narrow.column(name).to_pylist() == flat.column(name).to_pylist()


def test_twin_form_narrows_a_real_trace(trace_dir):
    """On a tracer-shaped trace every int list is stored as int32, and what reads back is
    the parsed table."""
    flat = read_columns(trace_dir, cache=False)
    phys = columnar.encode_twin(flat)
    for name in columnar._INT_LISTS:
        assert phys.schema.field(name).type.value_type == pa.int32(), name
    assert columnar.decode_twin(phys).equals(flat)
    twin_read = read_columns(trace_dir)  # builds the twin
    assert read_columns(trace_dir).equals(twin_read) and twin_read.equals(flat)
    assert read_columns(trace_dir).schema == columnar.flat_schema()


def test_twin_batches_and_wide_values(trace_dir, monkeypatch):
    """Batches of a few records, and a trace whose positions need int64, read back the same."""
    monkeypatch.setattr(columnar, "TWIN_BATCH_RECORDS", 7)
    path = trace_dir / "trace_steps.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[-1])
    rec["selected_token_pos"] = [1, 2, 1 << 40]
    lines[-1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    flat = read_columns(trace_dir, cache=False)
    read_columns(trace_dir)
    twin = column_cache_path(trace_dir)
    with pa.memory_map(str(twin)) as src:
        reader = pa.ipc.open_file(src)
        assert reader.num_record_batches == -(-flat.num_rows // 7)
        assert reader.schema.field("selected_token_pos").type.value_type == pa.int64()
    assert read_columns(trace_dir).equals(flat)
    parts = list(columnar.iter_twin(twin, ["selected_token_pos"], narrow=True))
    assert sum(p.num_rows for p in parts) == flat.num_rows


def test_an_older_twin_is_rebuilt_not_misread(trace_dir):
    """A twin of format 1 (lz4 logical columns, its own key) beside the trace is not used:
    the next read rebuilds it in the current format."""
    flat = read_columns(trace_dir, cache=False)
    tf = columnar.find_trace(trace_dir)
    old_key = columnar._source_key(tf).replace(
        f'"version": {columnar.FORMAT_VERSION}'.encode(), b'"version": 1')
    twin = trace_dir / columnar.CACHE_NAME
    garbled = flat.set_column(flat.column_names.index("layer_id"), "layer_id",
                              pa.array([99] * flat.num_rows, pa.int64()))
    with pa.OSFile(str(twin), "wb") as sink, pa.ipc.new_file(
            sink, garbled.schema.with_metadata({b"kvtier.columnar": old_key}),
            options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        w.write_table(garbled)
    assert column_cache_path(trace_dir) is None
    assert read_columns(trace_dir, ["layer_id"]).column(0).equals(flat.column("layer_id"))
    assert column_cache_path(trace_dir) == twin
