"""Belady's OPT (MIN): evict the resident block whose next read is farthest in the future.

Offline: ``set_future(keys)`` receives the exact key stream first; every ``touch``/``insert``
then consumes the next position. Next uses come from one vectorised next-occurrence array;
the resident set is a dict key -> next use with a lazy max-heap. Gives the upper bound on hits
any eviction policy can reach on the trace (demand paging), or with ``bypass=True`` the bound
for caches that may decline to admit a block (the incoming block competes too).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

import numpy as np

from kvtier.policies.base import EvictionPolicy


def next_occurrence(keys: np.ndarray) -> np.ndarray:
    """``nxt[i]`` = index of the next occurrence of ``keys[i]``, or ``len(keys)`` if none."""
    keys = np.asarray(keys)
    n = keys.shape[0]
    nxt = np.full(n, n, dtype=np.int64)
    if n < 2:
        return nxt
    order = np.argsort(keys, kind="stable")
    same = keys[order[1:]] == keys[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


class BeladyPolicy(EvictionPolicy):
    """Offline optimal eviction (needs ``set_future``)."""

    name = "belady"
    offline = True

    def __init__(self, capacity: int, bypass: bool = False) -> None:
        super().__init__(capacity)
        self.bypass = bool(bypass)
        self._res: dict[int, int] = {}
        self._heap: list[tuple[int, int]] = []  # (-next_use, key), lazy
        self._future: list[int] = []
        self._next: list[int] = []
        self._future_arr = np.zeros(0, dtype=np.int64)
        self._t = 0

    def set_future(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        self._future_arr = keys
        self._future = keys.tolist()
        self._next = next_occurrence(keys).tolist()
        self._t = 0

    def __contains__(self, key: int) -> bool:
        return key in self._res

    def __len__(self) -> int:
        return len(self._res)

    def keys(self) -> Iterator[int]:
        return iter(self._res)

    def _advance(self, key: int) -> int:
        t = self._t
        if t >= len(self._future) or self._future[t] != key:
            raise ValueError(
                f"belady: access {t} is key {key}, but set_future() said "
                f"{self._future[t] if t < len(self._future) else 'end of stream'}")
        self._t = t + 1
        return self._next[t]

    def _push(self, key: int, nu: int) -> None:
        self._res[key] = nu
        heap = self._heap
        heapq.heappush(heap, (-nu, key))
        if len(heap) > 4 * len(self._res) + 1024:
            self._heap = [(-v, k) for k, v in self._res.items()]
            heapq.heapify(self._heap)

    def _pop_farthest(self) -> tuple[int, int]:
        heap, res = self._heap, self._res
        while True:
            nnu, k = heapq.heappop(heap)
            if res.get(k) == -nnu:
                return k, -nnu

    def touch(self, key: int) -> None:
        self._push(key, self._advance(key))

    def insert(self, key: int) -> list[int]:
        nu = self._advance(key)
        if key in self._res:
            self._push(key, nu)
            return []
        if self.capacity == 0:
            return [key]
        victims = []
        while len(self._res) >= self.capacity:
            k, knu = self._pop_farthest()
            if self.bypass and knu < nu:
                heapq.heappush(self._heap, (-knu, k))
                return [key]
            del self._res[k]
            victims.append(k)
        self._push(key, nu)
        return victims

    def remove(self, key: int) -> bool:
        return self._res.pop(key, None) is not None

    def access_many(self, keys: Iterable[int]) -> int:
        if isinstance(keys, np.ndarray):
            t = self._t
            n = keys.shape[0]
            ref = self._future_arr[t:t + n]
            if ref.shape[0] != n or not np.array_equal(ref, keys):
                raise ValueError("belady: accesses do not follow the stream given to set_future()")
            keys = keys.tolist()
        else:
            keys = list(keys)
            if self._future[self._t:self._t + len(keys)] != keys:
                raise ValueError("belady: accesses do not follow the stream given to set_future()")
        if self.capacity == 0:
            self._t += len(keys)
            return 0
        res = self._res
        nxt = self._next
        push = heapq.heappush
        pop = heapq.heappop
        cap = self.capacity
        bypass = self.bypass
        t = self._t
        hits = 0
        heap = self._heap
        for k in keys:
            nu = nxt[t]
            t += 1
            if k in res:
                hits += 1
            elif len(res) >= cap:
                while True:
                    nnu, v = pop(heap)
                    if res.get(v) == -nnu:
                        break
                if bypass and -nnu < nu:
                    push(heap, (nnu, v))
                    continue
                del res[v]
            res[k] = nu
            push(heap, (-nu, k))
            if len(heap) > 4 * cap + 1024:
                heap = [(-x, y) for y, x in res.items()]
                heapq.heapify(heap)
        self._heap = heap
        self._t = t
        return hits


class BeladyBypassPolicy(BeladyPolicy):
    """OPT that may decline to admit a block whose next use is farthest (``bypass=True``)."""

    name = "belady_bypass"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, bypass=True)
