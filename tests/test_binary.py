"""Parquet trace: lossless both ways, and at least 4x smaller than JSONL."""

from __future__ import annotations

import msgspec
import pyarrow.parquet as pq
from tracegen import make_trace

from kvtier.schema import TopkRecord
from kvtier.trace.convert import convert_trace
from kvtier.trace.parquet import ParquetTraceWriter
from kvtier.trace.reader import find_trace, iter_records


def records(path) -> list[TopkRecord]:
    return list(iter_records(find_trace(path)))


def test_round_trip_both_ways(tmp_path):
    make_trace(tmp_path / "j", store_scores=True)
    orig = records(tmp_path / "j")
    assert orig[0].scores_topk is not msgspec.UNSET
    assert convert_trace(tmp_path / "j", tmp_path / "p") == ("parquet", len(orig))
    assert records(tmp_path / "p") == orig
    assert convert_trace(tmp_path / "p", tmp_path / "j2") == ("jsonl", len(orig))
    assert records(tmp_path / "j2") == orig
    # compact JSONL -> Parquet -> JSONL is byte-identical
    assert convert_trace(tmp_path / "j2", tmp_path / "p2") == ("parquet", len(orig))
    assert convert_trace(tmp_path / "p2", tmp_path / "j3") == ("jsonl", len(orig))
    a = (tmp_path / "j2" / "trace_steps.jsonl").read_bytes()
    assert (tmp_path / "j3" / "trace_steps.jsonl").read_bytes() == a
    assert pq.read_table(tmp_path / "p" / "trace_steps.parquet").equals(
        pq.read_table(tmp_path / "p2" / "trace_steps.parquet"))
    for name in ("summary.json", "trace_meta.json"):
        assert (tmp_path / "p" / name).is_file()


def test_nullable_fields_survive(tmp_path):
    rec = records_example()
    w = ParquetTraceWriter(tmp_path / "x.parquet")
    w.write(rec)
    rec2 = msgspec.structs.replace(rec, scores_stats=None, scores_topk=msgspec.UNSET)
    w.write(rec2)
    w.close()
    assert records(tmp_path / "x.parquet") == [rec, rec2]


def records_example() -> TopkRecord:
    tier = {"hit_blocks": [], "bytes_read": 0, "read_ops": 0, "latency_us": None, "batch_size": 0}
    return msgspec.convert({
        "event": "dsa_topk", "run_name": "r", "dataset": "d", "rank": 0, "world_size": 1,
        "request_id": 3, "layer_id": 2, "step_idx": 9, "seq_len_current": 10,
        "unique_token_pos_count": 2, "offset_min": 0, "offset_p50": 4.5, "offset_max": 9,
        "block_size_tokens": 4, "selected_block_ids": [0, 2], "unique_blocks": 2,
        "tokens_per_touched_block": {"mean": 1.0, "p50": 1.0, "p95": 1.0},
        "kv_fetch": {"hbm": {**tier, "hit_blocks": [0, 2], "batch_size": 2, "latency_us": 12.5},
                     "local_pool": tier, "remote_pool": tier},
        "prefix": {"prefix_cache_hit": False, "prefix_cached_blocks": 0, "prefix_key": None,
                   "intersection_ratio": 0.0, "intersection_blocks": []},
        "selected_token_pos": [0, 9], "scores_stats": {"min": -1.5, "mean": 0.25, "max": 2.0},
        "scores_topk": [-1.5, 2.0],
    }, TopkRecord)


def test_at_least_4x_smaller(tmp_path):
    # DSA-sized rows: K = 512 of a 2K context, full positions, no scores
    make_trace(tmp_path / "j", requests=2, layers=4, prompt_len=2000, new_tokens=4, topk=512)
    convert_trace(tmp_path / "j", tmp_path / "p")
    j = (tmp_path / "j" / "trace_steps.jsonl").stat().st_size
    p = (tmp_path / "p" / "trace_steps.parquet").stat().st_size
    assert j / p >= 4.0, (j, p)


def test_tiered_lists_round_trip_with_hbm_derived(tmp_path):
    """A tiered replay (records whose tiers split the blocks) survives JSONL -> Parquet ->
    JSONL exactly; the file stores hbm.hit_blocks as null (derived from the partition), and
    read_columns hands out the same table for both forms."""
    from kvtier.cli import main
    from kvtier.trace.columnar import read_columns

    make_trace(tmp_path / "j")
    assert main(["replay", str(tmp_path / "j"), "--out", str(tmp_path / "r"), "--hbm-blocks", "20",
                 "--no-progress"]) == 0
    orig = records(tmp_path / "r")
    split = [r for r in orig if r.kv_fetch.local_pool.hit_blocks and r.kv_fetch.hbm.hit_blocks]
    assert split  # some records really are served by two tiers
    convert_trace(tmp_path / "r", tmp_path / "p")
    stored = pq.read_table(tmp_path / "p" / "trace_steps.parquet").flatten().flatten()
    assert stored.column("kv_fetch.hbm.hit_blocks").null_count == len(orig)
    assert records(tmp_path / "p") == orig
    convert_trace(tmp_path / "p", tmp_path / "j2")
    assert records(tmp_path / "j2") == orig
    assert read_columns(tmp_path / "p").equals(read_columns(tmp_path / "r"))
    sub = read_columns(tmp_path / "p", ["kv_fetch.hbm.hit_blocks", "step_idx"])
    assert sub.column(0).to_pylist() == [r.kv_fetch.hbm.hit_blocks for r in orig]


def test_a_list_that_does_not_partition_is_kept_as_written(tmp_path):
    """Lossless for any record: hbm.hit_blocks that is not what the partition implies (a
    broken producer) is stored explicitly and read back unchanged."""
    rec = records_example()
    odd = msgspec.structs.replace(rec, kv_fetch=msgspec.structs.replace(
        rec.kv_fetch, hbm=msgspec.structs.replace(rec.kv_fetch.hbm, hit_blocks=[2])))
    w = ParquetTraceWriter(tmp_path / "x.parquet")
    for r in (rec, odd):
        w.write(r)
    w.close()
    assert pq.read_table(tmp_path / "x.parquet").column("kv_fetch").to_pylist()[1]["hbm"][
        "hit_blocks"] == [2]
    assert records(tmp_path / "x.parquet") == [rec, odd]
    from kvtier.trace.columnar import read_columns

    assert read_columns(tmp_path / "x.parquet", ["kv_fetch.hbm.hit_blocks"]).column(0).to_pylist() \
        == [[0, 2], [2]]
