"""Traces of kvtier's earlier format (schema 1, written by kvtier at 582ab28: see
tests/data/old_format/README.md): one clear line from every reader, and ``kvtier convert
--upgrade`` into the current form."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import pytest

from kvtier.cli import main
from kvtier.schema import TopkRecord

OLD = Path(__file__).parent / "data" / "old_format"


@pytest.fixture()
def old(tmp_path) -> Path:
    d = tmp_path / "old"
    shutil.copytree(OLD, d)
    return d


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "trace_steps.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("trace", ["sanity", "parquet", "replay_sim"])
def test_validate_names_the_old_fields_in_one_line(old, trace, capsys):
    assert main(["validate", str(old / trace)]) == 1
    out = capsys.readouterr()
    problems = [x for x in out.out.splitlines() if "earlier trace format" in x]
    assert len(problems) == 1 and "Traceback" not in out.err
    line = problems[0]
    for field in ("request_id (a string)", "kv_fetch.<tier>.hit_blocks (a count)",
                  "kv_fetch.<tier>.batch_size", "prefix.intersection_blocks (a count)"):
        assert field in line
    assert "kvtier convert --upgrade" in line


@pytest.mark.parametrize("argv", [["replay", "{t}", "--out", "{o}", "--no-progress"],
                                  ["sweep", "{t}", "--out", "{o}.csv", "--no-progress"],
                                  ["summarize", "{t}"], ["convert", "{t}", "{o}"]])
def test_other_commands_say_so_in_one_line(old, tmp_path, capsys, argv):
    for trace in ("sanity", "parquet"):
        args = [a.format(t=old / trace, o=tmp_path / f"out-{trace}") for a in argv]
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "earlier trace format" in err[0] and "--upgrade" in err[0], err


@pytest.mark.parametrize("trace", ["sanity", "parquet"])
def test_upgrade_rewrites_records_exactly(old, tmp_path, trace):
    out = tmp_path / "new"
    assert main(["convert", "--upgrade", str(old / trace), str(out)]) == 0
    assert main(["validate", str(out)]) == 0
    fmt = "parquet" if trace == "parquet" else "jsonl"
    assert json.loads((out / "trace_meta.json").read_text())["format"] == fmt
    assert json.loads((out / "trace_meta.json").read_text())["schema_version"] == 2
    if fmt == "parquet":  # look at the records through the other conversion
        assert main(["convert", str(out), str(tmp_path / "j")]) == 0
        out = tmp_path / "j"
    before = _records(old / "sanity")
    after = _records(out)
    names = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert [r["request_id"] for r in names] == [0, 1, 2]
    sample = {r["request_id"]: r["sample_id"] for r in names}
    assert len(after) == len(before)
    for a, b in zip(before, after, strict=True):
        assert sample[b["request_id"]] == a["request_id"]
        assert b["kv_fetch"]["hbm"]["hit_blocks"] == b["selected_block_ids"]
        assert b["kv_fetch"]["hbm"]["batch_size"] == b["unique_blocks"]
        for pool in ("local_pool", "remote_pool"):
            assert b["kv_fetch"][pool]["hit_blocks"] == [] and b["kv_fetch"][pool]["batch_size"] == 0
        k = a["prefix"]["intersection_blocks"]
        assert b["prefix"]["intersection_blocks"] == a["selected_block_ids"][:k]
        for key in ("selected_token_pos", "selected_block_ids", "step_idx", "layer_id",
                    "tokens_per_touched_block", "offset_p50"):
            assert a[key] == b[key]
        msgspec.convert(b, TopkRecord)
    summ = json.loads((out / "summary.json").read_text())
    old_summ = json.loads((old / "sanity" / "summary.json").read_text())
    assert set(summ["prefix_hot_blocks"]) == {str(i) for i, s in sample.items()
                                              if s in old_summ["prefix_hot_blocks"]}
    for i, s in sample.items():
        if s in old_summ["prefix_hot_blocks"]:
            assert [[x["block_id"], x["touch_count"]] for x in summ["prefix_hot_blocks"][str(i)]] \
                == old_summ["prefix_hot_blocks"][s]
    assert summ["unique_blocks"] == old_summ["unique_blocks"]
    assert main(["summarize", str(out)]) == 0
    assert main(["replay", str(out), "--out", str(tmp_path / "r"), "--no-progress"]) == 0


def test_a_tiered_replay_cannot_be_upgraded(old, tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["convert", "--upgrade", str(old / "replay_sim"), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "did not record which blocks each tier served" in err[-1]
    assert not (out / "trace_steps.jsonl").exists()


def test_upgrade_leaves_a_current_trace_unchanged(tmp_path):
    src, out = tmp_path / "s", tmp_path / "u"
    assert main(["sanity", "--out", str(src), "--requests", "2", "--layers", "2"]) == 0
    assert main(["convert", "--upgrade", str(src), str(out)]) == 0
    a = [msgspec.json.decode(x, type=TopkRecord) for x in (src / "trace_steps.jsonl").read_bytes().splitlines()]
    b = [msgspec.json.decode(x, type=TopkRecord) for x in (out / "trace_steps.jsonl").read_bytes().splitlines()]
    assert a == b
    assert (out / "requests.jsonl").read_bytes() == (src / "requests.jsonl").read_bytes()
