"""``kvtier.sim.synth``: schema-valid traces with temporal locality, and ``kvtier synth``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from spec52 import check_trace_dir

from kvtier.sim.access import read_access_stream
from kvtier.sim.synth import SynthConfig, synth_stream, write_trace
from kvtier.trace.summary import recompute_summary
from kvtier.trace.validate import validate_trace

CFGS = [
    SynthConfig(requests=3, layers=2, steps=6, prompt_len=300, prompt_jitter=50, topk=48,
                block_size=16),
    SynthConfig(requests=2, layers=3, steps=4, prompt_len=100, prompt_jitter=0, topk=256,
                block_size=7, stagger=0, seed=5),  # top-k above the context: dense selections
]


@pytest.mark.parametrize("cfg", CFGS)
def test_write_trace_is_schema_valid(tmp_path, cfg):
    stream = synth_stream(cfg)
    out = tmp_path / "t"
    write_trace(stream, out, config={"synth": {"seed": cfg.seed}})
    rep = validate_trace(out)
    assert rep.ok, rep.messages[:5]
    assert rep.records == len(stream)
    assert check_trace_dir(out) == []
    recs = [json.loads(x) for x in (out / "trace_steps.jsonl").read_text().splitlines()]
    reqs = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    meta = json.loads((out / "trace_meta.json").read_text())
    assert meta["config"]["trace"]["kv_block_size"] == cfg.block_size
    assert meta["config"]["backend"] == "hbm" and meta["config"]["synth"] == {"seed": cfg.seed}
    first: dict[int, dict] = {}
    for r in recs:
        # the design note: step_idx is the position of the token being decoded
        assert r["step_idx"] == r["seq_len_current"] - 1
        first.setdefault(r["request_id"], r)
        # HBM-only accounting, as the tracer's default backend writes it
        hbm = r["kv_fetch"]["hbm"]
        assert hbm["hit_blocks"] == r["selected_block_ids"]
        assert hbm["bytes_read"] == r["unique_blocks"] * cfg.block_size * meta["config"][
            "kv_bytes_per_token"]
    # a request's first record decodes the token right after its prompt
    assert [q["request_id"] for q in reqs] == sorted(first)
    for q in reqs:
        assert first[q["request_id"]]["step_idx"] == q["prompt_len"]
    # summary.json is what kvtier summarize recomputes
    got = json.loads((out / "summary.json").read_text())
    assert got == json.loads(json.dumps(_plain(recompute_summary(out))))


def _plain(s):
    import msgspec

    return msgspec.json.decode(msgspec.json.encode(s))


def test_round_trip_is_the_stream(tmp_path):
    stream = synth_stream(CFGS[0])
    write_trace(stream, tmp_path / "t")
    back = read_access_stream(tmp_path / "t")
    for f in ("req", "layer", "step", "seq_len", "offsets", "pos"):
        assert np.array_equal(getattr(back, f), getattr(stream, f)), f
    assert back.request_ids == stream.request_ids


def test_write_trace_refuses_a_step_that_is_not_a_position(tmp_path):
    stream = synth_stream(CFGS[0])
    stream.step = stream.step - stream.step.min()  # a per-request decode counter
    with pytest.raises(ValueError, match="step_idx"):
        write_trace(stream, tmp_path / "t")
    assert not (tmp_path / "t" / "trace_steps.jsonl").exists()


def test_write_trace_keeps_an_existing_trace_without_force(tmp_path):
    stream = synth_stream(CFGS[1])
    write_trace(stream, tmp_path / "t")
    before = (tmp_path / "t" / "trace_steps.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        write_trace(stream, tmp_path / "t")
    assert (tmp_path / "t" / "trace_steps.jsonl").read_bytes() == before
    write_trace(synth_stream(CFGS[0]), tmp_path / "t", force=True)
    assert validate_trace(tmp_path / "t").ok


# ---------------------------------------------------------------------------- kvtier synth

SMALL = ["--requests", "4", "--layers", "2", "--new-tokens", "16", "--prompt-len", "2048",
         "--prompt-jitter", "512", "--topk", "256", "--no-progress"]


def test_cli_writes_a_valid_trace_with_locality(tmp_path, capsys):
    from kvtier.cli import main
    from kvtier.sim.access import rebucket
    from kvtier.sim.cachesim import lru_mrc, simulate
    from kvtier.sim.tiers.specs import eviction_factory

    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), *SMALL]) == 0
    assert "validate: ok" in capsys.readouterr().out
    assert validate_trace(out).ok and check_trace_dir(out) == []
    meta = json.loads((out / "trace_meta.json").read_text())
    assert meta["config"]["synth"]["topk"] == 256 and meta["config"]["synth"]["steps"] == 16
    keys = rebucket(read_access_stream(out), 16).keys()
    curve = lru_mrc(keys)
    ws = curve.hits.shape[0] - 1
    fracs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    lru = [curve.hits_at(int(f * ws)) / curve.accesses for f in fracs]
    fifo = [simulate(eviction_factory("fifo")(int(f * ws)), keys).hit_ratio for f in fracs]
    # blocks are reused across steps: hit ratios rise gradually with the capacity, and the
    # policies differ (kvtier sanity's redrawn selections give all-or-nothing ratios instead)
    assert sum(0.05 < h < 0.8 for h in lru) >= 3, lru
    assert max(abs(a - b) for a, b in zip(lru, fifo, strict=True)) > 0.02


def test_cli_refuses_an_existing_trace_and_bad_flags(tmp_path):
    from test_cli_trace import run_cli

    out = str(tmp_path / "s")
    assert run_cli("synth", "--out", out, "--requests", "1", "--new-tokens", "2",
                   "--no-progress").returncode == 0
    before = (tmp_path / "s" / "trace_steps.jsonl").read_bytes()
    res = run_cli("synth", "--out", out, "--requests", "2", "--no-progress")
    assert res.returncode == 2 and "--force" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert (tmp_path / "s" / "trace_steps.jsonl").read_bytes() == before
    res = run_cli("synth", "--out", str(tmp_path / "o"), "--topic-width", "0")
    assert res.returncode == 2 and "--topic-width" in res.stderr
    assert not (tmp_path / "o").exists()


def test_synth_is_listed_in_help():
    from kvtier.cli import build_parser

    parser = build_parser()
    text = parser.format_help()
    assert "synth" in text and "comparing policies" in text
    sanity = parser._subparsers._group_actions[0].choices["sanity"].format_help()
    assert "not for comparing policies" in sanity and "kvtier synth" in sanity
