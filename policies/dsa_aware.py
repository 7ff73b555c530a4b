"""DSA-aware eviction: protect what the indexer reads every step, rank the rest by a decayed
selection frequency, and admit only blocks that earn a place.

Design (kvtier's own; measured against LRU/ARC/S3-FIFO/OPT in docs/POLICIES.md):

1. **Protected set.** DSA's top-k almost always contains the attention-sink prefix (the first
   ``sink_tokens`` positions) and the most recent ``window_tokens`` positions of the request
   (``dsa_model.md`` §6: the indexer scores every position up to and including the current one).
   Blocks overlapping either are evicted only when no unprotected block is resident. The
   window moves with the request's position (from ``begin_record``), so blocks age out of it.
2. **Decayed frequency (LRFU-style).** Blocks are ranked by
   ``score = sum over its reads of 2 ** (-(now - t_read) / half_life)`` with ``now`` counted in
   decode steps (each record advances the clock by 1 / the number of (request, layer) pairs
   seen, so one round of the batch is one step); the lowest score is evicted. Recurring spans
   survive bursts of one-off reads, which plain LRU cannot do; the decay forgets spans the
   indexer stopped choosing. ``half_life`` is in decode steps (default 8). Without
   ``begin_record`` calls the clock stands still (plain LFU with history).
3. **History and admission (TinyLFU-like).** Scores of evicted blocks stay in a bounded ghost
   table (``ghost_factor`` x capacity entries), so a block the indexer keeps returning to
   regains its rank. A missed block scoring below the eviction candidate is not admitted
   (``insert`` returns ``[key]``), unless it is protected and the candidate is not. With the
   trace's step -> layer -> request order one decode step touches more blocks than a small HBM
   holds, and admitting everything flushes the recurring core every step (LRU's failure mode).

Scores are kept in log space relative to the clock (``lp = log(score) + a * t``), so a lazy
min-heap orders all blocks without rescaling. Protected blocks met during victim search are
parked in a second heap and re-examined once per decode step. O(log n) per access.
The (request, layer) set used for the clock grows with the requests seen.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterator

from kvtier.policies.base import _BLOCK_BITS, _BLOCK_MASK, _LAYER_BITS, EvictionPolicy

_REQ_SHIFT = _LAYER_BITS + _BLOCK_BITS


class DSAAwarePolicy(EvictionPolicy):
    """Sink + recent-window protection, decayed selection frequency, scored admission."""

    name = "dsa_aware"
    needs_context = True

    def __init__(self, capacity: int, sink_tokens: int = 4, window_tokens: int = 64,
                 half_life: float = 8.0, ghost_factor: float = 2.0,
                 admission: bool = True) -> None:
        super().__init__(capacity)
        if sink_tokens < 0 or window_tokens < 0:
            raise ValueError("sink_tokens and window_tokens must be >= 0")
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        if ghost_factor < 0:
            raise ValueError(f"ghost_factor must be >= 0, got {ghost_factor}")
        self.sink_tokens = int(sink_tokens)
        self.window_tokens = int(window_tokens)
        self.half_life = float(half_life)
        self.admission = bool(admission)
        self._a = math.log(2.0) / self.half_life
        self._lp: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []  # unprotected (as far as known), lazy
        self._parked: list[tuple[float, int]] = []  # protected when last looked at, lazy
        self._ghost: OrderedDict[int, float] = OrderedDict()
        self._ghost_cap = int(ghost_factor * capacity)
        self._cur: dict[int, int] = {}
        self._pairs: set[tuple[int, int]] = set()
        self._t = 0.0
        self._last_unpark = 0

    # -- context and clock ------------------------------------------------------------------

    def begin_record(self, step_idx: int, layer_id: int, request_idx: int, seq_len: int,
                     block_size: int) -> None:
        super().begin_record(step_idx, layer_id, request_idx, seq_len, block_size)
        if seq_len > self._cur.get(request_idx, -1):
            self._cur[request_idx] = seq_len
        pairs = self._pairs
        pairs.add((request_idx, layer_id))
        self._t += 1.0 / len(pairs)
        if int(self._t) > self._last_unpark:
            self._last_unpark = int(self._t)
            self._unpark()

    def _unpark(self) -> None:
        """Once per step: blocks that left the window go back to the eviction heap."""
        lp, keep = self._lp, []
        for item in self._parked:
            if lp.get(item[1]) != item[0]:
                continue
            if self._protected(item[1]):
                keep.append(item)
            else:
                heapq.heappush(self._heap, item)
        heapq.heapify(keep)
        self._parked = keep

    def _protected(self, key: int) -> bool:
        bs = self.ctx.block_size
        start = (key & _BLOCK_MASK) * bs
        if start < self.sink_tokens:
            return True
        cur = self._cur.get(key >> _REQ_SHIFT)
        return cur is not None and start + bs > cur - self.window_tokens

    # -- scores -------------------------------------------------------------------------------

    def score(self, key: int) -> float:
        """Current decayed selection frequency of a resident key."""
        return math.exp(self._lp[key] - self._a * self._t)

    def _bumped(self, old: float | None) -> float:
        """Log-priority after one more read now (``old``: previous log-priority or None)."""
        at = self._a * self._t
        if old is None:
            return at
        x = old - at  # log of the current score
        return at + (x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x)))

    def _store(self, key: int, lp: float) -> None:
        self._lp[key] = lp
        heapq.heappush(self._heap, (lp, key))
        n = 4 * len(self._lp) + 1024
        if len(self._heap) + len(self._parked) > n:
            live = [(v, k) for k, v in self._lp.items()]
            self._heap, self._parked = live, []
            heapq.heapify(self._heap)

    def _victim(self) -> tuple[float, int, bool]:
        """(log-priority, key, protected) of the next block to evict; left in its heap."""
        heap, parked, lp = self._heap, self._parked, self._lp
        while heap:
            item = heap[0]
            if lp.get(item[1]) != item[0]:
                heapq.heappop(heap)
            elif self._protected(item[1]):
                heapq.heappush(parked, heapq.heappop(heap))
            else:
                return item[0], item[1], False
        while parked:
            item = parked[0]
            if lp.get(item[1]) != item[0]:
                heapq.heappop(parked)
            else:
                return item[0], item[1], True
        raise RuntimeError("dsa_aware: no resident block to evict")

    def _to_ghost(self, key: int, lp: float) -> None:
        if self._ghost_cap <= 0:
            return
        g = self._ghost
        g.pop(key, None)
        g[key] = lp
        if len(g) > self._ghost_cap:
            g.popitem(last=False)

    # -- EvictionPolicy -----------------------------------------------------------------------

    def __contains__(self, key: int) -> bool:
        return key in self._lp

    def __len__(self) -> int:
        return len(self._lp)

    def keys(self) -> Iterator[int]:
        return iter(self._lp)

    def touch(self, key: int) -> None:
        self._store(key, self._bumped(self._lp[key]))

    def insert(self, key: int) -> list[int]:
        if key in self._lp:
            self.touch(key)
            return []
        lp_new = self._bumped(self._ghost.pop(key, None))
        if self.capacity == 0:
            return [key]
        victims = []
        while len(self._lp) >= self.capacity:
            vlp, v, vprot = self._victim()
            if self.admission and lp_new < vlp and (vprot or not self._protected(key)):
                self._to_ghost(key, lp_new)
                return [key]
            del self._lp[v]
            self._to_ghost(v, vlp)
            victims.append(v)
        self._store(key, lp_new)
        return victims

    def remove(self, key: int) -> bool:
        return self._lp.pop(key, None) is not None
