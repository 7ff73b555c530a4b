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
