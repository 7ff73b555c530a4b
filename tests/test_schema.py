"""The record format: field names and order, round trips, and the fast encoder's output."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from tracegen import make_trace

from kvtier.schema import Summary, TopkRecord, TraceMeta, record_decoder, record_encoder
from kvtier.trace.reader import find_trace, iter_records

FIELDS = [
    "event", "run_name", "dataset", "rank", "world_size", "request_id", "layer_id", "step_idx",
    "seq_len_current", "unique_token_pos_count", "offset_min", "offset_p50", "offset_max",
    "block_size_tokens", "selected_block_ids", "unique_blocks", "tokens_per_touched_block",
    "kv_fetch", "prefix", "selected_token_pos", "scores_stats", "scores_topk",
]


def test_field_order_is_the_format():
    assert list(TopkRecord.__struct_fields__) == FIELDS


def test_written_records_have_exact_keys_in_order(tmp_path):
    make_trace(tmp_path / "a")
    make_trace(tmp_path / "b", store_scores=True)
    line = (tmp_path / "a" / "trace_steps.jsonl").read_bytes().splitlines()[0]
    raw = msgspec.json.decode(line)
    assert list(raw) == FIELDS[:-1]
    assert list(raw["kv_fetch"]) == ["hbm", "local_pool", "remote_pool"]
    assert list(raw["kv_fetch"]["hbm"]) == ["hit_blocks", "bytes_read", "read_ops", "latency_us", "batch_size"]
    assert list(raw["prefix"]) == ["prefix_cache_hit", "prefix_cached_blocks", "prefix_key",
                                   "intersection_ratio", "intersection_blocks"]
    assert list(raw["tokens_per_touched_block"]) == ["mean", "p50", "p95"]
    line_b = (tmp_path / "b" / "trace_steps.jsonl").read_bytes().splitlines()[0]
    assert list(msgspec.json.decode(line_b)) == FIELDS


def test_fast_lines_decode_to_what_msgspec_would_write(tmp_path):
    make_trace(tmp_path / "t", store_scores=True)
    enc, dec = record_encoder(), record_decoder()
    lines = (tmp_path / "t" / "trace_steps.jsonl").read_bytes().splitlines()
    for line, rec in zip(lines, iter_records(find_trace(tmp_path / "t")), strict=True):
        canonical = enc.encode(rec)
        assert dec.decode(canonical) == rec
        assert msgspec.json.decode(line) == msgspec.json.decode(canonical)  # padding is whitespace only


def test_schema_rejects_unknown_and_missing_fields():
    rec = next(iter(msgspec.json.decode(b"[]", type=list[TopkRecord])), None)
    assert rec is None
    good = {"event": "dsa_topk"}
    with pytest.raises(msgspec.ValidationError, match="missing required field"):
        msgspec.convert(good, TopkRecord)
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value"):
        msgspec.convert({"event": "other"}, TopkRecord)


def test_meta_and_summary_round_trip(tmp_path):
    s = make_trace(tmp_path / "t")
    assert msgspec.json.decode(msgspec.json.encode(s), type=Summary) == s
    meta = msgspec.json.decode((tmp_path / "t" / "trace_meta.json").read_bytes(), type=TraceMeta)
    assert meta.config == s.config and meta.format == "jsonl"
    assert s.config["trace"]["kv_block_size"] == 16 and s.config["kv_bytes_per_token"] == 1284
    assert np.isfinite(s.unique_blocks.mean)


def test_names_needing_json_escapes(tmp_path):
    from kvtier.trace.settings import TraceSettings
    from kvtier.trace.tracer import Tracer

    rid, run, ds = 0, 'run "x"', "d\u2603"
    with Tracer(TraceSettings(store_scores=True), tmp_path / "t", run_name=run, dataset=ds,
                kv_bytes_per_token=1) as tr:
        tr.begin_batch([rid], [[1, 2, 3]])
        tr.start_step(3)
        tr.on_topk(0, np.array([[3, 0]]), np.array([[1e-300, -2.5e16]]))
        tr.end_step(1e-7)
    (rec,) = iter_records(find_trace(tmp_path / "t"))
    assert (rec.request_id, rec.run_name, rec.dataset) == (rid, run, ds)
    assert rec.scores_topk == [-2.5e16, 1e-300]
    assert rec.kv_fetch.hbm.latency_us == 1e-7 * 1e6
