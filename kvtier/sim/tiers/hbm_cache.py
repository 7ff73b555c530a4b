"""HBM as a cache of blocks driven by the demand stream, and its eviction policy's plumbing.

A selected block resident in HBM is a hit (the policy sees ``touch``); a miss is inserted
(``insert``, whose victims leave HBM: the caller decides where they go). Context-aware
policies get ``begin_record`` before each row; LRU and FIFO run on their dict
(``kvtier.sim.tiers.fast_path``). With sub-block reads (``fetch_granularity``) HBM also keeps,
per resident block, the mask of the sub-blocks it holds: a resident block missing a touched
sub-block is a miss for those sub-blocks only.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np

from kvtier.sim.tiers.fast_path import consume, dict_access, fast_dict
from kvtier.sim.tiers.tier import Tier


def row_masks(pos: np.ndarray, granularity: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(block ids, touched sub-block mask per block) for one row's sorted positions."""
    sub = np.unique(pos // granularity)
    blocks = (sub * granularity) // block_size
    bits = np.left_shift(np.int64(1), sub % (block_size // granularity)).astype(np.uint64)
    starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
    return blocks[starts], np.bitwise_or.reduceat(bits, starts)


class HBMCache:
    """The ``hbm`` tier's resident set (``tier.policy``) under demand reads."""

    def __init__(self, tier: Tier, block_size: int, granularity: int | None) -> None:
        self.tier = tier
        self.policy = tier.policy
        self.bs = block_size
        self.g = granularity
        self.fast = fast_dict(self.policy)
        #: a context-aware policy gets ``begin_record`` before each row (the caller's loop)
        self.needs_ctx = bool(getattr(self.policy, "needs_context", False))
        #: sub-block masks of resident keys (granularity only; absent = the whole block)
        self.have: dict[int, int] = {}
        self.full_mask = (1 << (block_size // granularity)) - 1 if granularity else 1

    def __contains__(self, key: int) -> bool:
        return key in self.policy

    def __len__(self) -> int:
        return len(self.policy)

    def access(self, keys: list[int]) -> tuple[list[int], list[int]]:
        """Demand accesses of one row to HBM in order: (misses, victims). LRU and FIFO run
        on their OrderedDict directly (same semantics as ``access``, without method calls)."""
        fast = self.fast
        if fast is not None:
            d = fast[0]
            done = dict_access(d, fast[1], fast[2], keys)
            if len(d) > self.tier.peak:
                self.tier.peak = len(d)
            return done
        miss: list[int] = []
        victims: list[int] = []
        hbm = self.policy
        for k in keys:
            if k in hbm:
                hbm.touch(k)
            else:
                miss.append(k)
                v = hbm.insert(k)
                if v:
                    victims.extend(x for x in v if x != k)
        return miss, victims

    def access_masked(self, keys: list[int], masks: list[int], sub: np.ndarray
                      ) -> tuple[list[int], list[int], list[int]]:
        """Sub-block granularity: a resident block missing some touched sub-blocks is read
        (those sub-blocks only) from the pools; returns (misses, victims, missing counts).
        ``sub[0]`` counts the sub-blocks HBM itself served."""
        hbm = self.policy
        have = self.have
        full = self.full_mask
        miss: list[int] = []
        missing: list[int] = []
        victims: list[int] = []
        for k, need in zip(keys, masks, strict=True):
            if k in hbm:
                hbm.touch(k)
                h = have.get(k, full)
                lack = need & ~h
                if not lack:
                    sub[0] += need.bit_count()
                    continue
                have[k] = h | need
            else:
                lack = need
                v = hbm.insert(k)
                if v:
                    victims.extend(x for x in v if x != k)
                if k in hbm:
                    have[k] = need
            miss.append(k)
            missing.append(lack.bit_count())
        return miss, victims, missing

    def insert(self, key: int) -> list[int]:
        """Make ``key`` resident outside a demand read (write-back); returns the victims."""
        victims = self.policy.insert(key)
        n = len(self.policy)
        if n > self.tier.peak:
            self.tier.peak = n
        return victims

    def note_size(self) -> None:
        """Record the resident set's size for ``peak_blocks`` (after a batch of rows)."""
        n = len(self.policy)
        if n > self.tier.peak:
            self.tier.peak = n

    def remove(self, keys: list[int]) -> None:
        """Drop ``keys`` (a released request's blocks), with their sub-block masks."""
        if self.fast is not None:  # C-level removal on LRU/FIFO dicts, else the policy's
            consume(map(self.fast[0].pop, keys, repeat(None)))
        else:
            consume(map(self.policy.remove, keys))
        if self.have:
            consume(map(self.have.pop, keys, repeat(None)))
