"""Distance-aware eviction: evict the block farthest behind its request's current position.

Assumes importance decays with distance from the token being decoded (sliding-window /
StreamingLLM intuition): DSA's recent window is read every step, old context rarely. Recency
and frequency are ignored. Needs context (``begin_record``) for each request's current
position; blocks of other requests are judged by their request's last known position.
Caveat, measured in docs/POLICIES.md: DSA also re-reads the attention-sink prefix and
recurring old spans, which this policy evicts first.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from kvtier.policies.base import _BLOCK_BITS, _BLOCK_MASK, _LAYER_BITS, EvictionPolicy

_REQ_SHIFT = _LAYER_BITS + _BLOCK_BITS
_LOW = (1 << _REQ_SHIFT) - 1  # layer and block bits of a key


class DistancePolicy(EvictionPolicy):
    """Evict max(current position of the block's request - end of the block); ties: lowest key.

    Per request, a min-heap of its resident blocks (the farthest is the smallest block id);
    across requests, a lazy max-heap of each request's farthest block with its offset, re-pushed
    whenever that request's position or farthest block changes. O(log n) per access.
    """

    name = "distance"
    needs_context = True

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._res: set[int] = set()
        self._heaps: dict[int, list[int]] = {}  # request -> min-heap of (block, layer) codes
        self._top: list[tuple[int, int]] = []  # (-offset, key) of each request's farthest
        self._queued: dict[int, tuple[int, int]] = {}  # request -> its current entry in _top
        self._cur: dict[int, int] = {}

    def begin_record(self, step_idx: int, layer_id: int, request_idx: int, seq_len: int,
                     block_size: int) -> None:
        super().begin_record(step_idx, layer_id, request_idx, seq_len, block_size)
        if seq_len > self._cur.get(request_idx, -1):
            self._cur[request_idx] = seq_len
            self._push_top(request_idx)

    def __contains__(self, key: int) -> bool:
        return key in self._res

    def __len__(self) -> int:
        return len(self._res)

    def keys(self) -> Iterator[int]:
        return iter(self._res)

    def touch(self, key: int) -> None:
        pass

    @staticmethod
    def _code(key: int) -> int:
        # order within a request: block id first (farthest = smallest), then the key's low bits
        return ((key & _BLOCK_MASK) << _REQ_SHIFT) | (key & _LOW)

    def _offset(self, r: int, key: int) -> int:
        return self._cur.get(r, 0) - ((key & _BLOCK_MASK) + 1) * self.ctx.block_size

    def _farthest(self, r: int) -> int | None:
        """Request r's resident block with the smallest id (stale heap entries dropped)."""
        h = self._heaps.get(r)
        if not h:
            return None
        base = r << _REQ_SHIFT
        while h and ((h[0] & _LOW) | base) not in self._res:
            heapq.heappop(h)
        if not h:
            del self._heaps[r]
            return None
        return (h[0] & _LOW) | base

    def _push_top(self, r: int) -> None:
        """Queue r's current farthest block unless exactly that entry is already queued."""
        key = self._farthest(r)
        if key is None:
            self._queued.pop(r, None)
            return
        entry = (-self._offset(r, key), key)
        if self._queued.get(r) == entry:
            return
        self._queued[r] = entry
        heapq.heappush(self._top, entry)
        if len(self._top) > 4 * len(self._heaps) + 1024:  # drop superseded entries
            self._top = list(self._queued.values())
            heapq.heapify(self._top)

    def _victim(self) -> int:
        while self._top:  # not aliased: _push_top may rebuild the list
            entry = heapq.heappop(self._top)
            key = entry[1]
            r = key >> _REQ_SHIFT
            if self._queued.get(r) != entry:
                continue  # superseded by a later entry for r
            del self._queued[r]
            if key == self._farthest(r) and -entry[0] == self._offset(r, key):
                heapq.heappop(self._heaps[r])
                self._res.discard(key)
                self._push_top(r)
                return key
            self._push_top(r)  # defensive: re-queue r's current state
        raise RuntimeError("distance: no resident block to evict")

    def insert(self, key: int) -> list[int]:
        if key in self._res:
            return []
        if self.capacity == 0:
            return [key]
        victims = []
        while len(self._res) >= self.capacity:
            victims.append(self._victim())
        self._res.add(key)
        r = key >> _REQ_SHIFT
        h = self._heaps.get(r)
        if h is None:
            h = self._heaps[r] = []
        code = self._code(key)
        heapq.heappush(h, code)
        if h[0] == code:
            self._push_top(r)
        return victims

    def remove(self, key: int) -> bool:
        if key in self._res:
            self._res.discard(key)  # heap entries are dropped lazily
            self._push_top(key >> _REQ_SHIFT)
            return True
        return False
