"""LFU: evict the least frequently read resident block (ties: least recently read).

Counts live only while a block is resident (in-cache LFU), so a block that returns after
eviction starts again at 1. O(1) per access with frequency buckets (Shah, Mitra & Matani 2010).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

from kvtier.policies.base import EvictionPolicy


class LFUPolicy(EvictionPolicy):
    """Least frequently used; LRU among equal counts."""

    name = "lfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._freq: dict[int, int] = {}
        self._buckets: dict[int, OrderedDict[int, None]] = {}
        self._min = 0

    def __contains__(self, key: int) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def keys(self) -> Iterator[int]:
        return iter(self._freq)

    def touch(self, key: int) -> None:
        f = self._freq[key]
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
            if self._min == f:
                self._min = f + 1
        self._freq[key] = f + 1
        nb = self._buckets.get(f + 1)
        if nb is None:
            nb = self._buckets[f + 1] = OrderedDict()
        nb[key] = None

    def _evict_one(self) -> int:
        bucket = self._buckets[self._min]
        victim, _ = bucket.popitem(last=False)
        if not bucket:
            del self._buckets[self._min]
        del self._freq[victim]
        return victim

    def insert(self, key: int) -> list[int]:
        if key in self._freq:
            self.touch(key)
            return []
        if self.capacity == 0:
            return [key]
        victims = []
        while len(self._freq) >= self.capacity:
            victims.append(self._evict_one())
        self._freq[key] = 1
        b = self._buckets.get(1)
        if b is None:
            b = self._buckets[1] = OrderedDict()
        b[key] = None
        self._min = 1
        return victims

    def remove(self, key: int) -> bool:
        f = self._freq.pop(key, None)
        if f is None:
            return False
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
            if self._min == f:
                self._min = min(self._buckets, default=0)
        return True

    def access_many(self, keys: Iterable[int]) -> int:
        keys = keys.tolist() if hasattr(keys, "tolist") else list(keys)
        if self.capacity == 0:
            return 0
        freq = self._freq
        buckets = self._buckets
        cap = self.capacity
        mn = self._min
        hits = 0
        for k in keys:
            f = freq.get(k)
            if f is not None:
                hits += 1
                bucket = buckets[f]
                del bucket[k]
                if not bucket:
                    del buckets[f]
                    if mn == f:
                        mn = f + 1
                f += 1
                freq[k] = f
                nb = buckets.get(f)
                if nb is None:
                    nb = buckets[f] = OrderedDict()
                nb[k] = None
            else:
                if len(freq) >= cap:
                    bucket = buckets[mn]
                    victim, _ = bucket.popitem(last=False)
                    if not bucket:
                        del buckets[mn]
                    del freq[victim]
                freq[k] = 1
                b = buckets.get(1)
                if b is None:
                    b = buckets[1] = OrderedDict()
                b[k] = None
                mn = 1
        self._min = mn
        return hits
