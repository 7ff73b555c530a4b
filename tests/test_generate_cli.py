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


# ----------------------------------------------------------- raw ids and teacher forcing
def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def reference_ckpt(tmp_path_factory):
    """A checkpoint in the DeepSeek reference's own layout, with its own config.json."""
    from dsa_reference import BASE, write_reference_checkpoint

    out = tmp_path_factory.mktemp("ref-ckpt")
    tensors = write_reference_checkpoint(out, BASE, seed=7)
    return out, tensors


def test_forced_ids_trace_exactly_the_given_tokens(reference_ckpt, tmp_path, capsys):
    """--input-ids + --forced-ids on the reference's checkpoint and config.json: the trace
    holds one record per (forced token fed, layer), each with the top-k the reference
    re-statement (tests/dsa_reference.py) selects for that token."""
    from dsa_reference import BASE, Reference, reference_run

    torch.set_num_threads(1)
    ckpt, tensors = reference_ckpt
    g = torch.Generator().manual_seed(8)
    prompts = torch.randint(0, BASE["vocab_size"], (2, 40), generator=g).tolist()
    forced = [torch.randint(2, BASE["vocab_size"], (n,), generator=g).tolist() for n in (6, 4)]
    trace = tmp_path / "trace"
    argv = ["generate", "--ckpt-path", str(ckpt), "--config", str(ckpt / "config.json"),
            "--input-ids", _jsonl(tmp_path / "p.jsonl", prompts),
            "--forced-ids", _jsonl(tmp_path / "f.jsonl", forced), "--temperature", "0",
            "--trace-enable", "--trace-out", str(trace)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    got = [json.loads(x.removeprefix("Completion ids: ")) for x in out.splitlines()
           if x.startswith("Completion ids: ")]  # fmt: skip
    assert got == forced
    dec = msgspec.json.Decoder(TopkRecord)
    records = [dec.decode(x) for x in (trace / TRACE_FILE).read_bytes().splitlines()]
    # N forced ids: N - 1 decode steps feed them (the last is never fed back, §10)
    steps = {(r.request_id, r.step_idx) for r in records}
    assert steps == {(0, 40 + i) for i in range(5)} | {(1, 40 + i) for i in range(3)}
    assert len(records) == len(steps) * BASE["n_layers"]
    assert check_trace_dir(trace) == []
    # the reference on the same tokens (rows padded past their forced ids)
    rows = [p + f + [0] * (6 - len(f)) for p, f in zip(prompts, forced, strict=True)]
    _, picks = reference_run(Reference(BASE, tensors), torch.tensor(rows), 40)
    for r in records:
        topk, _ = picks[r.step_idx - 40 + 1][r.layer_id]
        assert sorted(r.selected_token_pos) == sorted(topk.indices[r.request_id, 0].tolist())
    (req0, req1) = [json.loads(x) for x in (trace / "requests.jsonl").read_text().splitlines()]
    assert (req0["sample_id"], req0["prompt_len"], req1["sample_id"]) == ("p-0", 40, "p-1")


def test_forced_ids_with_more_new_tokens_sample_on(ckpt, tmp_path, capsys):
    tok = Tokenizer(ckpt)
    prompt = tok.chat_prompt("Hello there")
    free = gen_mod.generate(build_model(ckpt / "kvtier_config.json", ckpt), [prompt], 6,
                            tok.eos_id, temperature=0.0)[0]  # fmt: skip
    ids = _jsonl(tmp_path / "p.jsonl", [prompt])
    forced = [free[:2][::-1]]  # two tokens the model would not have produced in that order
    assert main(_argv(ckpt, "--input-ids", ids, "--forced-ids", _jsonl(tmp_path / "f.jsonl", forced))) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("Completion ids: ")]
    got = json.loads(line.removeprefix("Completion ids: "))
    assert got[:2] == forced[0] and len(got) <= 6  # --max-new-tokens 6: sampled after them
    # text prompts take forced ids too, and the same ids give the same completion
    f = tmp_path / "p.txt"
    f.write_text("Hello there")
    assert main(_argv(ckpt, "--input-file", str(f), "--forced-ids", str(tmp_path / "f.jsonl"))) == 0
    assert f"Completion ids: {json.dumps(got)}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("ids", "forced", "extra", "message"),
    [
        (["[1, 2"], None, [], "--input-ids: {p} line 1: invalid JSON"),
        (["", '{"ids": [1]}'], None, [], "--input-ids: {p} line 2: expected a non-empty JSON list of token ids, got dict"),
        (["[]"], None, [], "line 1: expected a non-empty JSON list of token ids, got an empty list"),
        (["[1, 2.5]"], None, [], "--input-ids: {p} line 1: token 1 is 2.5, not a non-negative integer"),
        (["[1, -3]"], None, [], "line 1: token 1 is -3, not a non-negative integer"),
        (["[1, true]"], None, [], "line 1: token 1 is True, not a non-negative integer"),
        (["[1, 129280]"], None, [], "--input-ids: {p} line 1: token 1 is 129280, outside the config's vocab_size 129280"),
        ([""], None, [], "--input-ids: {p} holds no token ids"),
        (["[5, 6]", "[7]"], ["[3]"], [], "--forced-ids: {f} has 1 id lists for 2 prompts; give one line per prompt"),
        (["[5, 6]"], ["[3, 4, 5]"], ["--max-new-tokens", "2"], "--max-new-tokens 2 is shorter than the 3 forced ids of {f} line 1"),
        (["[5, 6]"], ["[3, 1, 4]"], [], "--forced-ids: {f} line 1: EOS (id 1) at token 1 before the last"),
        (["[5, 6]"], ["[3] "] , ["--max-seq-len", "2"], "--forced-ids: {f} line 1: its prompt (2 tokens) and 1 forced ids exceed max_seq_len 2"),
        (["[5, 6]"], ["nope"], [], "--forced-ids: {f} line 1: invalid JSON"),
    ],
)  # fmt: skip
def test_bad_id_files_fail_in_one_line(ckpt, tmp_path, capsys, ids, forced, extra, message):
    p = tmp_path / "ids.jsonl"
    p.write_text("\n".join(ids) + "\n")
    argv = ["generate", "--ckpt-path", str(ckpt), "--config", str(ckpt / "kvtier_config.json"),
            "--input-ids", str(p), *extra]  # fmt: skip
    f = tmp_path / "forced.jsonl"
    if forced is not None:
        f.write_text("\n".join(forced) + "\n")
        argv += ["--forced-ids", str(f)]
    trace = tmp_path / "trace"
    argv += ["--trace-enable", "--trace-out", str(trace)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(p=p, f=f) in err[0], err
    assert not trace.exists()  # refused before a trace is started


def test_forced_ids_need_a_batch_and_missing_file(ckpt, tmp_path, capsys):
    assert main(_argv(ckpt, "--interactive", "--forced-ids", "x.jsonl")) == 2
    assert "--forced-ids needs --input-file or --input-ids" in capsys.readouterr().err
    assert main(_argv(ckpt, "--input-ids", str(tmp_path / "none.jsonl"))) == 2
    assert f"--input-ids: {tmp_path / 'none.jsonl'} not found" in capsys.readouterr().err
