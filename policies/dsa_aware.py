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
   decode steps (the clock ticks when a (request, layer) pair recurs, i.e. once per round of
   the batch); the lowest score is evicted. Recurring spans survive bursts of one-off reads,
   which plain LRU cannot do; the decay forgets spans the indexer stopped choosing.
   ``half_life`` is in decode steps (default 4). Without ``begin_record`` calls the clock
   stands still (plain LFU with history).
3. **History and admission (TinyLFU-like).** Scores of evicted blocks stay in a bounded ghost
   table (``ghost_factor`` x capacity entries), so a block the indexer keeps returning to
   regains its rank. A missed block is admitted only if its history (score before this read)
   beats the eviction candidate's score, or it is protected and the candidate is not; else
   ``insert`` returns ``[key]`` and the read is remembered in the ghost. History counts as at
   least ``admit_floor`` (0.25: a block last read two half-lives ago), so a cold victim gives
   way at once, while a block no more popular than a warm resident never displaces it. With
   the trace's step -> layer -> request order one decode step touches more blocks than a small
   HBM holds; admitting everything flushes the recurring core every step (LRU's failure mode),
   while gated admission keeps a stable subset, as OPT does.
4. **Finished requests first.** A decoding request reads all its layers at every step, so a
   request not seen for ``idle_steps`` decode steps has finished (or been preempted); its
   blocks are evicted before any block of a live request, whatever their scores. Frequency
   alone would keep a finished request's hot blocks for several half-lives.

Scores are kept in log space relative to the clock (``lp = log(score) + a * t``), so a lazy
min-heap orders all blocks without rescaling. Protected blocks met during victim search are
parked in a second heap and re-examined once per decode step. O(log n) per access.
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
                 half_life: float = 4.0, ghost_factor: float = 2.0,
                 admission: bool = True, idle_steps: float = 1.0,
                 admit_floor: float = 0.25) -> None:
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
        if not 0.0 < admit_floor:
            raise ValueError(f"admit_floor must be > 0, got {admit_floor}")
        self._log_floor = math.log(admit_floor)
        self._a = math.log(2.0) / self.half_life
        self._lp: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []  # unprotected (as far as known), lazy
        self._parked: list[tuple[float, int]] = []  # protected when last looked at, lazy
        self._ghost: OrderedDict[int, float] = OrderedDict()
        self._ghost_cap = int(ghost_factor * capacity)
        self._cur: dict[int, int] = {}
        self._round: set[tuple[int, int]] = set()
        self._t = 0.0
        self.idle_steps = float(idle_steps)
        self._seen: dict[int, float] = {}  # request -> clock when last seen
        self._by_req: dict[int, set[int]] = {}  # request -> resident keys
        self._idle: list[int] = []  # keys of idle requests, evicted first

    # -- context and clock ------------------------------------------------------------------

    def begin_record(self, step_idx: int, layer_id: int, request_idx: int, seq_len: int,
                     block_size: int) -> None:
        super().begin_record(step_idx, layer_id, request_idx, seq_len, block_size)
        if seq_len > self._cur.get(request_idx, -1):
            self._cur[request_idx] = seq_len
        pair = (request_idx, layer_id)
        rnd = self._round
        if pair in rnd:  # the batch came round again: one decode step passed
            rnd.clear()
            self._t += 1.0
            self._unpark()
            self._collect_idle()
        rnd.add(pair)
        self._seen[request_idx] = self._t

    def _collect_idle(self) -> None:
        """Once per step: queue the resident blocks of requests that stopped decoding."""
        limit = self._t - self.idle_steps
        for r, keys in self._by_req.items():
            if keys and self._seen.get(r, self._t) < limit:
                self._idle.extend(sorted(keys))

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
        if key not in self._lp:
            r = key >> _REQ_SHIFT
            ks = self._by_req.get(r)
            if ks is None:
                ks = self._by_req[r] = set()
            ks.add(key)
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
        idle, limit = self._idle, self._t - self.idle_steps
        while idle:
            k = idle[-1]
            if k in lp and self._seen.get(k >> _REQ_SHIFT, self._t) < limit:
                return float("-inf"), k, False
            idle.pop()
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
        hist = self._ghost.pop(key, None)
        lp_new = self._bumped(hist)
        floor = self._log_floor + self._a * self._t
        if self.capacity == 0:
            return [key]
        victims = []
        while len(self._lp) >= self.capacity:
            vlp, v, vprot = self._victim()
            # the newcomer's history (before this read) must beat the victim's score
            if (self.admission and max(hist if hist is not None else floor, floor) <= vlp
                    and (vprot or not self._protected(key))):
                self._to_ghost(key, lp_new)
                return [key]
            self._to_ghost(v, self._lp[v])  # its real score (vlp is -inf for idle requests)
            self.remove(v)
            victims.append(v)
        self._store(key, lp_new)
        return victims

    def remove(self, key: int) -> bool:
        if self._lp.pop(key, None) is None:
            return False
        ks = self._by_req.get(key >> _REQ_SHIFT)
        if ks is not None:
            ks.discard(key)
        return True
