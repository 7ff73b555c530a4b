"""LRU: evict the least recently read block. The reference point every sweep reports."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

from kvtier.policies.base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    """Least recently used, on a C-implemented ``OrderedDict`` (O(1) move/evict)."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._d: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, key: int) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def keys(self) -> Iterator[int]:
        return iter(self._d)

    def touch(self, key: int) -> None:
        self._d.move_to_end(key)

    def insert(self, key: int) -> list[int]:
        d = self._d
        if key in d:
            d.move_to_end(key)
            return []
        if self.capacity == 0:
            return [key]
        victims = []
        while len(d) >= self.capacity:
            victims.append(d.popitem(last=False)[0])
        d[key] = None
        return victims

    def remove(self, key: int) -> bool:
        return self._d.pop(key, _MISSING) is not _MISSING

    def access_many(self, keys: Iterable[int]) -> int:
        keys = keys.tolist() if hasattr(keys, "tolist") else list(keys)
        free = self.capacity - len(self._d)
        if self.capacity == 0:
            return 0
        # Pad the free slots with placeholder keys (negative: never real keys) at the LRU end,
        # so every miss is exactly "insert + pop oldest" with no size check in the loop.
        d: OrderedDict[int, None] = OrderedDict.fromkeys(range(-free, 0))
        d.update(self._d)
        move = d.move_to_end
        pop = d.popitem
        hits = 0
        for k in keys:
            if k in d:
                move(k)
                hits += 1
            else:
                d[k] = None
                pop(False)
        for _ in range(max(0, free - (len(keys) - hits))):  # unused placeholders, oldest first
            pop(False)
        self._d = d
        return hits


_MISSING = object()
