"""summary.json: the live summary equals the one recomputed from the trace alone."""

from __future__ import annotations

import msgspec
import numpy as np
from tracegen import make_trace

from kvtier.schema import Summary
from kvtier.trace.convert import convert_trace
from kvtier.trace.reader import find_trace, iter_records
from kvtier.trace.summary import recompute_summary


def stored(path) -> Summary:
    return msgspec.json.decode((path / "summary.json").read_bytes(), type=Summary)


def test_recomputed_equals_live(tmp_path):
    live = make_trace(tmp_path / "t", store_scores=True)
    assert stored(tmp_path / "t") == live
    again = recompute_summary(tmp_path / "t")
    assert again == live
    assert msgspec.json.encode(again) == msgspec.json.encode(live)


def test_recomputed_equals_live_sharded_sampled_and_parquet(tmp_path):
    from kvtier.trace.sanity import SanityConfig, run_sanity
    from kvtier.trace.settings import TraceSettings

    live = run_sanity(tmp_path / "s", SanityConfig(requests=4, layers=2, prompt_len=80, shared_prefix=32, new_tokens=6, topk=16),
                      TraceSettings(sample_rate=0.5, shard_records=10, kv_block_size=8))
    assert len(list((tmp_path / "s").glob("trace_steps.*.jsonl"))) > 1
    assert recompute_summary(tmp_path / "s") == live
    convert_trace(tmp_path / "s", tmp_path / "p")
    assert recompute_summary(tmp_path / "p") == live


def test_distributions_against_records(tmp_path):
    live = make_trace(tmp_path / "t")
    recs = list(iter_records(find_trace(tmp_path / "t")))
    assert live.records == len(recs) and live.requests == 3
    ub = np.array([r.unique_blocks for r in recs])
    assert live.unique_blocks.p95 == np.percentile(ub, 95) and live.unique_blocks.mean == ub.mean()
    offs = np.concatenate([r.seq_len_current - 1 - np.array(r.selected_token_pos) for r in recs])
    assert live.offsets.count == offs.size and live.offsets.p50 == np.percentile(offs, 50)
    assert live.offsets.max == offs.max()
    counts = []
    hot: dict[int, dict[int, int]] = {}
    for r in recs:
        blocks = np.array(r.selected_token_pos) // r.block_size_tokens
        counts.extend(np.unique(blocks, return_counts=True)[1].tolist())
        for b in r.prefix.intersection_blocks:
            hot.setdefault(r.request_id, {}).setdefault(b, 0)
            hot[r.request_id][b] += 1
    assert live.tokens_per_touched_block.count == len(counts)
    assert live.tokens_per_touched_block.p95 == np.percentile(counts, 95)
    ratios = np.array([r.prefix.intersection_ratio for r in recs])
    assert live.prefix_intersection_ratio.mean == ratios.mean()
    for rid, blocks in hot.items():
        want = sorted(blocks.items(), key=lambda kv: (-kv[1], kv[0]))
        assert [(x.block_id, x.touch_count) for x in live.prefix_hot_blocks[str(rid)]] == want
    assert list(live.prefix_hot_blocks) == [str(r) for r in sorted(hot)]
    # the shared system prompt: later requests hit the prefix cache
    hits = {r.request_id: r.prefix.prefix_cached_blocks for r in recs}
    assert hits[0] == 0 and hits[1] == 3 and hits[2] == 3


def test_optional_sections_kept(tmp_path):
    make_trace(tmp_path / "t")
    s = stored(tmp_path / "t")
    s2 = msgspec.structs.replace(s, skipped={"too_long": 2}, tiers={"hbm": {"hits": 3}})
    assert recompute_summary(tmp_path / "t", keep_from=s2) == s2


def test_summarize_a_killed_runs_trace(tmp_path, capsys):
    """A killed run leaves no summary.json and a half-written last line: summarize writes the
    summary of the other records (equal to the summary of the trace without that line) and
    says so in one warning; a trace of no record is an error."""
    import shutil

    from kvtier.cli import main

    make_trace(tmp_path / "t", store_scores=True)
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    for d in (cut, whole):
        shutil.copytree(tmp_path / "t", d)
        (d / "summary.json").unlink()
    data = (tmp_path / "t" / "trace_steps.jsonl").read_bytes()
    (cut / "trace_steps.jsonl").write_bytes(data[:-50])
    (whole / "trace_steps.jsonl").write_bytes(data[:data.rfind(b"\n", 0, len(data) - 1) + 1])
    assert main(["summarize", str(cut)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "truncated_final_line 1" in err
    assert main(["summarize", str(whole)]) == 0
    assert stored(cut) == stored(whole) and stored(cut).records == data.count(b"\n") - 1
    (cut / "summary.json").unlink()
    (cut / "trace_steps.jsonl").write_bytes(data[:30])
    assert main(["summarize", str(cut)]) == 2
    assert "no record could be read" in capsys.readouterr().err
