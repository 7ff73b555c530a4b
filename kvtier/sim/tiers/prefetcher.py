"""Prefetch: the prefetch policy's predicted blocks brought into HBM ahead of their read.

After every (step, layer) the policy (``policies/prefetch.py``) is asked which keys the next
access will want; each one some pool holds is inserted into HBM at once and read from that
pool in the background (one batch per pool), overlapping the layer's compute. A demand read
of a block still in flight waits for its transfer. ``useful`` counts prefetched blocks read
before eviction, ``wasted`` those evicted unread.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat
from typing import Any

import numpy as np

from kvtier.policies.base import AccessContext
from kvtier.sim.tiers.backing_store import BackingStore
from kvtier.sim.tiers.cost import batch_time_us
from kvtier.sim.tiers.fast_path import consume
from kvtier.sim.tiers.hbm_cache import HBMCache
from kvtier.sim.tiers.tier import Tier
from kvtier.sim.tiers.timing import LinkClock


class Prefetcher:
    """Runs a prefetch policy against HBM and the pools; ``evict`` handles HBM's victims."""

    def __init__(self, policy: Any, hbm: HBMCache, store: BackingStore, clock: LinkClock,
                 block_bytes: int, evict: Callable[[list[int]], None]) -> None:
        self.policy = policy
        self.on = policy.name != "none"
        self.hbm, self.store, self.clock = hbm, store, clock
        self.block_bytes = block_bytes
        self.evict = evict
        self.pending: dict[int, Any] = {}  # key -> its transfer (a simpy process) in flight
        self.prefetched: set[int] = set()  # prefetched and not yet read or evicted
        self.useful = self.wasted = 0

    def demand_hits(self, keys: list[int], miss: list[int]) -> list:
        """Demand hits on prefetched blocks: count them; returns the in-flight transfers the
        read must wait for."""
        waits = []
        missed = set(miss)
        for k in keys:
            if k in missed:
                continue
            ev = self.pending.pop(k, None)
            if ev is not None:
                waits.append(ev)
            if k in self.prefetched:
                self.prefetched.discard(k)
                self.useful += 1
        return waits

    def evicted(self, victims: list[int]) -> None:
        """Blocks that left HBM: prefetched ones were wasted."""
        for v in victims:
            if v in self.prefetched:
                self.prefetched.discard(v)
                self.wasted += 1
            self.pending.pop(v, None)

    def forget(self, keys: list[int]) -> None:
        """A released request's blocks."""
        if self.prefetched:
            consume(map(self.prefetched.discard, keys))
        if self.pending:
            consume(map(self.pending.pop, keys, repeat(None)))

    def after_read(self, ctx: AccessContext, selected: np.ndarray) -> None:
        """Ask the policy after a (step, layer) read ``selected``, and issue its prediction."""
        self.issue(self.policy.plan(ctx, selected))

    def issue(self, keys: np.ndarray | None) -> None:
        """Move predicted keys into HBM in the background, one batch per source tier."""
        if keys is None or len(keys) == 0 or not self.store.pools:
            return
        hbm = self.hbm.policy  # (not HBMCache.insert: a prefetch does not update peak_blocks)
        by_tier: dict[Tier, list[int]] = {}
        for k in np.unique(np.asarray(keys, dtype=np.int64)).tolist():
            if k in hbm:
                continue
            home = self.store.home(k)
            if home is None:
                continue
            victims = hbm.insert(k)
            if victims:
                if k in victims:
                    victims = [v for v in victims if v != k]
                    if victims:
                        self.evict(victims)
                    continue
                self.evict(victims)
            by_tier.setdefault(home, []).append(k)
        for t, ks in by_tier.items():
            nbytes = len(ks) * self.block_bytes
            ops = len(ks) * t.ops_per_block
            t.prefetch_blocks += len(ks)
            t.prefetch_bytes += nbytes
            proc = self.clock.background(t.read, float(batch_time_us(t.spec, ops, nbytes, read=True)))
            for k in ks:
                self.pending[k] = proc
                self.prefetched.add(k)
                if self.hbm.g:
                    self.hbm.have[k] = self.hbm.full_mask
