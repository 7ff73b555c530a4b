"""``kvtier run ruler`` and ``kvtier run longbench-v2`` end to end on fixture data written in
the real formats (a RULER tarball ``data/ruler/<task>/validation_<L>.jsonl``; a LongBench v2
``data.json`` with the 12 official keys)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from run_helpers import check_run, demo_bundle, run_cli

from kvtier.runners.launch import RunError


def _ruler_tgz(tmp_path):
    rows = {
        "data/ruler/niah_single_1/validation_4096.jsonl": [
            {"index": 3, "input": "The grass is green. The key is 42. What is the key?",
             "outputs": ["42"], "length": 4096, "answer_prefix": " Answer: The key is"},
            {"index": 3, "input": "The sky is blue. " * 60 + "What is the key?",
             "outputs": ["7"], "length": 4096, "answer_prefix": " Answer:"},
        ],
        "data/ruler/vt/validation_4096.jsonl": [
            {"index": 0, "input": "VAR X = 5. VAR Y = X. Which variables equal 5?",
             "outputs": ["X", "Y"], "length": 4096},
        ],
    }  # fmt: skip
    path = tmp_path / "data_debug.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, items in rows.items():
            data = "".join(json.dumps(r) + "\n" for r in items).encode() + b"{not json\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_ruler_tarball(tmp_path):
    tgz = _ruler_tgz(tmp_path)
    out = tmp_path / "out"
    rc = run_cli(["ruler", "--ruler-tgz", str(tgz), "--data-dir", str(tmp_path / "extract"),
                  "--trace-out", str(out), "--max-new-tokens", "2",
                  "--max-prompt-tokens", "100"])  # fmt: skip
    assert rc == 0
    summary, meta, records = check_run(out, "ruler", "allenai/ruler_data")
    # one bad JSON line per file (loader), the 60-sentence haystack is too long (runner)
    assert summary.skipped == {"invalid_json": 2, "prompt_too_long": 1}
    ids = {r["sample_id"] for r in records}
    assert ids == {"ruler-niah_single_1-4096-1", "ruler-vt-4096-1"}
    # plain text: BOS + input + answer_prefix, no chat template
    tok = demo_bundle().tokenizer
    text = "The grass is green. The key is 42. What is the key?" + " Answer: The key is"
    n = len(tok.encode(text)) + 1
    first = min(r["step_idx"] for r in records if r["sample_id"] == "ruler-niah_single_1-4096-1")
    assert first == n
    assert meta["config"]["max_prompt_tokens_effective"] == 100


def test_longbench_v2(tmp_path):
    item = {"_id": "66f36490821e116aacb2cc22", "domain": "Single-Document QA",
            "sub_domain": "Literary", "difficulty": "easy", "length": "short",
            "question": "What colour is the door?", "choice_A": "Red", "choice_B": "Blue",
            "choice_C": "Green", "choice_D": "Black", "answer": "A",
            "context": "The house at the end of the lane had a red door."}  # fmt: skip
    medium = {**item, "_id": "66f36490821e116aacb2cc23", "length": "medium"}
    broken = {k: v for k, v in item.items() if k != "question"}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([item, medium, broken]))
    out = tmp_path / "out"
    rc = run_cli(["longbench-v2", "--lbv2-json", str(path), "--lbv2-length", "short",
                  "--trace-out", str(out), "--max-new-tokens", "2"])  # fmt: skip
    assert rc == 0
    summary, meta, records = check_run(out, "longbench-v2", "zai-org/LongBench-v2")
    assert summary.requests == 1
    assert set(summary.skipped) == {"missing_field", "filtered_length"}
    assert meta["dataset"]["split"] == "train"


def test_missing_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(RunError, match="sharegpt.*does not exist|download_sharegpt"):
        run_cli(["sharegpt", "--sharegpt-json", str(tmp_path / "nope.json"),
                 "--trace-out", str(tmp_path / "o")])  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("flags", "match"), [
    (["--backend", "sim", "--policy", "nope"], "unknown eviction policy 'nope'"),
    (["--backend", "sim", "--policy", "belady"], "offline policy"),
    (["--backend", "sim", "--tiers", "nope"], "unknown tier preset"),
    (["--kv-block-size", "0"], "--kv-block-size"),
    (["--model-free"], "serving replays only"),
    (["--arrivals", "mooncake"], "apply to burstgpt only"),
    (["--burstgpt-csv", "b.csv"], "--burstgpt-csv applies to kvtier run burstgpt, not sharegpt"),
    (["--mooncake-jsonl", "m.jsonl"], "--mooncake-jsonl applies to kvtier run mooncake"),
    (["--ruler-tasks", "vt"], "--ruler-tasks applies to kvtier run ruler"),
])  # fmt: skip
def test_bad_flags_fail_before_anything_runs(tmp_path, flags, match):
    data = tmp_path / "sg.json"
    data.write_text("[]")
    with pytest.raises(RunError, match=match):
        run_cli(["sharegpt", "--sharegpt-json", str(data), "--trace-out", str(tmp_path / "o"),
                 *flags])  # fmt: skip
    assert not (tmp_path / "o").exists()
