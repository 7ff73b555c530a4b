"""S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO with 2-bit
reinsertion and a ghost FIFO of recently evicted keys.

Why here: DSA reads many blocks exactly once (volatile tail of the top-k) next to a hot core
(sink, recent window, recurring spans); S3-FIFO filters one-hit blocks out quickly while LRU
lets them flush the hot core.

Details: small = ``small_ratio`` of capacity (at least 1 slot), main = the rest; a block
leaving small moves to main if it was read while in small, else its key goes to the ghost
(as many entries as main). A missed key found in the ghost enters main directly. Main evicts
FIFO, re-inserting blocks with a non-zero counter (decremented). Counters saturate at 3.
Moves to main reset the counter. Exactly one block leaves per needed slot.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

from kvtier.policies.base import EvictionPolicy


class S3FIFOPolicy(EvictionPolicy):
    """Small + main + ghost FIFO queues."""

    name = "s3fifo"

    def __init__(self, capacity: int, small_ratio: float = 0.1) -> None:
        super().__init__(capacity)
        if not 0.0 < small_ratio < 1.0:
            raise ValueError(f"small_ratio must be in (0, 1), got {small_ratio}")
        self.small_cap = max(1, int(round(capacity * small_ratio))) if capacity else 0
        self.main_cap = capacity - self.small_cap
        self._s: OrderedDict[int, None] = OrderedDict()
        self._m: OrderedDict[int, None] = OrderedDict()
        self._g: OrderedDict[int, None] = OrderedDict()
        self._freq: dict[int, int] = {}

    def __contains__(self, key: int) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def keys(self) -> Iterator[int]:
        return iter(self._freq)

    def touch(self, key: int) -> None:
        f = self._freq[key]
        if f < 3:
            self._freq[key] = f + 1

    def _evict_main(self) -> int:
        m, freq = self._m, self._freq
        while True:
            k, _ = m.popitem(last=False)
            f = freq[k]
            if f > 0:
                freq[k] = f - 1
                m[k] = None
            else:
                del freq[k]
                return k

    def _make_room(self) -> int:
        """Free one slot; return the evicted key."""
        s, m, freq = self._s, self._m, self._freq
        while True:
            if s and (len(s) >= self.small_cap or not m):
                k, _ = s.popitem(last=False)
                if freq[k] > 0 and self.main_cap > 0:
                    freq[k] = 0
                    victim = self._evict_main() if len(m) >= self.main_cap else None
                    m[k] = None
                    if victim is not None:
                        return victim
                    continue
                del freq[k]
                g = self._g
                g[k] = None
                if len(g) > max(self.main_cap, 1):
                    g.popitem(last=False)
                return k
            return self._evict_main()

    def insert(self, key: int) -> list[int]:
        if key in self._freq:
            self.touch(key)
            return []
        if self.capacity == 0:
            return [key]
        victims = []
        while len(self._freq) >= self.capacity:
            victims.append(self._make_room())
        if key in self._g and self.main_cap > 0:
            del self._g[key]
            self._m[key] = None
        else:
            self._s[key] = None
        self._freq[key] = 0
        return victims

    def remove(self, key: int) -> bool:
        if self._freq.pop(key, None) is None:
            return False
        if self._s.pop(key, 0) is None:
            return True
        self._m.pop(key, None)
        return True

    def access_many(self, keys: Iterable[int]) -> int:
        keys = keys.tolist() if hasattr(keys, "tolist") else list(keys)
        if self.capacity == 0:
            return 0
        freq = self._freq
        get = freq.get
        insert = self.insert
        hits = 0
        for k in keys:
            f = get(k)
            if f is None:
                insert(k)
            else:
                hits += 1
                if f < 3:
                    freq[k] = f + 1
        return hits
