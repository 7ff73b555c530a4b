"""LongBench v2 loader: official template filling, length filter, truncation, bad items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.runners.datasets import DatasetNotFound, load_longbench_v2
from kvtier.runners.datasets.longbench_v2 import TEMPLATES, middle_truncate

PROMPTS = Path(__file__).parents[2] / "shared" / "data" / "longbench_v2" / "prompts"


def item(i: int, length: str = "short", **over) -> dict:
    row = {"_id": f"66f36490821e116aacb2cc{i:02x}", "domain": "Single-Document QA",
           "sub_domain": "Academic", "difficulty": "easy", "length": length,
           "question": f"  Which one {i}? ", "choice_A": " a ", "choice_B": "b",
           "choice_C": "c", "choice_D": "d", "answer": "B",
           "context": f"\nThe document {i}.\n"}
    row.update(over)
    return row


def reference_prompt(row: dict) -> str:  # what pred.py builds
    return (
        "Please read the following text and answer the question below.\n\n<text>\n"
        f"{row['context'].strip()}\n</text>\n\nWhat is the correct answer to this question: "
        f"{row['question'].strip()}\nChoices:\n(A) {row['choice_A'].strip()}\n"
        f"(B) {row['choice_B'].strip()}\n(C) {row['choice_C'].strip()}\n"
        f"(D) {row['choice_D'].strip()}\n\n"
        'Format your response as follows: "The correct answer is (insert answer here)".'
    )


def test_prompt_and_meta(tmp_path):
    rows = [item(1), item(2, "medium"), item(3, "long")]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    wl = load_longbench_v2(tmp_path)  # a directory holding data.json
    assert [r.prompt for r in wl.requests] == [reference_prompt(r) for r in rows]
    r = wl.requests[0]
    assert r.request_id == "lbv2-66f36490821e116aacb2cc01"
    assert r.meta["answer"] == "B" and r.meta["length"] == "short"
    assert r.meta["domain"] == "Single-Document QA" and "context" not in r.meta
    assert wl.source["split"] == "train" and wl.source["dataset_id"] == "zai-org/LongBench-v2"


def test_length_filter_limit_and_bad_items(tmp_path):
    rows = [item(1), item(2, "medium"), item(3, "long"), item(4, "huge"), item(5, context=None),
            item(6, question=7), "x", item(7, "medium"), {"_id": "z"}]
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    wl = load_longbench_v2(p, length="medium")
    assert [r.meta["index"] for r in wl.requests] == [2, 8]
    assert dict(wl.skipped) == {"filtered_length": 2, "bad_length_category": 1,
                                "missing_field": 2, "wrong_type": 1, "not_an_object": 1}
    assert len(load_longbench_v2(p, limit=1).requests) == 1
    with pytest.raises(ValueError, match="length"):
        load_longbench_v2(p, length="tiny")
    with pytest.raises(ValueError, match="template"):
        load_longbench_v2(p, template="5shot")
    with pytest.raises(DatasetNotFound, match="download_longbench_v2.sh"):
        load_longbench_v2(tmp_path / "missing")


def test_no_context_template(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps([item(1)]))
    (r,) = load_longbench_v2(tmp_path / "data.json", template="0shot_no_context").requests
    assert "document" not in r.prompt and r.prompt.startswith(
        "What is the correct answer to this question: Which one 1?\nChoices:\n(A) a\n")


@pytest.mark.parametrize("max_len", [0, 1, 2, 5, 6, 7, 9, 10, 11])
def test_middle_truncate_matches_pred_py(max_len):
    ids = list(range(10))
    out = middle_truncate(ids, max_len)
    if len(ids) <= max_len:
        assert out == ids
    elif max_len == 0:
        assert out == []
    else:  # pred.py, literally
        assert out == ids[:max_len//2] + ids[-max_len//2:]
        assert len(out) == max_len and out[-1] == 9 and (max_len < 2 or out[0] == 0)
    assert middle_truncate(tuple("abcdefg"), 5) == list("abefg")


@pytest.mark.skipif(not PROMPTS.is_dir(), reason="shared/data LongBench v2 templates absent")
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_are_the_official_files(name):
    assert TEMPLATES[name] == (PROMPTS / f"{name}.txt").read_text(encoding="utf-8")
