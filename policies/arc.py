"""ARC (Megiddo & Modha, FAST'03): balances recency (T1) against frequency (T2) using ghost
lists B1/B2 of recently evicted keys to adapt the target size ``p`` of T1.

Why here: DSA mixes blocks read once (volatile top-k tail) with blocks read at every step
(sink, window, recurring spans); ARC adapts between the two regimes without a tuning knob.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

from kvtier.policies.base import EvictionPolicy


class ARCPolicy(EvictionPolicy):
    """Adaptive Replacement Cache; resident = T1 + T2 (<= capacity), ghosts B1 + B2."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.p = 0.0
        self._t1: OrderedDict[int, None] = OrderedDict()
        self._t2: OrderedDict[int, None] = OrderedDict()
        self._b1: OrderedDict[int, None] = OrderedDict()
        self._b2: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, key: int) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def keys(self) -> Iterator[int]:
        yield from self._t1
        yield from self._t2

    def touch(self, key: int) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        else:
            self._t2.move_to_end(key)

    def _replace(self, in_b2: bool) -> int | None:
        t1, t2 = self._t1, self._t2
        if t1 and (len(t1) > self.p or (in_b2 and len(t1) == self.p) or not t2):
            k, _ = t1.popitem(last=False)
            self._b1[k] = None
            return k
        if t2:
            k, _ = t2.popitem(last=False)
            self._b2[k] = None
            return k
        return None

    def insert(self, key: int) -> list[int]:
        if key in self:
            self.touch(key)
            return []
        c = self.capacity
        if c == 0:
            return [key]
        t1, t2, b1, b2 = self._t1, self._t2, self._b1, self._b2
        victims: list[int] = []
        if key in b1:
            self.p = min(float(c), self.p + max(len(b2) / len(b1), 1.0))
            del b1[key]
            if len(t1) + len(t2) >= c:
                v = self._replace(False)
                if v is not None:
                    victims.append(v)
            t2[key] = None
        elif key in b2:
            self.p = max(0.0, self.p - max(len(b1) / len(b2), 1.0))
            del b2[key]
            if len(t1) + len(t2) >= c:
                v = self._replace(True)
                if v is not None:
                    victims.append(v)
            t2[key] = None
        else:
            l1 = len(t1) + len(b1)
            if l1 >= c:
                if len(t1) < c:
                    b1.popitem(last=False)
                    if len(t1) + len(t2) >= c:
                        v = self._replace(False)
                        if v is not None:
                            victims.append(v)
                else:
                    victims.append(t1.popitem(last=False)[0])
            else:
                total = l1 + len(t2) + len(b2)
                if total >= c:
                    if total >= 2 * c and b2:
                        b2.popitem(last=False)
                    if len(t1) + len(t2) >= c:
                        v = self._replace(False)
                        if v is not None:
                            victims.append(v)
            t1[key] = None
        # removals (remove()) can leave ARC's bookkeeping short of full; enforce the bound
        while len(t1) + len(t2) > c:
            victims.append((t1 if t1 else t2).popitem(last=False)[0])
        return victims

    def access_many(self, keys: Iterable[int]) -> int:
        keys = keys.tolist() if hasattr(keys, "tolist") else list(keys)
        if self.capacity == 0:
            return 0
        t1, t2 = self._t1, self._t2
        move2 = t2.move_to_end
        insert = self.insert
        hits = 0
        for k in keys:
            if k in t2:
                move2(k)
                hits += 1
            elif k in t1:
                del t1[k]
                t2[k] = None
                hits += 1
            else:
                insert(k)
        return hits

    def remove(self, key: int) -> bool:
        if self._t1.pop(key, 0) is None or self._t2.pop(key, 0) is None:
            return True
        return False
