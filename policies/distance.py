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
    """Evict max(current position of the block's request - end of the block); ties: lowest key."""

    name = "distance"
    needs_context = True

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._res: set[int] = set()
        self._heaps: dict[int, list[int]] = {}  # request -> min-heap of keys (block id order)
        self._cur: dict[int, int] = {}

    def begin_record(self, step_idx: int, layer_id: int, request_idx: int, seq_len: int,
                     block_size: int) -> None:
        super().begin_record(step_idx, layer_id, request_idx, seq_len, block_size)
        if seq_len > self._cur.get(request_idx, -1):
            self._cur[request_idx] = seq_len

    def __contains__(self, key: int) -> bool:
        return key in self._res

    def __len__(self) -> int:
        return len(self._res)

    def keys(self) -> Iterator[int]:
        return iter(self._res)

    def touch(self, key: int) -> None:
        pass

    def _heap_key(self, key: int) -> int:
        # order within a request: block id first (farthest = smallest), then key
        return ((key & _BLOCK_MASK) << _REQ_SHIFT) | (key & _LOW)

    def _victim(self) -> int:
        bs = self.ctx.block_size
        best = None
        best_off = 0
        for r, h in list(self._heaps.items()):
            while h and (h[0] & _LOW) | (r << _REQ_SHIFT) not in self._res:
                heapq.heappop(h)
            if not h:
                del self._heaps[r]
                continue
            key = (h[0] & _LOW) | (r << _REQ_SHIFT)
            off = self._cur.get(r, 0) - ((key & _BLOCK_MASK) + 1) * bs
            if best is None or off > best_off or (off == best_off and key < best):
                best, best_off = key, off
        assert best is not None
        heapq.heappop(self._heaps[best >> _REQ_SHIFT])
        return best

    def insert(self, key: int) -> list[int]:
        if key in self._res:
            return []
        if self.capacity == 0:
            return [key]
        victims = []
        while len(self._res) >= self.capacity:
            v = self._victim()
            self._res.discard(v)
            victims.append(v)
        self._res.add(key)
        r = key >> _REQ_SHIFT
        h = self._heaps.get(r)
        if h is None:
            h = self._heaps[r] = []
        heapq.heappush(h, self._heap_key(key))
        return victims

    def remove(self, key: int) -> bool:
        if key in self._res:
            self._res.discard(key)  # heap entry is dropped lazily
            return True
        return False
