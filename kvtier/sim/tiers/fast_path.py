"""The emulator's speed trick: LRU and FIFO resident sets driven on their ``OrderedDict``.

``LRUPolicy`` and ``FIFOPolicy`` (exactly those classes, ``kvtier.policies.odict``) keep their
resident set in one ``OrderedDict`` whose first key is the next victim. For them the HBM cache
and the pools skip the policy's methods and run each row of keys as C-level ``map`` calls on
that dict (an all-miss row: one ``__setitem__`` and one ``popitem`` per block; an all-hit LRU
row: one ``move_to_end`` per block), which is what lets the emulator serve over 1 M block
accesses/s on one core (docs/BENCHMARKS.md). Every function here gives exactly what the
policy's per-key ``touch`` / ``insert`` loop gives: tests/test_tiered_backend.py
(``test_dict_batch_equals_the_per_key_loop``, and ``test_generic_policy_path_matches_fast_path``,
where a subclass of LRU takes the method-call path).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import compress, islice, repeat
from operator import itemgetter, not_

from kvtier.policies.base import EvictionPolicy

_first = itemgetter(0)


def consume(it) -> None:
    """Run an iterator of C calls to exhaustion without a Python-level loop."""
    deque(it, maxlen=0)


def fast_dict(policy: EvictionPolicy) -> tuple[OrderedDict, bool, int] | None:
    """(OrderedDict, refresh on hit, capacity) for exactly LRUPolicy / FIFOPolicy, whose
    resident set is that dict; the hot loop then runs without method calls. (Subclasses
    may override methods, so they take the generic path.)"""
    from kvtier.policies.fifo import FIFOPolicy
    from kvtier.policies.lru import LRUPolicy

    d = getattr(policy, "_d", None)
    if type(policy) in (LRUPolicy, FIFOPolicy) and d is not None:
        return d, type(policy).refresh, policy.capacity
    return None


def dict_batch(d, refresh: bool, cap: int, keys: list[int]) -> tuple[list[int], list[int]] | None:
    """Access unique ``keys`` in order on an LRU (``refresh``) or FIFO OrderedDict of
    ``cap`` entries with C-level calls: (misses, victims in eviction order), exactly what the
    per-key loop gives, or None (nothing changed) when a key of the batch is among the
    residents its own misses evict, where only the per-key loop is exact.

    Why it is exact otherwise: the per-key loop evicts, for each miss beyond the free room,
    the oldest entry; if none of the batch's resident keys is among the ``excess`` oldest
    residents (and the batch's own misses are not: ``excess`` <= residents), those victims are
    exactly the ``excess`` oldest residents in order, and hits (LRU) / inserts end at the new
    end in batch order."""
    present = list(map(d.__contains__, keys))
    n_miss = present.count(False)
    n_hit = len(keys) - n_miss
    excess = len(d) + n_miss - cap
    if excess > len(d):
        return None  # the batch's own misses would be evicted
    if n_hit == 0:  # all miss (the common case at low hit ratios): no order checks needed
        consume(map(d.__setitem__, keys, repeat(None)))
        victims = list(map(_first, map(d.popitem, repeat(False, excess)))) if excess > 0 else []
        return list(keys), victims
    oldest = list(islice(d, excess)) if excess > 0 else []
    if oldest and not set(compress(keys, present)).isdisjoint(oldest):
        return None  # only resident keys of the batch can be among the oldest
    miss = list(compress(keys, map(not_, present))) if n_miss else []
    if n_miss:
        consume(map(d.__setitem__, miss, repeat(None)))
    if refresh:  # every key ends at the MRU end, in batch order
        consume(map(d.move_to_end, keys))
    if oldest:  # still the oldest entries: pop them from the front
        consume(map(d.popitem, repeat(False, excess)))
    return miss, oldest


def dict_access(d, refresh: bool, cap: int, keys: list[int]) -> tuple[list[int], list[int]]:
    """Demand accesses of one row of keys, in order, on an LRU or FIFO OrderedDict:
    (misses, victims), as the per-key ``touch`` / ``insert`` loop."""
    if cap == 0:
        return list(keys), []
    if refresh:
        # LRU, hits first: move keys to the MRU end until the first miss (one dict op
        # per hit instead of a lookup and a move; a mostly-hit row costs half). The
        # hits moved are exactly what the per-key loop does before that miss, so the
        # rest of the row continues from the same state.
        it = iter(keys)
        try:
            consume(map(d.move_to_end, it))
            return [], []
        except KeyError as exc:
            keys = [exc.args[0], *it]
    done = dict_batch(d, refresh, cap, keys)
    if done is not None:
        return done
    miss: list[int] = []
    victims: list[int] = []
    pop = d.popitem
    if refresh:
        move = d.move_to_end
        for k in keys:
            if k in d:
                move(k)
            else:
                d[k] = None
                miss.append(k)
                if len(d) > cap:
                    victims.append(pop(False)[0])
    else:
        for k in keys:
            if k not in d:
                d[k] = None
                miss.append(k)
                if len(d) > cap:
                    victims.append(pop(False)[0])
    return miss, victims
