"""What a dataset loader hands to a runner: requests, skip counts and where they came from.

Loaders never tokenize (the runner owns the model's tokenizer) and never crash on a bad row:
they skip it and count the reason in ``Workload.skipped``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class Request:
    """One request to run through the model.

    Exactly one of ``prompt`` (plain text), ``messages`` (chat turns, rendered with the chat
    template) or ``prompt_len`` (synthetic prompt of exactly that many tokens, BurstGPT-style)
    describes the prompt.
    """

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_len: int | None = None
    max_new_tokens: int | None = None  # per-request cap (e.g. BurstGPT response tokens)
    arrival_s: float | None = None  # arrival time from the trace start, seconds
    group_id: str | None = None  # requests of one conversation share it (ShareGPT turns)
    meta: dict = field(default_factory=dict)  # task, length bucket, answer, ...


@dataclass(slots=True)
class Workload:
    """A loaded dataset: the requests in order, skipped rows by reason, and provenance."""

    name: str
    requests: list[Request]
    skipped: Counter = field(default_factory=Counter)
    source: dict = field(default_factory=dict)  # dataset id, file, split, revision, sha256

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n


def request_info(req: Request, max_new_tokens: int | None = None) -> dict:
    """What identifies ``req`` in its dataset, for the run's ``requests.jsonl`` (the trace's
    records carry only the integer ``request_id`` the runner gives it at admission):
    ``sample_id`` (the loader's id: dataset row, RULER task and line, ShareGPT conversation
    and turn, ...), ``group_id`` (conversation), ``arrival_s``, ``requested_prompt_len``
    (length-only requests), ``max_new_tokens`` (the cap it ran with) and the loader's
    ``meta``; absent values are left out."""
    info: dict = {"sample_id": req.request_id}
    if req.group_id is not None:
        info["group_id"] = req.group_id
    if req.arrival_s is not None:
        info["arrival_s"] = req.arrival_s
    if req.prompt_len is not None:
        info["requested_prompt_len"] = req.prompt_len
    if max_new_tokens is not None:
        info["max_new_tokens"] = max_new_tokens
    if req.meta:
        info["meta"] = req.meta
    return info
