"""The shared core of LRU and FIFO: a resident set kept in a C-implemented ``OrderedDict``
whose first entry is the next victim. The two differ only in whether a hit moves a key to
the end, so one class holds both and each keeps a branch-free hot loop."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

from kvtier.policies.base import EvictionPolicy

_MISSING = object()


class OrderedDictPolicy(EvictionPolicy):
    """Evict the first key of ``self._d``; ``refresh`` = a hit moves the key to the end (LRU),
    else insertion order stands (FIFO). ``kvtier.sim.tiers.fast_path`` drives ``_d`` directly for
    exactly ``LRUPolicy`` / ``FIFOPolicy`` (same semantics, no method calls)."""

    refresh: bool = True

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
        if self.refresh:
            self._d.move_to_end(key)

    def insert(self, key: int) -> list[int]:
        d = self._d
        if key in d:
            if self.refresh:
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
        # Pad the free slots with placeholder keys (negative: never real keys) at the old end,
        # so every miss is exactly "insert + pop oldest" with no size check in the loop.
        d: OrderedDict[int, None] = OrderedDict.fromkeys(range(-free, 0))
        d.update(self._d)
        pop = d.popitem
        hits = 0
        if self.refresh:
            move = d.move_to_end
            for k in keys:
                if k in d:
                    move(k)
                    hits += 1
                else:
                    d[k] = None
                    pop(False)
        else:
            for k in keys:
                if k in d:
                    hits += 1
                else:
                    d[k] = None
                    pop(False)
        for _ in range(max(0, free - (len(keys) - hits))):  # unused placeholders, oldest first
            pop(False)
        self._d = d
        return hits
