"""FIFO: evict the block resident longest; hits do not refresh. The cheapest baseline."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

from kvtier.policies.base import EvictionPolicy


class FIFOPolicy(EvictionPolicy):
    """First in, first out (insertion order in an ``OrderedDict``)."""

    name = "fifo"

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
        pass

    def insert(self, key: int) -> list[int]:
        d = self._d
        if key in d:
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
        # placeholder keys fill the free slots at the old end (see LRUPolicy.access_many)
        d: OrderedDict[int, None] = OrderedDict.fromkeys(range(-free, 0))
        d.update(self._d)
        pop = d.popitem
        hits = 0
        for k in keys:
            if k in d:
                hits += 1
            else:
                d[k] = None
                pop(False)
        for _ in range(max(0, free - (len(keys) - hits))):
            pop(False)
        self._d = d
        return hits


_MISSING = object()
