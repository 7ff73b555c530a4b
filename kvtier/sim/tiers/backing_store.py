"""The pool tiers (``local_pool``, ``remote_pool``): the backing store behind HBM.

Blocks are written to the tiers the placement policy picks (prompt KV at admit, decoded
tokens, blocks leaving HBM that no pool holds); a pool's victims go to the next pool down
(``demote_target``) or are dropped. An HBM miss is served by the nearest pool holding the
block, which sees the read as an access (``touch``). Migration moves blocks between pools.
Every write and move is queued on the ``LinkClock`` and issued with the next fetch.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import compress, repeat
from operator import not_
from typing import Any

from kvtier.schema import TIER_NAMES
from kvtier.sim.tiers.config import POOL_TIERS
from kvtier.sim.tiers.fast_path import consume, dict_batch, fast_dict
from kvtier.sim.tiers.tier import Tier
from kvtier.sim.tiers.timing import LinkClock

UNSERVED = 3  # index of "no tier held it" in the counts of ``lookup``


class BackingStore:
    """The pools of ``tiers`` (every tier by name, HBM included), nearest first."""

    def __init__(self, tiers: dict[str, Tier], placement: Any, clock: LinkClock, block_bytes: int,
                 lost_possible: bool) -> None:
        self.tiers = tiers
        self.pools = [tiers[t] for t in POOL_TIERS if t in tiers]
        self.names = [t.name for t in self.pools]
        self.placement = placement
        if hasattr(placement, "bind"):
            placement.bind({t.name: t.capacity for t in self.pools})
        self.clock = clock
        self.block_bytes = block_bytes
        #: False while every HBM-resident block provably has a pool copy (nothing was unserved
        #: or dropped by a pool, no write-back): HBM victims then need no pool lookups
        self.lost_possible = lost_possible
        fast = {t.name: fast_dict(t.policy) for t in self.pools}
        self.fast = {k: v for k, v in fast.items() if v is not None}
        #: per pool: (membership test, read access or None when reads do not reorder: FIFO)
        self.ops: dict[str, tuple] = {}
        for t in self.pools:
            f = fast[t.name]
            if f is not None:
                self.ops[t.name] = (f[0].__contains__, f[0].move_to_end if f[1] else None)
            else:
                self.ops[t.name] = (t.policy.__contains__, t.policy.touch)

    def home(self, key: int) -> Tier | None:
        """The nearest pool holding ``key``."""
        for t in self.pools:
            if self.ops[t.name][0](key):
                return t
        return None

    def missing(self, keys: list[int]) -> list[int]:
        """The keys no pool holds."""
        for t in self.pools:
            has = self.ops[t.name][0]
            keys = list(compress(keys, map(not_, map(has, keys))))
        return keys

    def store(self, keys: list[int], nbytes: list[int]) -> None:
        """Write blocks to the pool tiers the placement policy picks (``place_many`` when the
        policy has it: one decision list for the whole batch, same result as per-key calls)."""
        if not self.pools:
            return
        names = self.names
        many = getattr(self.placement, "place_many", None)
        free = {t.name: t.capacity - len(t.policy) for t in self.pools}
        plans = many(len(keys), names, free) if many is not None else None
        # (a full nearest tier that evicts keeps zero room, so later blocks still go there)
        if plans is not None:
            start = 0
            while start < len(keys):  # runs of blocks with the same single target
                target = plans[start]
                end = start + 1
                while end < len(keys) and plans[end] is target:
                    end += 1
                tier = self.tiers[target[0]]
                self.insert_many(tier, keys[start:end])
                self.clock.queue_write(tier, sum(nbytes[start:end]), end - start)
                start = end
            return
        written: dict[str, list[int]] = {}
        for k, nb in zip(keys, nbytes, strict=True):
            free = {t.name: t.capacity - len(t.policy) for t in self.pools}
            for tname in self.placement.place(k, names, free):
                self.insert(self.tiers[tname], k)
                w = written.setdefault(tname, [0, 0])
                w[0] += nb
                w[1] += 1
        for tname, (nb, ops) in written.items():
            self.clock.queue_write(self.tiers[tname], nb, ops)

    def insert_many(self, tier: Tier, keys: list[int]) -> None:
        """``insert`` for unique keys in order (C-level for LRU/FIFO pools)."""
        fast = self.fast.get(tier.name)
        if fast is None or fast[2] == 0 or len(set(keys)) != len(keys):
            for k in keys:
                self.insert(tier, k)
            return
        d, refresh, cap = fast
        done = dict_batch(d, refresh, cap, keys)
        if done is None:
            for k in keys:
                self.insert(tier, k)
            return
        if len(d) > tier.peak:
            tier.peak = len(d)
        victims = done[1]
        if victims:
            self._victims(tier, victims)

    def insert(self, tier: Tier, key: int) -> None:
        """Make ``key`` resident in ``tier``; its victims are demoted or dropped."""
        fast = self.fast.get(tier.name)
        if fast is not None:
            d, refresh, cap = fast
            if key in d:
                if refresh:
                    d.move_to_end(key)
                return
            if cap == 0:
                victims = [key]
            else:
                d[key] = None
                victims = [d.popitem(False)[0]] if len(d) > cap else None
                if len(d) > tier.peak:
                    tier.peak = len(d)
        else:
            victims = tier.policy.insert(key)
            n = len(tier.policy)
            if n > tier.peak:
                tier.peak = n
        if victims:
            self._victims(tier, victims)

    def _victims(self, tier: Tier, victims: list[int]) -> None:
        """A pool's victims go to the next pool down (placement's ``demote_target``) or are
        dropped."""
        tier.evictions += len(victims)
        demote = getattr(self.placement, "demote_target", None)
        target = demote(tier.name, self.names) if demote else None
        for v in victims:
            if target is None or v in self.tiers[target].policy:
                if target is None:
                    tier.dropped += 1
                    self.lost_possible = True
                continue
            dst = self.tiers[target]
            dst.demoted_in += 1
            self.insert(dst, v)
            self.clock.queue_write(dst, self.block_bytes, 1)

    def lookup(self, miss: list[int], served: list[list[int]] | None,
               weights: list[int] | None = None) -> tuple[list[int], list[int], tuple]:
        """Blocks (and sub-block weights) each pool tier served for these HBM misses, nearest
        first; the serving pool sees each as an access (touch). Index ``UNSERVED`` = no pool
        held it. Also the keys (in ``miss`` order) the local and the remote pool served, and,
        unless ``served`` is None, those keys appended to ``served[tier index]``."""
        counts = [0, 0, 0, 0]
        wsum = [0, 0, 0, 0]
        by_tier: list = [None, [], []]
        todo, w = miss, weights
        for t in self.pools:
            if not todo:
                break
            tier_no = TIER_NAMES.index(t.name)
            has, touch = self.ops[t.name]
            found = list(map(has, todo))
            n = found.count(True)
            if not n:
                continue
            got = todo if n == len(todo) else list(compress(todo, found))
            by_tier[tier_no] = got
            if touch is not None:
                consume(map(touch, got))
            if served is not None:
                served[tier_no].extend(got)
            counts[tier_no] = n
            if w is not None:
                wsum[tier_no] = sum(compress(w, found))
                w = list(compress(w, map(not_, found)))
            todo = [] if n == len(todo) else list(compress(todo, map(not_, found)))
        counts[UNSERVED] = len(todo)
        if w is not None:
            wsum[UNSERVED] = sum(w)
        return counts, wsum, (by_tier[1], by_tier[2])

    def migrate(self, moves: Iterable[tuple[int, str, str]]) -> int:
        """Apply a migration policy's ``(key, src, dst)`` moves (skipping ones that do not
        apply) as background transfers; returns how many moved."""
        moved = 0
        for key, src, dst in moves:
            s, d = self.tiers.get(src), self.tiers.get(dst)
            if s is None or d is None or s is d or key not in s.policy:
                continue
            s.policy.remove(key)
            if key not in d.policy:
                self.insert(d, key)
            d.migrated_in += 1
            d.migration_bytes += self.block_bytes
            moved += 1
            self.clock.queue_move(s, True, self.block_bytes)
            self.clock.queue_move(d, False, self.block_bytes)
        return moved

    def remove(self, keys: list[int]) -> None:
        """Drop ``keys`` from every pool (C-level on LRU/FIFO dicts, else the policy's)."""
        for t in self.pools:
            fast = self.fast.get(t.name)
            if fast is not None:
                consume(map(fast[0].pop, keys, repeat(None)))
            else:
                consume(map(t.policy.remove, keys))
