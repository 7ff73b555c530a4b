"""DSA-aware eviction: protect what the indexer reads every step, rank the rest by a decayed
selection frequency.

Design (kvtier's own; measured against LRU/S3-FIFO/OPT in docs/POLICIES.md):

1. **Protected set.** DSA's top-k almost always contains the attention-sink prefix (the first
   ``sink_tokens`` positions) and the most recent ``window_tokens`` positions of the request
   (``dsa_model.md`` §6: the indexer scores every position up to and including the current one).
   Blocks overlapping either are not evicted while any unprotected block is resident. The
   window moves with the request's position (from ``begin_record``), so blocks age out of it.
2. **Decayed frequency (LRFU-style).** Every other block is ranked by
   ``score = sum over its reads of 2 ** (-(now - t_read) / half_life)`` with ``now`` counted in
   accesses; the lowest score is evicted. Frequent-but-not-recent spans (recurring topics)
   survive a burst of one-off reads, which plain LRU cannot do; the decay forgets spans the
   indexer stopped choosing. ``half_life`` defaults to the capacity (one cache turnover).

Scores are kept in log space relative to a moving clock (``lp = log(score) + a * t``) so one
lazy min-heap orders all blocks without rescaling. O(log n) per access.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator

from kvtier.policies.base import _BLOCK_BITS, _BLOCK_MASK, _LAYER_BITS, EvictionPolicy

_REQ_SHIFT = _LAYER_BITS + _BLOCK_BITS


class DSAAwarePolicy(EvictionPolicy):
    """Sink + recent-window protection, then lowest decayed selection frequency."""

    name = "dsa_aware"
    needs_context = True

    def __init__(self, capacity: int, sink_tokens: int = 4, window_tokens: int = 64,
                 half_life: float | None = None) -> None:
        super().__init__(capacity)
        if sink_tokens < 0 or window_tokens < 0:
            raise ValueError("sink_tokens and window_tokens must be >= 0")
        hl = float(half_life) if half_life is not None else float(max(capacity, 1))
        if hl <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self.sink_tokens = int(sink_tokens)
        self.window_tokens = int(window_tokens)
        self.half_life = hl
        self._a = math.log(2.0) / hl
        self._lp: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []
        self._cur: dict[int, int] = {}
        self._t = 0

    def begin_record(self, step_idx: int, layer_id: int, request_idx: int, seq_len: int,
                     block_size: int) -> None:
        super().begin_record(step_idx, layer_id, request_idx, seq_len, block_size)
        if seq_len > self._cur.get(request_idx, -1):
            self._cur[request_idx] = seq_len

    def __contains__(self, key: int) -> bool:
        return key in self._lp

    def __len__(self) -> int:
        return len(self._lp)

    def keys(self) -> Iterator[int]:
        return iter(self._lp)

    def score(self, key: int) -> float:
        """Current decayed selection frequency of a resident key."""
        return math.exp(self._lp[key] - self._a * self._t)

    def _protected(self, key: int) -> bool:
        bs = self.ctx.block_size
        start = (key & _BLOCK_MASK) * bs
        if start < self.sink_tokens:
            return True
        cur = self._cur.get(key >> _REQ_SHIFT)
        return cur is not None and start + bs > cur - self.window_tokens

    def _bump(self, key: int, old: float | None) -> None:
        at = self._a * self._t
        self._t += 1
        if old is None:
            lp = at
        else:
            x = old - at  # log of the current score
            lp = at + (x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x)))
        self._lp[key] = lp
        heapq.heappush(self._heap, (lp, key))
        if len(self._heap) > 4 * len(self._lp) + 1024:
            self._heap = [(v, k) for k, v in self._lp.items()]
            heapq.heapify(self._heap)

    def _victim(self) -> int:
        heap, lp = self._heap, self._lp
        held: list[tuple[float, int]] = []
        victim = None
        while heap:
            item = heapq.heappop(heap)
            if lp.get(item[1]) != item[0]:
                continue  # stale
            if self._protected(item[1]):
                held.append(item)
                continue
            victim = item[1]
            break
        if victim is None:  # everything resident is protected: evict the lowest score
            victim = held.pop(0)[1]
        for item in held:
            heapq.heappush(heap, item)
        return victim

    def touch(self, key: int) -> None:
        self._bump(key, self._lp[key])

    def insert(self, key: int) -> list[int]:
        if key in self._lp:
            self.touch(key)
            return []
        if self.capacity == 0:
            self._t += 1
            return [key]
        victims = []
        while len(self._lp) >= self.capacity:
            v = self._victim()
            del self._lp[v]
            victims.append(v)
        self._bump(key, None)
        return victims

    def remove(self, key: int) -> bool:
        return self._lp.pop(key, None) is not None
