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
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    tracer: GenerateTracer | None = None,
    request_ids: Sequence[int] | None = None,
    sync_cuda: bool = True,
    progress: Any = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt; returns completions cut at EOS.

    ``total_len = min(max_seq_len, max_new_tokens + longest prompt)``. ``progress`` is an
    optional tqdm-like object; ``update(1)`` is called per forward. The model's own
    ``tracer`` attribute is restored afterwards; prefill is never traced.
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
    if max_new_tokens < 1:
        raise ValueError("generate: max_new_tokens must be >= 1")
    if request_ids is None:  # the trace's ids: 0, 1, 2, ... in admission order
        request_ids = list(range(len(prompt_tokens)))
    request_ids = list(request_ids)
    if len(request_ids) != len(prompt_tokens):
        raise ValueError("generate: request_ids and prompt_tokens differ in length")

    device = _model_device(model)
    on_cuda = device.type == "cuda"
    bsz = len(prompt_tokens)
    total_len = min(model.max_seq_len, max_new_tokens + max(prompt_lens))
    tokens = torch.full((bsz, total_len), -1, dtype=torch.long, device=device)
    for i, p in enumerate(prompt_tokens):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    prompt_mask = tokens != -1
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    lens_t = torch.tensor(prompt_lens, device=device)

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
            next_token = torch.where(prompt_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            finished |= ~prompt_mask[:, cur_pos] & (next_token == eos_id)
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
        out = row[prompt_lens[i] : prompt_lens[i] + max_new_tokens]
        out = out[: out.index(-1)] if -1 in out else out
        if eos_id in out:
            out = out[: out.index(eos_id)]
        completions.append(out)
    return completions
