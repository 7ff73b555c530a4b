"""Turn a loaded ``Workload`` into token ids the model can run, counting what is skipped.

The runner owns tokenization (loaders never tokenize): chat data goes through the model's
chat template, plain text gets BOS + text, and length-only requests (BurstGPT, Mooncake,
Azure) get synthetic prompts of exactly ``prompt_len`` ordinary token ids from a seeded RNG.
Mooncake-style ``meta["hash_ids"]`` map equal hash ids to equal token blocks, so shared
prefixes in the trace stay shared prefixes in the prompts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvtier.runners.requests import Request

#: ordinary byte-level BPE ids of the DeepSeek V3 tokenizer: 0-2 are BOS/EOS/pad and
#: 128000+ are added special tokens, so synthetic prompts draw from [3, 128000).
ORDINARY_ID_LOW = 3
ORDINARY_ID_HIGH = 128_000
#: Mooncake FAST'25 traces hash prompts in 512-token blocks.
HASH_BLOCK_TOKENS = 512

SKIP_TOO_LONG = "prompt_too_long"
SKIP_EMPTY = "empty_prompt"
SKIP_NO_PROMPT = "no_prompt"
SKIP_BAD_CAP = "bad_max_new_tokens"


class PromptTokenizer(Protocol):
    """What the runner needs from a tokenizer (``kvtier.model.tokenizer`` provides it)."""

    def encode(self, text: str) -> list[int]: ...

    def apply_chat(self, messages: list[dict[str, str]]) -> list[int]: ...


@dataclass(slots=True)
class Prepared:
    """A request ready to run: its prompt ids and its generation cap."""

    request: Request
    tokens: list[int]
    max_new_tokens: int
    trace_id: int | None = None  # the trace's request_id, given at admission

    @property
    def request_id(self) -> str:
        """The loader's id (the trace's integer id is ``trace_id``)."""
        return self.request.request_id


def synthetic_prompt(
    prompt_len: int,
    seed: int,
    index: int,
    hash_ids: Sequence[int] | None = None,
    vocab_high: int = ORDINARY_ID_HIGH,
) -> list[int]:
    """Exactly ``prompt_len`` ordinary token ids, reproducible from (seed, index).

    With ``hash_ids`` each 512-token block is drawn from an RNG keyed by its hash id, so two
    requests with the same leading hash ids get byte-identical prompt prefixes.
    """
    high = min(vocab_high, ORDINARY_ID_HIGH)
    if hash_ids:
        blocks = [
            np.random.default_rng([seed, 1, int(h)]).integers(
                ORDINARY_ID_LOW, high, HASH_BLOCK_TOKENS, dtype=np.int64
            )
            for h in hash_ids[: -(-prompt_len // HASH_BLOCK_TOKENS)]
        ]
        ids = np.concatenate(blocks) if blocks else np.empty(0, dtype=np.int64)
        if len(ids) < prompt_len:  # fewer hash ids than the length needs: pad per request
            tail = np.random.default_rng([seed, 2, index]).integers(
                ORDINARY_ID_LOW, high, prompt_len - len(ids), dtype=np.int64
            )
            ids = np.concatenate([ids, tail])
        return ids[:prompt_len].tolist()
    rng = np.random.default_rng([seed, 0, index])
    return rng.integers(ORDINARY_ID_LOW, high, prompt_len, dtype=np.int64).tolist()


def tokenize_request(
    req: Request, tokenizer: PromptTokenizer, bos_id: int | None, seed: int, index: int, vocab_size: int
) -> list[int] | None:
    """Prompt ids of one request, or ``None`` when it describes no prompt."""
    if req.messages is not None:
        return list(tokenizer.apply_chat(req.messages))
    if req.prompt is not None:
        ids = list(tokenizer.encode(req.prompt))
        return ([bos_id] if bos_id is not None else []) + ids
    if req.prompt_len is not None:
        return synthetic_prompt(req.prompt_len, seed, index, req.meta.get("hash_ids"), vocab_size)
    return None


def prompt_budget(max_seq_len: int, max_new_tokens: int, max_prompt_tokens: int | None) -> int:
    """The longest prompt a run admits: ``max_prompt_tokens`` if given, else
    ``max_seq_len - max_new_tokens`` (the model's context window minus the generation cap).
    The live run and the model-free replay both use it, so they admit the same requests."""
    budget = max_seq_len - max_new_tokens if max_prompt_tokens is None else max_prompt_tokens
    if budget < 1:
        raise ValueError(f"--max-prompt-tokens: max_seq_len {max_seq_len} - max_new_tokens "
                         f"{max_new_tokens} leaves no room for a prompt")
    return budget


def request_cap(req: Request, max_new_tokens: int) -> int:
    """Tokens a request may generate: ``min(its own cap, max_new_tokens)``."""
    return max_new_tokens if req.max_new_tokens is None else min(req.max_new_tokens, max_new_tokens)


def _skip_reason(cap: int, n_tokens: int | None, max_prompt_tokens: int) -> str | None:
    if cap < 1:
        return SKIP_BAD_CAP
    if n_tokens is None:
        return SKIP_NO_PROMPT
    if n_tokens == 0:
        return SKIP_EMPTY
    if n_tokens > max_prompt_tokens:
        return SKIP_TOO_LONG
    return None


def prepare(
    requests: Iterable[Request],
    tokenizer: PromptTokenizer,
    *,
    max_prompt_tokens: int,
    max_new_tokens: int,
    limit: int | None,
    seed: int = 0,
    bos_id: int | None = 0,
    vocab_size: int = ORDINARY_ID_HIGH,
    skipped: Counter | None = None,
) -> Iterator[Prepared]:
    """Yield up to ``limit`` runnable requests in order; count the rest in ``skipped``.

    A request is skipped (never truncated) when its prompt is empty or longer than
    ``max_prompt_tokens``; its generation cap is ``min(request cap, max_new_tokens)``.
    """
    skipped = skipped if skipped is not None else Counter()
    taken = 0
    for index, req in enumerate(requests):
        if limit is not None and taken >= limit:
            return
        cap = request_cap(req, max_new_tokens)
        if cap < 1:
            skipped[SKIP_BAD_CAP] += 1
            continue
        tokens = tokenize_request(req, tokenizer, bos_id, seed, index, vocab_size)
        if tokens and max(tokens) >= vocab_size:
            # the tokenizer's vocabulary, not this request, is the problem: every text prompt
            # would fail inside the model's embedding, so stop before it loads
            raise ValueError(
                f"vocab_size: the model config's vocab_size {vocab_size} does not cover the "
                f"tokenizer (request {index} has token id {max(tokens)}); use a config with "
                "vocab_size >= the tokenizer's (129280 for DeepSeek V3's), or a length-only "
                "workload (burstgpt, mooncake, azure), whose synthetic prompts fit any vocab")
        why = _skip_reason(cap, None if tokens is None else len(tokens), max_prompt_tokens)
        if why is not None:
            skipped[why] += 1
            continue
        taken += 1
        yield Prepared(req, tokens, cap)


def admit_length_only(
    requests: Iterable[Request],
    *,
    max_prompt_tokens: int,
    max_new_tokens: int,
    skipped: Counter,
) -> list[Request]:
    """The length-only requests (``prompt_len``: BurstGPT, Mooncake, Azure) that ``prepare``
    would admit, without building their prompts: the same skips, counted in ``skipped``, for
    the model-free replay. A synthetic prompt has exactly ``prompt_len`` tokens."""
    out = []
    for req in requests:
        why = _skip_reason(request_cap(req, max_new_tokens), req.prompt_len, max_prompt_tokens)
        if why is not None:
            skipped[why] += 1
        else:
            out.append(req)
    return out


def batches(items: Iterable[Prepared], batch_size: int) -> Iterator[list[Prepared]]:
    """Consecutive batches of at most ``batch_size`` (FIFO order kept)."""
    batch: list[Prepared] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
