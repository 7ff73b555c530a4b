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
        if self.capacity == 0:
            return 0
        d = self._d
        move = d.move_to_end
        pop = d.popitem
        free = self.capacity - len(d)
        misses = 0
        for k in keys:
            if k in d:
                move(k)
            else:
                d[k] = None
                misses += 1
                if misses > free:
                    pop(False)
        return len(keys) - misses


_MISSING = object()
