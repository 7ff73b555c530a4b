"""``kvtier run sharegpt``: chat requests through the chat template, end to end; per-user-turn
requests of one conversation share their prompt prefix (point D)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from run_helpers import SHARED_DATA, check_run, demo_bundle, run_cli

DATASET_ID = "anon8231489123/ShareGPT_Vicuna_unfiltered"

# the real layout: a top-level array, 2-space indent, {"id", "conversations": [{from, value}]}
ENTRIES = [
    {"id": "aaa_0", "conversations": [
        {"from": "human", "value": "Name a colour."},
        {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "And another one?"},
        {"from": "gpt", "value": "Green."},
    ]},
    {"id": "bbb_0", "conversations": []},  # empty conversation
    {"id": "ccc_0", "conversations": [
        {"from": "human", "value": "word " * 300},  # too long for --max-prompt-tokens
        {"from": "gpt", "value": "ok"},
    ]},
    {"id": "ddd_0", "conversations": [
        {"from": "human", "value": "Count to three."},
        {"from": "gpt", "value": "One, two, three."},
    ]},
]  # fmt: skip


def _write(tmp_path):
    path = tmp_path / "ShareGPT_V3_unfiltered_cleaned_split.json"
    path.write_text(json.dumps(ENTRIES, indent=2))
    return path


def test_sharegpt_per_user_turn(tmp_path):
    path = _write(tmp_path)
    out = tmp_path / "out"
    rc = run_cli(["sharegpt", "--sharegpt-json", str(path), "--trace-out", str(out),
                  "--sharegpt-turn-mode", "per_user_turn", "--max-new-tokens", "3",
                  "--max-prompt-tokens", "128", "--kv-block-size", "4"])  # fmt: skip
    assert rc == 0
    summary, meta, records = check_run(out, "sharegpt", DATASET_ID)
    assert summary.skipped["prompt_too_long"] == 1
    assert summary.skipped["empty_conversation"] == 1
    cli = meta["config"]["extra"]["cli"]
    assert cli["dataset"] == "sharegpt" and cli["sharegpt_turn_mode"] == "per_user_turn"
    assert meta["config"]["trace"]["kv_block_size"] == 4
    by_req = defaultdict(list)
    for r in records:
        by_req[r["sample_id"]].append(r)
    # aaa's two user turns and ddd's one turn ran; turns of one conversation in order
    assert len(by_req) == 3
    ids = list(dict.fromkeys(r["sample_id"] for r in records))
    first, second = "aaa_0/t0", "aaa_0/t1"
    assert ids.index(first) < ids.index(second)
    # the second turn's prompt extends the first: its prefix blocks were seen before
    p1 = by_req[first][0]["prefix"]
    p2 = by_req[second][0]["prefix"]
    assert p1["prefix_cached_blocks"] == 0
    turn1 = demo_bundle().tokenizer.apply_chat([{"role": "user", "content": "Name a colour."}])
    assert p2["prefix_cache_hit"] is True
    assert p2["prefix_cached_blocks"] == len(turn1) // 4 >= 1  # all of turn 1's full blocks
    # the second turn's prompt is longer (it carries the first exchange)
    assert by_req[second][0]["step_idx"] > by_req[first][0]["step_idx"]


def test_sharegpt_full_mode_batched(tmp_path):
    path = _write(tmp_path)
    out = tmp_path / "out"
    rc = run_cli(["sharegpt", "--sharegpt-json", str(path), "--trace-out", str(out),
                  "--max-new-tokens", "2", "--batch-size", "2", "--max-prompt-tokens", "128"])  # fmt: skip
    assert rc == 0
    summary, meta, records = check_run(out, "sharegpt", DATASET_ID)
    assert summary.skipped == {"empty_conversation": 1, "prompt_too_long": 1}
    assert summary.requests == 2 and meta["requests_run"] == 2
    # one conversation per request, batched together: each decoded once in every layer
    assert {r["sample_id"] for r in records} == {"aaa_0", "ddd_0"}


def test_sharegpt_real_sample(tmp_path):
    sample = SHARED_DATA / "sharegpt" / "ShareGPT_V3_unfiltered_cleaned_split.head5.json"
    if not sample.is_file():
        pytest.skip("shared ShareGPT sample not present")
    out = tmp_path / "out"
    rc = run_cli(["sharegpt", "--sharegpt-json", str(sample), "--trace-out", str(out),
                  "--sharegpt-turn-mode", "per_user_turn", "--max-new-tokens", "2",
                  "--max-prompt-tokens", "100"])  # fmt: skip
    assert rc == 0
    summary, meta, records = check_run(out, "sharegpt", DATASET_ID)
    # 17 user turns in the 5 entries; only the first turns fit in 100 tokens
    assert summary.requests + summary.skipped["prompt_too_long"] == 17
    assert {r["sample_id"].split("/")[1] for r in records} == {"t0"}
    assert meta["dataset"]["sha256"].startswith("982ff87c4666add7")
