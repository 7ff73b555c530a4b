"""ShareGPT loader: turn modes, role normalisation, split chunks and malformed entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.runners.datasets import DatasetNotFound, load_sharegpt

SAMPLE = (Path(__file__).parents[2] / "shared" / "data" / "sharegpt"
          / "ShareGPT_V3_unfiltered_cleaned_split.head5.json")


def t(who, value):
    return {"from": who, "value": value}


ENTRIES = [
    {"id": "a_0", "conversations": [t("human", "hi"), t("gpt", "hello"), t("human", "how?"),
                                    t("gpt", "so")]},
    {"id": "a_4", "conversations": [t("gpt", "so"), t("human", "and?"), t("gpt", "then")]},
    {"id": "b_0", "conversations": [t("system", "shared from TypingMind.com"),
                                    t("user", "q"), t("assistant", "r"), t("Bing", "x")]},
    {"id": "e_0", "conversations": []},
    {"id": "l_1", "conversations": [t("human", "alone")]},  # a lone user turn: a prompt
    {"id": "e_2", "conversations": [t("human", "x"), t("gpt", "\u200b")]},
    {"id": "e_3", "conversations": [t("human", "x"), t("gpt", "EmptyMarkdownContent")]},
    {"id": "e_4", "conversations": [t("human", "x"), t("wizard", "y")]},
    {"id": "e_5", "conversations": [t("human", "x"), {"from": "gpt"}]},
    {"id": "e_6", "conversations": [t("human", "x"), t("gpt", 3)]},
    {"id": "e_7"},
    {"id": "e_8", "conversations": "not a list"},
    "not an object",
    {"id": "e_9", "conversations": [t("gpt", "only"), t("gpt", "assistant")]},
    {"id": "a_0", "conversations": [t("human", "dup id"), t("gpt", "ok")]},
]
SKIPS = {"empty_conversation": 1, "empty_turn": 2, "unknown_role": 1,
         "missing_field": 2, "wrong_type": 2, "not_an_object": 1, "no_user_turn": 1}


@pytest.fixture
def sharegpt_file(tmp_path) -> Path:
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(ENTRIES, indent=2))
    return p


def test_full_mode_one_request_per_conversation(sharegpt_file):
    wl = load_sharegpt(sharegpt_file)
    assert dict(wl.skipped) == SKIPS
    assert [r.request_id for r in wl.requests] == ["a_0", "a_4", "b_0", "l_1", "a_0#1"]
    a0, a4, b0, lone, _ = wl.requests
    assert a0.messages == [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "how?"}]
    assert a0.meta["reference"] == "so" and a0.group_id == "a_0"
    # a split chunk's leading gpt turn (a repeat of the previous chunk) is dropped
    assert a4.messages == [{"role": "user", "content": "and?"}]
    assert a4.meta["dropped_leading_assistant_turns"] == 1
    # system banner dropped, roles normalised, ends at the last user turn
    assert b0.messages == [{"role": "user", "content": "q"}]
    assert b0.meta["dropped_system_turns"] == 1 and b0.meta["reference"] == "r"
    # a lone user turn is the prompt; there is no recorded answer
    assert lone.messages == [{"role": "user", "content": "alone"}]
    assert lone.meta["reference"] is None


def test_per_user_turn_mode_prefix_chain(sharegpt_file):
    wl = load_sharegpt(sharegpt_file, turn_mode="per_user_turn")
    assert dict(wl.skipped) == SKIPS
    assert [r.request_id for r in wl.requests] == ["a_0/t0", "a_0/t1", "a_4/t0", "b_0/t0",
                                                   "l_1/t0", "a_0#1/t0"]
    t0, t1 = wl.requests[:2]
    assert t0.group_id == t1.group_id == "a_0"
    assert t1.messages[: len(t0.messages)] == t0.messages  # each turn extends the previous
    assert t1.messages[len(t0.messages)] == {"role": "assistant", "content": "hello"}
    assert (t0.meta["turn"], t1.meta["turn"], t1.meta["user_turns"]) == (0, 1, 2)
    assert t0.meta["reference"] == "hello" and t1.meta["reference"] == "so"
    assert [r.request_id for r in load_sharegpt(sharegpt_file, 1, turn_mode="per_user_turn")
            .requests] == ["a_0/t0"]


def test_jsonl_and_bad_utf8_entry(tmp_path):
    good = json.dumps({"id": "g", "conversations": [t("human", "a"), t("gpt", "b")]}).encode()
    bad = good.replace(b'"a"', b'"\xff"').replace(b'"g"', b'"x"')
    (tmp_path / "sg.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    wl = load_sharegpt(tmp_path / "sg.jsonl")
    assert [r.request_id for r in wl.requests] == ["g"] and wl.skipped == {"bad_utf8": 1}
    # the same bytes as a JSON array: the bad entry alone is skipped
    (tmp_path / "sg.json").write_bytes(b"[" + bad + b"," + good + b"]")
    wl = load_sharegpt(tmp_path / "sg.json")
    assert [r.request_id for r in wl.requests] == ["g"] and wl.skipped == {"bad_utf8": 1}


def test_truncated_array_keeps_what_was_read(tmp_path):
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(ENTRIES[:2], indent=2)[:-40])
    wl = load_sharegpt(p)
    assert [r.request_id for r in wl.requests] == ["a_0"] and wl.skipped == {"invalid_json": 1}


def test_bad_args_and_missing_file(tmp_path, sharegpt_file):
    with pytest.raises(ValueError, match="turn_mode"):
        load_sharegpt(sharegpt_file, turn_mode="pairs")
    with pytest.raises(DatasetNotFound, match="--sharegpt-json"):
        load_sharegpt(tmp_path / "missing.json")


@pytest.mark.skipif(not SAMPLE.is_file(), reason="shared/data ShareGPT sample absent")
@pytest.mark.parametrize("turn_mode", ["full", "per_user_turn"])
def test_first_turn_only_file(tmp_path, turn_mode):
    """The derived form serving benchmarks ship: each entry keeps only its first human turn
    (real entries of the sample, same layout). Every entry is one request, none skipped."""
    raw = json.loads(SAMPLE.read_text())
    first = [{"id": e["id"], "conversations": [c for c in e["conversations"]
                                               if c["from"] == "human"][:1]} for e in raw]
    p = tmp_path / "first_turns.json"
    p.write_text(json.dumps(first, indent=2))
    wl = load_sharegpt(p, turn_mode=turn_mode)
    assert not wl.skipped
    assert len(wl.requests) == len(raw) == 5
    for req, entry in zip(wl.requests, first, strict=True):
        assert req.messages == [{"role": "user", "content": entry["conversations"][0]["value"]}]
        assert req.meta["reference"] is None


@pytest.mark.skipif(not SAMPLE.is_file(), reason="shared/data ShareGPT sample absent")
def test_real_sample():
    raw = json.loads(SAMPLE.read_text())
    wl = load_sharegpt(SAMPLE)
    assert [r.request_id for r in wl.requests] == [e["id"] for e in raw] and not wl.skipped
    last = wl.requests[-1]  # hRPPgZT_11 starts with a gpt turn
    assert last.meta["dropped_leading_assistant_turns"] == 1
    assert last.messages[0] == {"role": "user", "content": raw[-1]["conversations"][1]["value"]}
    per_turn = load_sharegpt(SAMPLE, turn_mode="per_user_turn")
    humans = sum(1 for e in raw for c in e["conversations"] if c["from"] == "human")
    assert len(per_turn.requests) == humans == 17
    for r in per_turn.requests:
        assert r.messages[-1]["role"] == "user"
        assert all(m["role"] in ("user", "assistant") for m in r.messages)
