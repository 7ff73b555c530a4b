"""Tokenization and length filtering of workloads before a run (no model)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from kvtier.runners.prepare import (
    HASH_BLOCK_TOKENS,
    ORDINARY_ID_HIGH,
    ORDINARY_ID_LOW,
    batches,
    prepare,
    synthetic_prompt,
)
from kvtier.runners.requests import Request


class _Tok:
    """Stand-in tokenizer: one id per character (enough to test the filtering logic)."""

    def encode(self, text):
        return [ord(c) for c in text]

    def apply_chat(self, messages):
        return [0] + [ord(c) for m in messages for c in m["content"]] + [1]


def test_synthetic_prompt_exact_length_ordinary_ids_and_seeded():
    for n in (1, 17, 1000):
        ids = synthetic_prompt(n, seed=3, index=5)
        assert len(ids) == n
        arr = np.array(ids)
        assert arr.min() >= ORDINARY_ID_LOW and arr.max() < ORDINARY_ID_HIGH
    assert synthetic_prompt(50, 3, 5) == synthetic_prompt(50, 3, 5)
    assert synthetic_prompt(50, 3, 5) != synthetic_prompt(50, 3, 6)
    assert synthetic_prompt(50, 3, 5) != synthetic_prompt(50, 4, 5)


def test_hash_ids_map_equal_blocks_to_equal_tokens():
    b = HASH_BLOCK_TOKENS
    a = synthetic_prompt(2 * b + 100, seed=0, index=0, hash_ids=[10, 11, 12])
    c = synthetic_prompt(3 * b, seed=0, index=1, hash_ids=[10, 11, 99])
    assert len(a) == 2 * b + 100 and len(c) == 3 * b
    assert a[: 2 * b] == c[: 2 * b]  # shared leading hash ids -> shared prefix
    assert a[2 * b : 2 * b + 100] != c[2 * b : 2 * b + 100]
    short = synthetic_prompt(b + 10, seed=0, index=2, hash_ids=[10])  # too few ids: padded
    assert len(short) == b + 10 and short[:b] == a[:b]


def test_prepare_skips_counts_caps_and_limit():
    reqs = [
        Request("a", prompt="hello"),  # BOS + 5
        Request("b", prompt="x" * 50),  # too long
        Request("c", messages=[{"role": "user", "content": "hi"}], max_new_tokens=2),
        Request("d"),  # no prompt at all
        Request("e", prompt_len=4, max_new_tokens=0),  # nothing to generate
        Request("f", prompt_len=8, max_new_tokens=100),
        Request("g", prompt="late"),  # beyond the limit: not looked at
    ]
    skipped = Counter({"loader_reason": 2})
    out = list(prepare(reqs, _Tok(), max_prompt_tokens=10, max_new_tokens=16, limit=3,
                       skipped=skipped, bos_id=0))  # fmt: skip
    assert [p.request_id for p in out] == ["a", "c", "f"]
    assert out[0].tokens == [0] + [ord(c) for c in "hello"]
    assert out[1].tokens == [0, ord("h"), ord("i"), 1] and out[1].max_new_tokens == 2
    assert len(out[2].tokens) == 8 and out[2].max_new_tokens == 16
    assert skipped == Counter({"loader_reason": 2, "prompt_too_long": 1, "no_prompt": 1,
                               "bad_max_new_tokens": 1})  # fmt: skip


def test_batches_keep_fifo_order():
    items = list(range(7))
    assert list(batches(items, 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batches([], 2)) == []
