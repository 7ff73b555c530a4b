"""KV fetch time for the model-free serving replay with ``--backend sim``.

Without a model there are no indexer selections, so each decode step of each request draws
DSA-like ones (the recipe of ``kvtier.sim.synth``): the attention-sink tokens and the most
recent window always, the rest of the top-k from a per-request importance field (contiguous
"topic" bumps shared by all layers plus per-layer noise) perturbed by Gumbel noise every step.
Every (step, layer) is fetched through the ``TieredBackend``; the slowest row's pool read time
is what the step waits for, and ``serving_sim`` adds it to the step's service time.

Selections are synthetic: the summary says so (``config.kv_selections = "synthetic"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvtier.backend import LayerAccess


@dataclass(frozen=True, slots=True)
class SelectionShape:
    """How synthetic selections look (defaults follow ``kvtier.sim.synth.SynthConfig``)."""

    topk: int = 2048
    sink: int = 4
    window: int = 32
    topics: int = 12
    topic_width: float = 48.0
    layer_noise: float = 1.0
    temperature: float = 0.6


class _Req:
    __slots__ = ("field", "prompt_len", "seen")

    def __init__(self, field: np.ndarray, prompt_len: int) -> None:
        self.field = field  # [layers, prompt + cap] importance log-field
        self.prompt_len = prompt_len
        self.seen = 0  # decode steps served so far


class SyntheticFetchTime:
    """``extra_step_time(request_ids, step) -> seconds`` over a tiered backend.

    A request is admitted on its first decode step (prompt KV written to the pools) and
    released by ``release`` (pass it as ``serving_sim.simulate(on_finish=...)``). Its context
    at its n-th decode step is ``prompt_len + n + 1`` tokens (n from 0), in both engines.
    """

    def __init__(self, backend, prompt_lens: dict[str, int], caps: dict[str, int], n_layers: int,
                 block_size: int, shape: SelectionShape = SelectionShape(), seed: int = 0,
                 ids: dict[str, int] | None = None) -> None:  # fmt: skip
        self.backend = backend
        # the backend's (integer) request ids per loader id: the FIFO admission order when
        # given (``serving_sim.fifo_order``), else the order of first decode steps
        self.ids = dict(ids) if ids is not None else {}
        self.prompt_lens = prompt_lens
        self.caps = caps
        self.n_layers = n_layers
        self.block_size = block_size
        self.shape = shape
        self.seed = seed
        self.reqs: dict[str, _Req] = {}
        self.rng = np.random.default_rng([seed, 1])  # calls come in a deterministic order
        self.steps = 0
        self.total_us = 0.0

    def _admit(self, rid: str, index: int) -> _Req:
        p = self.prompt_lens[rid]
        length = p + self.caps[rid] + 1
        rng = np.random.default_rng([self.seed, index])
        s = self.shape
        x = np.arange(length, dtype=np.float64)
        centers = rng.uniform(0, length, s.topics)
        heights = rng.exponential(3.0, s.topics)
        base = (heights[:, None] * np.exp(-0.5 * ((x[None, :] - centers[:, None]) / s.topic_width) ** 2)).sum(0)
        field = base[None, :] + rng.normal(0.0, s.layer_noise, (self.n_layers, length))
        self.backend.admit(self.ids.setdefault(rid, len(self.ids)), p, ())
        req = _Req(field, p)
        self.reqs[rid] = req
        return req

    def _select(self, req: _Req, rng: np.random.Generator) -> list[np.ndarray]:
        """Sorted token positions per layer for the request's next decode step."""
        s = self.shape
        n = req.prompt_len + req.seen + 1
        k = min(s.topk, n)
        if k == n:
            full = np.arange(n, dtype=np.int64)
            return [full] * self.n_layers
        score = req.field[:, :n] + s.temperature * rng.gumbel(size=(self.n_layers, n))
        score[:, : min(s.sink, n)] = np.inf
        score[:, max(0, n - s.window) :] = np.inf
        pick = np.argpartition(-score, k - 1, axis=1)[:, :k]
        pick.sort(axis=1)
        return list(pick.astype(np.int64))

    def __call__(self, request_ids: Sequence[str], step: int) -> float:
        ids = list(request_ids)
        rows = []
        for rid in ids:
            req = self.reqs.get(rid)
            if req is None:
                req = self._admit(rid, len(self.reqs))
            rows.append(self._select(req, self.rng))
        worst_total = 0.0
        nums = [self.ids[rid] for rid in ids]
        for layer in range(self.n_layers):
            pos = [r[layer] for r in rows]
            blocks = [np.unique(p // self.block_size) for p in pos]
            access = LayerAccess(step_idx=self.steps, layer_id=layer, request_ids=nums,
                                 token_pos=pos, block_ids=blocks, block_size=self.block_size)  # fmt: skip
            fetched = self.backend.fetch(access)
            worst = 0.0
            for f in fetched:
                worst = max(worst, (f.local_pool.latency_us or 0.0) + (f.remote_pool.latency_us or 0.0))
            worst_total += worst
        for rid, num in zip(ids, nums, strict=True):
            self.reqs[rid].seen += 1
            self.backend.append(num, 1)
        self.steps += 1
        self.total_us += worst_total
        return worst_total * 1e-6

    def release(self, rid: str) -> None:
        if self.reqs.pop(rid, None) is not None:
            self.backend.release(self.ids[rid])
