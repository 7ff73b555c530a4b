"""``kvtier generate``: batch file, interactive chat (/clear, /exit), tracing, errors."""

from __future__ import annotations

import io
import json

import msgspec
import pytest
import torch
from hf_utils import CLI, converted
from spec52 import check_trace_dir

from kvtier.cli import main
from kvtier.model import generate as gen_mod
from kvtier.model.loading import build_model
from kvtier.model.tokenizer import Tokenizer
from kvtier.schema import SUMMARY_FILE, TRACE_FILE, TopkRecord


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    prev = torch.get_default_dtype()
    yield
    torch.set_default_dtype(prev)


@pytest.fixture(scope="module")
def ckpt():
    return converted("cli", 1)


def _argv(ckpt, *extra: str) -> list[str]:
    return ["generate", "--ckpt-path", str(ckpt), "--config", str(ckpt / "kvtier_config.json"),
            "--temperature", "0", "--max-new-tokens", "6", *extra]  # fmt: skip


def _completions(stdout: str) -> list[str]:
    return [line.removeprefix("Completion: ") for line in stdout.splitlines() if line.startswith("Completion: ")]


def test_batch_file_matches_library_generate(ckpt, tmp_path, capsys):
    prompts = ["Hello there", "What is two plus two?\nAnswer briefly.", "Third prompt"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n\n".join(prompts) + "\n\n\n")
    assert main(_argv(ckpt, "--input-file", str(f))) == 0
    out = capsys.readouterr().out
    assert [line.removeprefix("Prompt: ") for line in out.splitlines() if line.startswith("Prompt: ")] == [
        "Hello there", "What is two plus two?", "Third prompt"]  # fmt: skip
    got = _completions(out)
    # the same run through the library: batches of max_batch_size (2), greedy
    tok = Tokenizer(ckpt)
    model = build_model(ckpt / "kvtier_config.json", ckpt, seed=33377335)
    want = []
    for start in range(0, 3, CLI["max_batch_size"]):
        batch = [tok.chat_prompt(p) for p in prompts[start : start + 2]]
        want += [tok.decode(o) for o in gen_mod.generate(model, batch, 6, tok.eos_id, temperature=0.0)]
    assert got == [w.split("\n")[0] for w in want]
    assert len(got) == 3 and any(got)


def test_trace_records_every_decode_step_and_layer(ckpt, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("Tell me a story about sparse attention")
    trace = tmp_path / "trace"
    assert main(_argv(ckpt, "--input-file", str(f), "--trace-enable", "--trace-out", str(trace),
                      "--kv-block-size", "4", "--trace-store-scores")) == 0  # fmt: skip
    n_prompt = len(Tokenizer(ckpt).chat_prompt("Tell me a story about sparse attention"))
    dec = msgspec.json.Decoder(TopkRecord)
    records = [dec.decode(line) for line in (trace / TRACE_FILE).read_bytes().splitlines()]
    steps = sorted({r.step_idx for r in records})
    assert steps == list(range(n_prompt, n_prompt + len(steps))) and 1 <= len(steps) <= 5
    assert len(records) == len(steps) * CLI["n_layers"]
    for r in records:
        assert (r.rank, r.world_size, r.request_id, r.block_size_tokens) == (0, 1, 0, 4)
        assert r.seq_len_current == r.step_idx + 1
        assert r.unique_token_pos_count == len(r.selected_token_pos) == CLI["index_topk"]
        assert max(r.selected_token_pos) <= r.step_idx
        assert len(r.scores_topk) == CLI["index_topk"]
    summary = json.loads((trace / SUMMARY_FILE).read_text())
    assert summary["records"] == len(records)
    assert check_trace_dir(trace) == []  # the design note's format, checked independently
    (req,) = [json.loads(x) for x in (trace / "requests.jsonl").read_text().splitlines()]
    assert (req["request_id"], req["sample_id"], req["prompt_len"]) == (0, "p-0", n_prompt)
    # an existing trace is kept unless --force
    assert main(_argv(ckpt, "--input-file", str(f), "--trace-enable", "--trace-out", str(trace))) == 2
    assert "already holds a trace" in capsys.readouterr().err


def test_interactive_clear_and_exit(ckpt, monkeypatch, capsys):
    seen: list[list[int]] = []
    real = gen_mod.generate

    def spy(model, prompts, *a, **kw):
        seen.append(list(prompts[0]))
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr(gen_mod, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n/clear\nFresh start\n/exit\nNever read\n"))
    assert main(_argv(ckpt, "--interactive")) == 0
    out = capsys.readouterr().out
    tok = Tokenizer(ckpt)
    assert len(seen) == 3
    assert seen[0] == tok.chat_prompt("Hello")
    first_reply = tok.decode(real(build_model(ckpt / "kvtier_config.json", ckpt), [seen[0]], 6, tok.eos_id)[0])
    # the second turn carries the conversation, the third starts afresh after /clear
    assert seen[1] == tok.apply_chat([
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "Again"}])  # fmt: skip
    assert seen[2] == tok.chat_prompt("Fresh start")
    assert out.count(">>> ") == 5  # four inputs and /exit


def test_interactive_ends_at_eof(ckpt, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(_argv(ckpt, "--interactive")) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--kv-block-size", "0"], "--kv-block-size must be > 0"),
        (["--input-file", "does-not-exist.txt"], "--input-file: does-not-exist.txt not found"),
    ],
)
def test_bad_flags_fail_before_loading(ckpt, capsys, extra, message):
    argv = _argv(ckpt, *extra)
    if "--input-file" not in extra:
        argv += ["--interactive"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_shard_and_long_prompt(ckpt, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("word " * 200)  # longer than max_seq_len 64
    assert main(_argv(ckpt, "--input-file", str(f))) == 2
    assert "exceeds max_seq_len 64" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_argv(empty, "--input-file", str(f), "--config", str(ckpt / "kvtier_config.json"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model0-mp1.safetensors: shard for rank 0 of 1 not found" in err[0]
