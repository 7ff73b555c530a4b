"""``kvtier analyze`` from the command line: flags, outputs, bad input, every trace form."""

from __future__ import annotations

import json

import pytest
from test_analysis import assert_same
from tracegen import make_trace

from kvtier.cli import main

FLAGS = ["--block-sizes", "--key-mode", "--step-union", "--ws-windows", "--recent-token-windows",
         "--recent-block-windows", "--reuse-cap-steps", "--lru-caps", "--max-steps-per-stream",
         "--shared-samples", "--tiers", "--kv-bytes-per-token", "--sweep", "--out",
         "--no-progress"]
SECTIONS = ["record_stats", "temporal_locality", "working_set", "cache_sim",
            "read_amplification", "cross_layer_overlap", "shared_cache", "by_layer",
            "unique_blocks_by_decode_step_layer", "tokens_per_block_hist"]


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    d = tmp_path_factory.mktemp("an") / "t"
    make_trace(d, requests=4, layers=3, new_tokens=8, topk=48, prompt_len=300)
    return d


def strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in ("seconds", "trace", "format")}


@pytest.mark.parametrize("cmd", ["analyze", "report"])
def test_help_explains_every_flag(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in FLAGS:
        if cmd == "report" and f == "--out":
            continue
        assert f in out, f
    for line in out.splitlines():
        if line.strip().startswith("--") and "  " not in line.strip():
            pass  # flag and help on separate lines is argparse's layout for long names
    if cmd == "report":
        assert "--label" in out and "--title" in out


def test_writes_analysis_json_with_the_named_sections(trace, capsys):
    assert main(["analyze", str(trace), "--block-sizes", "16,64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "-> " in out and "block   16" in out and "block   64" in out
    res = json.loads((trace / "analysis.json").read_text())
    assert [r["block_size_tokens"] for r in res["results"]] == [16, 64]
    for r in res["results"]:
        for s in SECTIONS:
            assert s in r, s
        assert set(r["record_stats"]) == {"unique_blocks", "block_span", "block_density",
                                          "tokens_per_block_mean", "block_concentration",
                                          "recent_locality"}
        assert set(r["cache_sim"]) == {"128", "256", "512", "1024"}
        assert set(r["working_set"]) == {"1", "4", "16", "64"}
    for s in ("read_amplification", "offsets", "prefix", "tiers", "settings", "skipped"):
        assert s in res


@pytest.mark.parametrize("argv, message", [
    (["--block-sizes", "16,x"], "--block-sizes: 'x' is not an integer"),
    (["--ws-windows", "0,4"], "--ws-windows: values must be > 0"),
    (["--lru-caps", ""], "--lru-caps: empty list"),
    (["--reuse-cap-steps", "-1"], "--reuse-cap-steps must be >= 0"),
    (["--tiers", "nosuchpreset"], "--tiers"),
    (["--sweep", "nofile.csv"], "nofile.csv"),
])
def test_bad_flags_fail_in_one_line(trace, capsys, tmp_path, argv, message):
    rc = main(["analyze", str(trace), "--out", str(tmp_path / "a.json"), "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("kvtier analyze: error: ")


def test_missing_and_corrupt_traces(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "no such trace" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "trace_steps.jsonl").write_text("garbage\n{\"event\": 1\n")
    assert main(["analyze", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no record could be analysed" in err and "malformed" in err
    assert len(err.strip().splitlines()) == 1


def test_a_killed_run_is_analysed_up_to_its_last_record(trace, tmp_path, capsys):
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (trace / "trace_steps.jsonl").read_bytes()
    (cut / "trace_steps.jsonl").write_bytes(data[: len(data) - 100])  # last line truncated
    (cut / "trace_meta.json").write_bytes((trace / "trace_meta.json").read_bytes())
    assert main(["analyze", str(cut), "--no-progress"]) == 0
    res = json.loads((cut / "analysis.json").read_text())
    n = data.count(b"\n")
    assert res["skipped"]["truncated_final_line"] == 1 and res["records_analyzed"] == n - 1


def test_jsonl_shards_and_parquet_give_the_same_analysis(trace, tmp_path, capsys):
    from kvtier.analysis.analyze import AnalysisSettings, analyze

    s = AnalysisSettings(block_sizes=(16, 32), shared_samples=0)
    ref = strip(analyze(trace, s))
    assert main(["convert", str(trace), str(tmp_path / "pq")]) == 0
    assert strip(analyze(tmp_path / "pq", s)) == ref
    sharded = tmp_path / "sh"
    make_trace(sharded, requests=4, layers=3, new_tokens=8, topk=48, prompt_len=300,
               shard_records=25)
    assert len(list(sharded.glob("trace_steps.*.jsonl"))) > 1
    got = strip(analyze(sharded, s))
    # other chunk boundaries: equal up to the rounding of merged sums
    assert_same(got["results"], ref["results"])
    assert_same(got["prefix"], ref["prefix"])


def test_the_columnar_twin_and_the_streamed_lines_agree(trace, monkeypatch):
    """A valid JSONL trace is read through its columnar twin (written beside it on first use);
    the streaming reader gives the same analysis."""
    from kvtier.analysis import source
    from kvtier.analysis.analyze import AnalysisSettings, analyze
    from kvtier.trace.columnar import column_cache_path

    s = AnalysisSettings(block_sizes=(16,), shared_samples=0)
    twin = strip(analyze(trace, s))
    assert column_cache_path(trace) is not None
    monkeypatch.setattr(source, "_twin_reader", lambda: None)
    streamed = strip(analyze(trace, s))
    assert_same(streamed, twin)
    monkeypatch.undo()
    # no twin yet and "too big to build in memory": streamed, no twin written
    column_cache_path(trace).unlink()
    monkeypatch.setattr(source, "TWIN_MEMORY_SHARE", 0.0)
    assert_same(strip(analyze(trace, s)), twin)
    assert column_cache_path(trace) is None
