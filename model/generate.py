"""Batch generation with the reference demo's semantics (dsa_model.md §10), plus trace hooks.

One prefill of the shortest prompt at start_pos 0, then one-token decode steps; longer prompts
are teacher-forced so all rows share start_pos. The tracer (kvtier/trace/tracer.py) sees
``begin_batch`` -> per decode forward ``start_step``/``on_topk`` (from the model, every
layer)/``end_step(wall_s)`` -> ``end_batch``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch


class GenerateTracer(Protocol):
    def begin_batch(self, request_ids: list[int], prompt_tokens: list[list[int]]) -> object: ...
    def start_step(self, start_pos: int, active: list[bool]) -> None: ...
    def on_topk(self, layer_id: int, indices: torch.Tensor, scores: torch.Tensor) -> None: ...
    def end_step(self, wall_s: float) -> None: ...
    def end_batch(self) -> None: ...


def sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gumbel-equivalent sampling: ``argmax(softmax(logits/T) / Exp(1))``; T <= 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    return probs.div_(torch.empty_like(probs).exponential_(1)).argmax(dim=-1)


def _model_device(model: torch.nn.Module) -> torch.device:
    buf = getattr(model, "freqs_cis", None)
    if isinstance(buf, torch.Tensor):
        return buf.device
    return next(model.parameters()).device


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompt_tokens: list[list[int]],
    max_new_tokens: int | Sequence[int],
    eos_id: int,
    temperature: float = 0.0,
    tracer: GenerateTracer | None = None,
    request_ids: Sequence[int] | None = None,
    sync_cuda: bool = True,
    progress: Any = None,
    forced_tokens: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt; returns completions cut at EOS.

    ``total_len = min(max_seq_len, max_new_tokens + longest prompt)``. ``progress`` is an
    optional tqdm-like object; ``update(1)`` is called per forward. The model's own
    ``tracer`` attribute is restored afterwards; prefill is never traced.

    Teacher forcing: ``forced_tokens[i]`` (may be empty) are row i's first completion tokens,
    fed instead of the samples, so the decode steps (and their trace) are exactly those of an
    implementation that produced them; after them the row samples again. ``max_new_tokens``
    may be one cap per row: row i then finishes (and leaves the trace) after that many
    tokens; a single int keeps the reference's rule (every row runs to ``total_len``, the
    completion is cut at ``max_new_tokens``). A forced EOS ends its row like a sampled one,
    so ``eos_id`` may only be a row's last forced token.
    """
    if not prompt_tokens:
        raise ValueError("generate: no prompts")
    if len(prompt_tokens) > model.max_batch_size:
        raise ValueError(
            f"generate: {len(prompt_tokens)} prompts exceed max_batch_size {model.max_batch_size}"
        )
    prompt_lens = [len(p) for p in prompt_tokens]
    if min(prompt_lens) == 0:
        raise ValueError(f"generate: prompt {prompt_lens.index(0)} is empty")
    if max(prompt_lens) > model.max_seq_len:
        raise ValueError(
            f"generate: a prompt of {max(prompt_lens)} tokens exceeds max_seq_len {model.max_seq_len}"
        )
    caps = None if isinstance(max_new_tokens, int) else [int(n) for n in max_new_tokens]
    if caps is not None and len(caps) != len(prompt_tokens):
        raise ValueError("generate: max_new_tokens and prompt_tokens differ in length")
    if min(caps or [max_new_tokens]) < 1:
        raise ValueError("generate: max_new_tokens must be >= 1")
    forced = [list(f) for f in forced_tokens] if forced_tokens is not None else None
    if forced is not None:
        if len(forced) != len(prompt_tokens):
            raise ValueError("generate: forced_tokens and prompt_tokens differ in length")
        for i, f in enumerate(forced):
            cap = caps[i] if caps is not None else max_new_tokens
            if len(f) > cap:
                raise ValueError(
                    f"generate: row {i} forces {len(f)} tokens, more than max_new_tokens {cap}"
                )
            if prompt_lens[i] + len(f) > model.max_seq_len:
                raise ValueError(
                    f"generate: row {i}: prompt ({prompt_lens[i]}) + forced tokens ({len(f)}) "
                    f"exceed max_seq_len {model.max_seq_len}"
                )
            if eos_id in f[:-1]:
                raise ValueError(
                    f"generate: row {i} forces eos_id {eos_id} at offset {f.index(eos_id)}, "
                    "before its last forced token; generation stops at EOS"
                )
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    for what, rows in (("prompt", prompt_tokens), ("forced token", forced or [])):
        for i, row in enumerate(rows):
            if any(t < 0 for t in row):
                raise ValueError(f"generate: {what} ids of row {i} must be >= 0")
            if vocab is not None and max(row, default=0) >= vocab:
                raise ValueError(
                    f"generate: {what} ids of row {i} hold {max(row)}, outside the model's "
                    f"vocab_size {vocab} (does the config's vocab_size fit the tokenizer?)"
                )
    if request_ids is None:  # the trace's ids: 0, 1, 2, ... in admission order
        request_ids = list(range(len(prompt_tokens)))
    request_ids = list(request_ids)
    if len(request_ids) != len(prompt_tokens):
        raise ValueError("generate: request_ids and prompt_tokens differ in length")

    device = _model_device(model)
    on_cuda = device.type == "cuda"
    bsz = len(prompt_tokens)
    longest_new = max(caps) if caps is not None else max_new_tokens
    total_len = min(model.max_seq_len, longest_new + max(prompt_lens))
    tokens = torch.full((bsz, total_len), -1, dtype=torch.long, device=device)
    for i, p in enumerate(prompt_tokens):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    prompt_mask = tokens != -1
    for i, f in enumerate(forced or []):  # forced ids sit after the prompt, fed like it
        tokens[i, prompt_lens[i] : prompt_lens[i] + len(f)] = torch.tensor(f, device=device)
    given = tokens != -1  # prompt or forced: fed instead of the sample
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    lens_t = torch.tensor(prompt_lens, device=device)
    stop_at = None if caps is None else lens_t + torch.tensor(caps, device=device) - 1

    saved_tracer = getattr(model, "tracer", None)
    if tracer is not None:
        tracer.begin_batch(request_ids, [list(p) for p in prompt_tokens])
    prev_pos = 0
    try:
        for cur_pos in range(min(prompt_lens), total_len):
            decode = prev_pos > 0
            model.tracer = tracer if decode else None
            if tracer is not None and decode:
                active = ((lens_t <= prev_pos) & ~finished).tolist()
                tracer.start_step(prev_pos, active)
                if on_cuda and sync_cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
            logits = model.forward(tokens[:, prev_pos:cur_pos], prev_pos)
            if tracer is not None and decode:
                if on_cuda and sync_cuda:
                    torch.cuda.synchronize(device)
                tracer.end_step(time.perf_counter() - t0)
            next_token = sample(logits, temperature)
            next_token = torch.where(given[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            finished |= ~prompt_mask[:, cur_pos] & (next_token == eos_id)
            if stop_at is not None:  # row i's last token sits at len(prompt_i) + cap_i - 1
                finished |= stop_at <= cur_pos
            prev_pos = cur_pos
            if progress is not None:
                progress.update(1)
            if bool(finished.all()):
                break
    finally:
        model.tracer = saved_tracer
        if tracer is not None:
            tracer.end_batch()

    completions = []
    for i, row in enumerate(tokens.tolist()):
        cap = caps[i] if caps is not None else max_new_tokens
        out = row[prompt_lens[i] : prompt_lens[i] + cap]
        out = out[: out.index(-1)] if -1 in out else out
        if eos_id in out:
            out = out[: out.index(eos_id)]
        completions.append(out)
    return completions
