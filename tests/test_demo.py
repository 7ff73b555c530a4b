"""``kvtier demo`` end to end into a temp dir: both traces validate and show what the report
says (sparse selections beyond index_topk, prefix sharing, per-tier reads)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from run_helpers import demo_bundle, read_meta, read_summary, trace_lines
from spec52 import check_trace_dir

from kvtier.runners.demo import DemoError, format_report, load_demo_workload, run_demo


def test_demo_prompts_ship_as_package_data():
    wl = load_demo_workload()
    assert len(wl.requests) >= 4
    assert all(r.messages for r in wl.requests)
    tok = demo_bundle().tokenizer
    lens = [len(tok.apply_chat(r.messages)) for r in wl.requests]
    topk = demo_bundle().args.index_topk
    assert max(lens) > 4 * topk  # a long document: selections must be sparse
    assert max(lens) <= 2100


def test_demo_end_to_end(tmp_path):
    result = run_demo(tmp_path / "demo", max_new_tokens=2, bundle=demo_bundle())
    for name in ("hbm", "sim"):
        records, errors, msgs = result["validate"][name]
        assert errors == 0, msgs
        assert records == result["summary"].records > 0
    hbm = tmp_path / "demo" / "hbm"
    for f in ("trace_steps.jsonl", "summary.json", "trace_meta.json", "run_meta.json",
              "requests.jsonl"):
        assert (hbm / f).is_file()
    for name in ("hbm", "sim"):  # the design note's format, checked independently of kvtier
        assert check_trace_dir(tmp_path / "demo" / name) == [], name
    assert read_meta(hbm)["random_weights"] is True
    recs = trace_lines(hbm)
    topk = demo_bundle().args.index_topk
    # beyond index_topk the indexer keeps exactly topk of the context
    long = [r for r in recs if r["seq_len_current"] > topk]
    assert long and all(r["unique_token_pos_count"] == topk for r in long)
    assert result["sparsity"]["sparse_records"] == len(long)
    # the second question on the same document reuses its prefix blocks
    q2 = [r for r in recs if r["sample_id"] == "doc-tidemill-q2"]
    assert q2 and all(r["prefix"]["prefix_cache_hit"] for r in q2)
    assert result["sparsity"]["prefix_hit_records"] == sum(r["prefix"]["prefix_cache_hit"] for r in recs)
    # the sim replay read the same blocks, some of them from the local pool
    sim = read_summary(tmp_path / "demo" / "sim")
    tiers = sim.tiers
    assert tiers["hbm"]["hit_blocks"] + tiers["local_pool"]["hit_blocks"] + \
        tiers["remote_pool"]["hit_blocks"] == sum(r["unique_blocks"] for r in recs)
    assert tiers["local_pool"]["hit_blocks"] > 0
    report = format_report(result)
    assert "SEEDED RANDOM WEIGHTS" in report and "validate sim" in report
    assert "local_pool" in report
    # the analysis report of both traces, linked from what the demo prints
    page = result["report"]["page"]
    assert page == tmp_path / "demo" / "report" / "index.html" and page.is_file()
    assert f"report: {page}" in report and "read amplification" in report
    for name in ("hbm", "sim"):
        assert (page.parent / f"{name}.analysis.json").is_file()
    with pytest.raises(DemoError, match="--force"):
        run_demo(tmp_path / "demo", bundle=demo_bundle())


def test_run_and_demo_help_do_not_import_torch():
    code = ("import sys; from kvtier.cli import build_parser; p = build_parser(); "
            "p.parse_args(['demo']); p.parse_args(['run', 'burstgpt']); "
            "assert 'torch' not in sys.modules, 'torch imported'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
