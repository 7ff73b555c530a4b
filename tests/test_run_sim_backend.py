"""``kvtier run --backend sim``: the live tiered backend reads exactly what ``kvtier replay``
reads from the HBM-only trace of the same run (independent paths into TieredBackend)."""

from __future__ import annotations

import json

import pytest
from run_helpers import check_run, trace_lines
from run_helpers import run_cli as run

from kvtier.sim.replay import ReplaySettings, replay

CHATS = [
    {"id": "a_0", "conversations": [{"from": "human", "value": "Write a haiku about rain."},
                                    {"from": "gpt", "value": "..."}]},
    {"id": "b_0", "conversations": [{"from": "human", "value": "What is two plus two?"},
                                    {"from": "gpt", "value": "Four."}]},
]  # fmt: skip


def test_live_sim_equals_replay_of_hbm_trace(tmp_path):
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(CHATS))
    base = ["sharegpt", "--sharegpt-json", str(data), "--max-new-tokens", "3",
            "--kv-block-size", "4"]  # fmt: skip
    assert run([*base, "--trace-out", str(tmp_path / "hbm")]) == 0
    assert run([*base, "--trace-out", str(tmp_path / "sim"), "--backend", "sim",
                "--hbm-blocks", "24"]) == 0  # fmt: skip
    summary, meta, live = check_run(tmp_path / "sim", "sharegpt", "anon8231489123/ShareGPT_Vicuna_unfiltered")
    assert summary.tiers is not None and meta["config"]["backend"] == "sim"
    replay(tmp_path / "hbm", tmp_path / "rep", ReplaySettings(backend="sim", hbm_blocks=24),
           progress=False)  # fmt: skip
    rep = trace_lines(tmp_path / "rep")
    assert len(live) == len(rep) > 0
    for x, y in zip(live, rep, strict=True):
        assert (x["request_id"], x["step_idx"], x["layer_id"]) == (y["request_id"], y["step_idx"], y["layer_id"])
        assert x["selected_token_pos"] == y["selected_token_pos"]
        for tier in ("hbm", "local_pool", "remote_pool"):
            a, b = x["kv_fetch"][tier], y["kv_fetch"][tier]
            assert (a["hit_blocks"], a["bytes_read"], a["read_ops"]) == \
                (b["hit_blocks"], b["bytes_read"], b["read_ops"])
            if a["latency_us"] is not None:
                assert a["latency_us"] == pytest.approx(b["latency_us"])
    tiers = summary.tiers
    assert tiers["hbm"]["hit_blocks"] > 0 and tiers["local_pool"]["hit_blocks"] > 0
