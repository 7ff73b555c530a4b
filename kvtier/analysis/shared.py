"""The shared-cache view: LRU and Belady/OPT miss-ratio curves of the whole key stream.

The key stream is the one ``kvtier sweep`` and ``kvtier mrc`` simulate: one key per (request,
layer, block) at the analysed block size (``kvtier.policies.base.block_key``), in trace order,
blocks ascending within a record, every stream sharing one cache. LRU hits at every capacity
come from one pass of stack distances (``kvtier.sim.cachesim.stack_distances``); OPT is
Belady's MIN simulated at a grid of capacities (``kernels.opt_hits``, which equals the
``belady`` policy of ``kvtier sweep``).

Bounded memory: the stream is spatially sampled (SHARDS, Waldspurger et al., FAST '15): a key
is kept when the top 24 bits of splitmix64(key) fall below a threshold T, i.e. with rate
R = T / 2**24, and T halves whenever more than ``max_samples`` accesses are held. A sampled
stream keeps every access of the keys it keeps, so LRU stack distances scale by 1/R and a cache
of C blocks behaves like a cache of C R blocks on the sample ("miniature simulation",
Waldspurger et al., ATC '17, used here for OPT as well). ``max_samples = 0`` keeps everything
(exact curves).
"""

from __future__ import annotations

import numpy as np

from kvtier.analysis.kernels import splitmix64

FULL = 1 << 24
LRU_POINTS = 48
OPT_POINTS = 16


class SharedCache:
    def __init__(self, max_samples: int, kern) -> None:
        self.max_samples = int(max_samples)
        self.k = kern
        self.threshold = FULL
        self.parts: list[np.ndarray] = []
        self.held = 0
        self.accesses = 0

    @property
    def rate(self) -> float:
        return self.threshold / FULL

    def add(self, req, layer, boff, blocks) -> None:
        self.accesses += int(blocks.shape[0])
        keys = self.k.sample_keys(req, layer, boff, blocks, self.threshold)
        if keys.shape[0]:
            self.parts.append(keys)
            self.held += int(keys.shape[0])
        while self.max_samples and self.held > self.max_samples and self.threshold > 1:
            self.threshold //= 2
            t = np.uint64(self.threshold)
            self.parts = [p[(splitmix64(p) >> np.uint64(40)) < t] for p in self.parts]
            self.held = sum(int(p.shape[0]) for p in self.parts)

    def keys(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int64)

    def result(self, per_stream: dict, n_streams: int, same_keys: bool) -> dict:
        """Curves at full-scale capacities (blocks shared by all streams), and the per-stream
        LRU of ``cache_sim`` beside the shared LRU and OPT at the same total capacity
        (capacity per stream x streams)."""
        from kvtier.sim.cachesim import stack_distances

        keys = self.keys()
        r = self.rate
        n = int(keys.shape[0])
        distinct = int(np.unique(keys).shape[0]) if n else 0
        ws = int(round(distinct / r)) if n else 0
        out: dict = {
            "key": "block_key(request, layer, block) in trace order (as kvtier sweep / mrc)",
            "accesses": self.accesses, "sample_rate": r, "sampled_accesses": n,
            "exact": self.threshold == FULL, "working_set_blocks": ws,
        }
        if n == 0:
            out.update({"capacity_blocks": [], "lru_miss_ratio": [], "opt_capacity_blocks": [],
                        "opt_miss_ratio": [], "opt_vs_lru": [], "per_stream_vs_shared": []})
            return out
        d = stack_distances(keys)
        hist = np.bincount(d[d >= 0], minlength=1)
        hits_below = np.concatenate([[0], np.cumsum(hist)])  # hits_below[c] = #(0 <= d < c)

        def lru_miss(cap_full: np.ndarray) -> np.ndarray:
            c = np.minimum(np.floor(np.asarray(cap_full) * r + 1e-9).astype(np.int64),
                           hits_below.shape[0] - 1)
            return 1.0 - hits_below[c] / n

        grid = np.unique(np.concatenate([
            np.round(np.geomspace(1, max(ws, 1), LRU_POINTS)).astype(np.int64), [ws]]))
        per_caps = np.asarray([int(c) * n_streams for c in (int(x) for x in per_stream)],
                              dtype=np.int64)
        opt_grid = np.unique(np.concatenate([
            np.round(np.geomspace(1, max(ws, 1), OPT_POINTS)).astype(np.int64), per_caps]))
        opt_mini = np.maximum(np.floor(opt_grid * r + 1e-9).astype(np.int64), 0)
        uniq_mini, inv = np.unique(opt_mini, return_inverse=True)
        opt_h = self.k.opt_hits(keys, uniq_mini)[inv]
        opt_miss = 1.0 - opt_h / n
        out.update({
            "capacity_blocks": grid.tolist(),
            "lru_miss_ratio": lru_miss(grid).tolist(),
            "opt_capacity_blocks": opt_grid.tolist(),
            "opt_miss_ratio": opt_miss.tolist(),
            "opt_vs_lru": [{"capacity_blocks": int(c), "lru_miss_ratio": float(lm),
                            "opt_miss_ratio": float(om)}
                           for c, lm, om in zip(opt_grid.tolist(), lru_miss(opt_grid).tolist(),
                                                opt_miss.tolist(), strict=True)],
        })
        rows = []
        opt_at = dict(zip(opt_grid.tolist(), opt_miss.tolist(), strict=True))
        for c, sim in per_stream.items():
            total = int(c) * n_streams
            rows.append({
                "capacity_per_stream": int(c), "total_capacity_blocks": total,
                "per_stream_lru_miss_ratio": 1.0 - sim["hit_rate"],
                "shared_lru_miss_ratio": float(lru_miss(np.array([total]))[0]),
                "shared_opt_miss_ratio": float(opt_at[total]),
            })
        out["per_stream_vs_shared"] = rows
        out["per_stream_same_accesses"] = same_keys
        return out
