"""Reference caches for tests: as simple as possible (lists, sets, linear scans), so the fast
policies, the single-tier simulator and the tiered emulator are checked against code that is
obviously right. Each returns the number of hits over ``keys`` with capacity ``cap``."""

from __future__ import annotations


def ref_lru(keys: list[int], cap: int) -> int:
    cache: list[int] = []
    hits = 0
    for k in keys:
        if k in cache:
            hits += 1
            cache.remove(k)
        elif cache and len(cache) == cap:
            cache.pop(0)
        if cap:
            cache.append(k)
    return hits


def ref_fifo(keys: list[int], cap: int) -> int:
    cache: list[int] = []
    hits = 0
    for k in keys:
        if k in cache:
            hits += 1
            continue
        if cap == 0:
            continue
        if len(cache) == cap:
            cache.pop(0)
        cache.append(k)
    return hits


def ref_opt(keys: list[int], cap: int, bypass: bool = False) -> int:
    def next_use(k: int, i: int) -> int:
        for j in range(i + 1, len(keys)):
            if keys[j] == k:
                return j
        return len(keys) + 1

    cache: set[int] = set()
    hits = 0
    for i, k in enumerate(keys):
        if k in cache:
            hits += 1
            continue
        if cap == 0:
            continue
        if len(cache) == cap:
            pool = cache | {k} if bypass else cache
            far = max(pool, key=lambda x: next_use(x, i))
            if far == k:
                continue
            cache.remove(far)
        cache.add(k)
    return hits
