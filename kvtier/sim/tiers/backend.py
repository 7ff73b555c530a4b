"""``TieredBackend`` (``--backend sim``): DSA's sparse KV reads against HBM + pools, in simpy
virtual time.

Model (docs/TIERS.md has the full version):

- HBM is a cache of blocks (``(request, layer, block)`` keys) driven by the demand stream: a
  selected block resident in HBM is a hit; a miss is read from the nearest pool tier holding
  it and becomes resident (the HBM eviction policy picks victims). With no pool holding it the
  block is ``unserved`` (dropped everywhere) and is refilled into HBM uncosted, then read
  there: the record lists it under ``hbm`` (so the tiers' ``hit_blocks`` partition the row's
  blocks, and its bytes are HBM bytes), while the summary keeps ``tiers.hbm.hit_blocks`` for
  resident hits and counts it in ``tiers.hbm.refilled_blocks`` (= ``_totals.unserved_blocks``).
- Pools are the backing store: prompt KV is written at ``admit`` and decoded tokens at
  ``append`` (write-through) or when a dirty HBM block is evicted (write-back), to the tiers
  the placement policy picks; a pool's victims are demoted to the next pool or dropped.
- Every (step, layer) issues at most one batch_get per tier. Its time is
  ``base + hops*per_hop + ceil(ops/max_batch)*per_op + bytes/bw`` plus the queueing on the
  tier's link (a simpy Resource shared by every tier, write, prefetch and migration on it).
- Virtual time: a layer's fetch is issued when the previous layer's fetch and compute
  (``layer_compute_us``, else the recorded step wall time / layers) are done; prefetches are
  issued right after a fetch and overlap that compute; writes and migrations run in the
  background on their links.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from itertools import compress, islice, repeat
from operator import itemgetter, not_

import msgspec
import numpy as np
import simpy

from kvtier.backend import LayerAccess
from kvtier.policies.base import _BLOCK_MASK, AccessContext, EvictionPolicy
from kvtier.schema import PERCENTILE_METHOD, TIER_NAMES, KVFetch, TierFetch, empty_tier
from kvtier.sim.tiers.config import POOL_TIERS, ConfigError, TierConfig, TierSpec, _check
from kvtier.sim.tiers.cost import batch_time_us, read_ops
from kvtier.sim.tiers.keyspace import KeySpace
from kvtier.sim.tiers.recompute import ModelDims, fetch_vs_recompute
from kvtier.sim.tiers.specs import eviction_factory, make_migration, make_placement, make_prefetch

_UNSERVED = 3
_first = itemgetter(0)


def _consume(it) -> None:
    """Run an iterator of C calls to exhaustion without a Python-level loop."""
    deque(it, maxlen=0)


def _dict_batch(d, refresh: bool, cap: int, keys: list[int]) -> tuple[list[int], list[int]] | None:
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
        _consume(map(d.__setitem__, keys, repeat(None)))
        victims = list(map(_first, map(d.popitem, repeat(False, excess)))) if excess > 0 else []
        return list(keys), victims
    oldest = list(islice(d, excess)) if excess > 0 else []
    if oldest and not set(compress(keys, present)).isdisjoint(oldest):
        return None  # only resident keys of the batch can be among the oldest
    miss = list(compress(keys, map(not_, present))) if n_miss else []
    if n_miss:
        _consume(map(d.__setitem__, miss, repeat(None)))
    if refresh:  # every key ends at the MRU end, in batch order
        _consume(map(d.move_to_end, keys))
    if oldest:  # still the oldest entries: pop them from the front
        _consume(map(d.popitem, repeat(False, excess)))
    return miss, oldest


def _pcts(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99], method=PERCENTILE_METHOD)
    return {"count": int(a.size), "p50": float(p50), "p95": float(p95), "p99": float(p99),
            "max": float(a.max())}


class _Tier:
    """One tier's spec, resident set and counters."""

    def __init__(self, name: str, spec: TierSpec, capacity: int, policy: EvictionPolicy,
                 read: simpy.Resource, write: simpy.Resource, block_bytes: int) -> None:
        self.name, self.spec, self.capacity, self.policy = name, spec, capacity, policy
        self.read, self.write = read, write
        self.ops_per_block = int(read_ops(spec, 1, block_bytes))
        self.hits = self.bytes = self.ops = 0
        self.refilled = 0  # hbm: blocks no tier held, refilled uncosted and then read
        self.latencies: list[float] = []
        self.evictions = self.dropped = self.demoted_in = 0
        self.write_bytes = self.write_ops = 0
        self.prefetch_blocks = self.prefetch_bytes = 0
        self.migrated_in = self.migration_bytes = 0
        self.peak = 0

    def stats(self) -> dict:
        return {
            "capacity_blocks": self.capacity,
            "hit_blocks": self.hits,
            "refilled_blocks": self.refilled,
            "bytes_read": self.bytes,
            "read_ops": self.ops,
            "latency_us": _pcts(self.latencies),
            "evictions": self.evictions,
            "dropped": self.dropped,
            "demoted_in": self.demoted_in,
            "write_bytes": self.write_bytes,
            "write_ops": self.write_ops,
            "prefetch_blocks": self.prefetch_blocks,
            "prefetch_bytes": self.prefetch_bytes,
            "migrated_in": self.migrated_in,
            "migration_bytes": self.migration_bytes,
            "peak_blocks": self.peak,
        }


class TieredBackend:
    """KVBackend over HBM + local pool + remote pool, timed by simpy (see module doc)."""

    name = "sim"

    def __init__(
        self,
        config: TierConfig,
        *,
        num_layers: int,
        block_size: int | None = None,
        eviction: str | Callable[[int], EvictionPolicy] = "lru",
        pool_eviction: str | Callable[[int], EvictionPolicy] = "lru",
        placement: str = "local_first",
        prefetch: str = "none",
        migration: str = "none",
        model: ModelDims | None = None,
        future_keys: np.ndarray | None = None,
    ) -> None:
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        if block_size is not None and block_size != config.block_size:
            config = _check(msgspec.structs.replace(config, block_size=block_size), "block_size")
        self.cfg = config
        self.num_layers = int(num_layers)
        self.bs = config.block_size
        self.kvb = config.kv_bytes_per_token
        self.block_bytes = self.bs * self.kvb
        self.g = config.fetch_granularity if config.fetch_granularity != self.bs else None
        self.model = model or ModelDims()
        self.env = simpy.Environment()
        self.specs = {"eviction": str(eviction), "pool_eviction": str(pool_eviction),
                      "placement": placement, "prefetch": prefetch, "migration": migration}

        links: dict[str, tuple[simpy.Resource, simpy.Resource]] = {}
        for lname, ls in config.links.items():
            r = simpy.Resource(self.env, capacity=ls.channels)
            links[lname] = (r, simpy.Resource(self.env, capacity=ls.channels) if ls.duplex else r)
        hbm_factory = eviction if callable(eviction) else eviction_factory(eviction)
        pool_factory = pool_eviction if callable(pool_eviction) else eviction_factory(pool_eviction)
        self.tiers: dict[str, _Tier] = {}
        for tname, spec in config.tiers().items():
            cap = spec.total_capacity_bytes // self.block_bytes
            pol = (hbm_factory if tname == "hbm" else pool_factory)(cap)
            if tname != "hbm" and getattr(pol, "offline", False):
                raise ConfigError(f"pool_eviction {pool_eviction!r}: offline policies only fit the hbm tier")
            r, w = links[spec.link]
            self.tiers[tname] = _Tier(tname, spec, cap, pol, r, w, self.block_bytes)
        self.hbm = self.tiers["hbm"]
        self.pools = [self.tiers[t] for t in POOL_TIERS if t in self.tiers]
        self.pool_names = [t.name for t in self.pools]
        self._fast_hbm = self._fast(self.hbm.policy)
        self._pool_ops = {}
        self._fast_pool = {t.name: self._fast(t.policy) for t in self.pools}
        self._fast_pool = {k: v for k, v in self._fast_pool.items() if v is not None}
        for t in self.pools:
            f = self._fast(t.policy)
            if f is not None and f[1]:
                self._pool_ops[t.name] = (f[0].__contains__, f[0].move_to_end)
            elif f is not None:
                self._pool_ops[t.name] = (f[0].__contains__, None)  # FIFO: hits do not move
            else:
                self._pool_ops[t.name] = (t.policy.__contains__, t.policy.touch)

        self.placement = make_placement(placement)
        if hasattr(self.placement, "bind"):
            self.placement.bind({t.name: t.capacity for t in self.pools})
        self.prefetch = make_prefetch(prefetch)
        if hasattr(self.prefetch, "bind"):
            self.prefetch.bind(self.num_layers)
        self.migration = make_migration(migration)
        self._prefetch_on = self.prefetch.name != "none"
        self._observe = getattr(self.migration, "observe", None)
        if self.migration.name == "none":
            self._observe = None
        if getattr(self.hbm.policy, "offline", False):
            if future_keys is None:
                raise ConfigError(f"eviction {eviction!r} is offline: it needs the future key "
                                  "stream (kvtier replay passes it)")
            if self._prefetch_on:
                raise ConfigError(f"eviction {eviction!r} is offline and cannot see prefetches: "
                                  "use --prefetch none")
            if config.write_policy == "write_back":
                raise ConfigError(f"eviction {eviction!r} is offline and cannot see write-back "
                                  "inserts: use write_policy = 'write_through'")
            self.hbm.policy.set_future(np.asarray(future_keys, dtype=np.int64))
        self._needs_ctx = bool(getattr(self.hbm.policy, "needs_context", False))

        self.keyspace = KeySpace()
        self.length: dict[int, int] = {}  # tokens whose KV is written
        self.target: dict[int, int] = {}  # prompt + appended tokens
        self.prompt_lens: dict[int, int] = {}
        self.released: set[int] = set()
        self.dirty: set[int] = set()
        # False while every HBM-resident block provably has a pool copy (nothing was unserved
        # or dropped by a pool, no write-back): HBM victims then need no pool lookups
        self._lost_possible = config.write_policy == "write_back"
        self.have: dict[int, int] = {}  # sub-block masks of HBM-resident keys (granularity)
        self.full_mask = (1 << (self.bs // self.g)) - 1 if self.g else 1
        self.pending: dict[int, simpy.Event] = {}
        self.prefetched: set[int] = set()
        self._writes: dict[str, list[int]] = {}  # tier -> [bytes, ops] waiting to be issued
        self._moves: dict[tuple[str, bool], list[int]] = {}
        self.step: int | None = None
        self.accesses = self.unserved = 0
        self.prefetch_useful = self.prefetch_wasted = 0
        self.migrated = 0
        self.stall_total = 0.0
        self.stalls: list[float] = []
        self.stall_step: dict[int, float] = {}
        self.stall_layer: dict[int, float] = {}

    @staticmethod
    def _fast(policy: EvictionPolicy) -> tuple | None:
        """(OrderedDict, refresh on hit, capacity) for exactly LRUPolicy / FIFOPolicy, whose
        resident set is that dict; the hot loop then runs without method calls. (Subclasses
        may override methods, so they take the generic path.)"""
        from kvtier.policies.fifo import FIFOPolicy
        from kvtier.policies.lru import LRUPolicy

        d = getattr(policy, "_d", None)
        if type(policy) in (LRUPolicy, FIFOPolicy) and d is not None:
            return d, type(policy).refresh, policy.capacity
        return None

    # ------------------------------------------------------------------ lifecycle

    def _idx(self, request_id: int) -> int:
        try:
            idx = self.keyspace.index[request_id]
        except KeyError:
            raise KeyError(f"request {request_id!r} was not admitted") from None
        if idx in self.released:
            raise KeyError(f"request {request_id!r} was already released")
        return idx

    def admit(self, request_id: int, prompt_len: int, prefix_hashes: Sequence[int] = ()) -> None:
        """Register the request and write its prompt KV (all layers) to the pools."""
        if prompt_len < 0:
            raise ValueError(f"prompt_len must be >= 0, got {prompt_len}")
        idx, shared = self.keyspace.admit(request_id, prefix_hashes)
        self.length[idx] = int(prompt_len)
        self.target[idx] = int(prompt_len)
        self.prompt_lens[request_id] = int(prompt_len)
        n_blocks = -(-prompt_len // self.bs)
        blocks = np.arange(shared, n_blocks, dtype=np.int64)
        if blocks.size == 0:
            return
        tokens = np.minimum(self.bs, prompt_len - blocks * self.bs)
        for layer in range(self.num_layers):
            keys = self.keyspace.keys(idx, layer, blocks)
            self._store(keys.tolist(), (tokens * self.kvb).tolist())

    def append(self, request_id: int, n_tokens: int = 1) -> None:
        """Decoded tokens: write-through stores them in the pools now; write-back marks their
        HBM blocks dirty (written when evicted). Tokens a ``fetch`` already selected were
        written then, so calling ``append`` after the step's fetches does not write twice."""
        if n_tokens <= 0:
            return
        idx = self._idx(request_id)
        self.target[idx] += n_tokens
        if self.target[idx] > self.length[idx]:
            self._extend(idx, self.target[idx])

    def _extend(self, idx: int, new: int) -> None:
        old = self.length[idx]
        self.length[idx] = new
        first, last = old // self.bs, (new - 1) // self.bs
        blocks = np.arange(first, last + 1, dtype=np.int64)
        lo = np.maximum(blocks * self.bs, old)
        hi = np.minimum((blocks + 1) * self.bs, new)
        nbytes = ((hi - lo) * self.kvb).tolist()
        fresh = (blocks * self.bs >= old).tolist()
        wb = self.cfg.write_policy == "write_back"
        hbm = self.hbm.policy
        for layer in range(self.num_layers):
            keys = self.keyspace.keys(idx, layer, blocks).tolist()
            for k, nb, is_new, b_lo, b_hi in zip(keys, nbytes, fresh, lo.tolist(), hi.tolist(), strict=True):
                if self.g:
                    bits = self._token_bits(b_lo, b_hi)
                    if k in hbm:
                        self.have[k] = self.have.get(k, 0) | bits
                if wb:
                    if k not in hbm:
                        self._hbm_insert(k)
                        if self.g:
                            self.have[k] = bits
                    self.dirty.add(k)
                elif is_new:
                    self._store([k], [nb])
                else:
                    home = self._home(k)
                    if home is None:
                        self._store([k], [nb])
                    else:
                        self._queue_write(home.name, nb, 1)

    def _token_bits(self, lo: int, hi: int) -> int:
        """Sub-block bits of tokens [lo, hi) within their block."""
        a = (lo % self.bs) // self.g
        b = ((hi - 1) % self.bs) // self.g
        return ((1 << (b + 1)) - 1) ^ ((1 << a) - 1)

    def release(self, request_id: int) -> None:
        """``on_release = "drop"`` frees the request's blocks everywhere except prompt blocks it
        registered for prefix sharing; ``"keep"`` leaves them to the eviction policies."""
        idx = self._idx(request_id)
        self.released.add(idx)
        if self.cfg.on_release == "keep":
            return
        n_blocks = -(-self.length[idx] // self.bs)
        shared = self.keyspace.shared_blocks(idx)
        keep = self.keyspace.owned[idx]
        blocks = np.setdiff1d(np.arange(shared, n_blocks, dtype=np.int64), keep)
        keys = np.concatenate([self.keyspace.keys(idx, layer, blocks)
                               for layer in range(self.num_layers)]).tolist()
        for t in self.tiers.values():  # C-level removal on LRU/FIFO dicts, else the policy's
            fast = self._fast(t.policy)
            if fast is not None:
                _consume(map(fast[0].pop, keys, repeat(None)))
            else:
                _consume(map(t.policy.remove, keys))
        for aux in (self.dirty, self.prefetched):
            if aux:
                _consume(map(aux.discard, keys))
        for aux in (self.have, self.pending):
            if aux:
                _consume(map(aux.pop, keys, repeat(None)))

    # ------------------------------------------------------------------ residency helpers

    def _home(self, key: int) -> _Tier | None:
        for t in self.pools:
            if self._pool_ops[t.name][0](key):
                return t
        return None

    def _queue_write(self, tier: str, nbytes: int, ops: int) -> None:
        w = self._writes.setdefault(tier, [0, 0])
        w[0] += nbytes
        w[1] += ops

    def _store(self, keys: list[int], nbytes: list[int]) -> None:
        """Write blocks to the pool tiers the placement policy picks (``place_many`` when the
        policy has it: one decision list for the whole batch, same result as per-key calls)."""
        if not self.pools:
            return
        names = self.pool_names
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
                tname = target[0]
                self._pool_insert_many(self.tiers[tname], keys[start:end])
                self._queue_write(tname, sum(nbytes[start:end]), end - start)
                start = end
            return
        written: dict[str, list[int]] = {}
        for k, nb in zip(keys, nbytes, strict=True):
            free = {t.name: t.capacity - len(t.policy) for t in self.pools}
            for tname in self.placement.place(k, names, free):
                self._pool_insert(self.tiers[tname], k)
                w = written.setdefault(tname, [0, 0])
                w[0] += nb
                w[1] += 1
        for tname, (nb, ops) in written.items():
            self._queue_write(tname, nb, ops)

    def _pool_insert_many(self, tier: _Tier, keys: list[int]) -> None:
        """``_pool_insert`` for unique keys in order (C-level for LRU/FIFO pools)."""
        fast = self._fast_pool.get(tier.name)
        if fast is None or fast[2] == 0 or len(set(keys)) != len(keys):
            for k in keys:
                self._pool_insert(tier, k)
            return
        d, refresh, cap = fast
        done = _dict_batch(d, refresh, cap, keys)
        if done is None:
            for k in keys:
                self._pool_insert(tier, k)
            return
        if len(d) > tier.peak:
            tier.peak = len(d)
        victims = done[1]
        if victims:
            self._pool_victims(tier, victims)

    def _pool_insert(self, tier: _Tier, key: int) -> None:
        fast = self._fast_pool.get(tier.name)
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
            self._pool_victims(tier, victims)

    def _pool_victims(self, tier: _Tier, victims: list[int]) -> None:
        """A pool's victims go to the next pool down (placement's ``demote_target``) or are
        dropped."""
        tier.evictions += len(victims)
        demote = getattr(self.placement, "demote_target", None)
        target = demote(tier.name, self.pool_names) if demote else None
        for v in victims:
            if target is None or v in self.tiers[target].policy:
                if target is None:
                    tier.dropped += 1
                    self._lost_possible = True
                continue
            dst = self.tiers[target]
            dst.demoted_in += 1
            self._pool_insert(dst, v)
            self._queue_write(target, self.block_bytes, 1)

    def _hbm_insert(self, key: int) -> None:
        hbm = self.hbm
        victims = hbm.policy.insert(key)
        if victims:
            self._hbm_victims(victims)
        n = len(hbm.policy)
        if n > hbm.peak:
            hbm.peak = n

    def _hbm_victims(self, victims: list[int]) -> None:
        """Blocks leaving HBM: dirty ones (write-back) and ones no pool holds any more are
        written to the pools; the rest are dropped (the pools keep a copy)."""
        self.hbm.evictions += len(victims)
        if self.have:
            for v in victims:
                self.have.pop(v, None)
        if self.prefetched:
            for v in victims:
                if v in self.prefetched:
                    self.prefetched.discard(v)
                    self.prefetch_wasted += 1
                self.pending.pop(v, None)
        if not self.pools:
            return
        dirty = self.dirty
        if dirty:
            for v in [v for v in victims if v in dirty]:
                dirty.discard(v)
                home = self._home(v)
                if home is None:
                    self._store([v], [self.block_bytes])
                else:
                    self._queue_write(home.name, self.block_bytes, 1)
        if not self._lost_possible:
            return
        lost = victims
        for t in self.pools:  # blocks no pool holds (refilled after being dropped) go back down
            has = self._pool_ops[t.name][0]
            lost = list(compress(lost, map(not_, map(has, lost))))
        if lost:
            self._store(lost, [self.block_bytes] * len(lost))

    # ------------------------------------------------------------------ simpy processes

    def _transfer(self, res: simpy.Resource, duration: float, waits: list, done: dict, tag: str):
        if waits:
            yield simpy.AllOf(self.env, waits)
        with res.request() as req:
            yield req
            yield self.env.timeout(duration)
        done[tag] = self.env.now

    def _background(self, res: simpy.Resource, duration: float):
        with res.request() as req:
            yield req
            yield self.env.timeout(duration)

    def _flush_background(self) -> None:
        for tname, (nbytes, ops) in self._writes.items():
            t = self.tiers[tname]
            t.write_bytes += nbytes
            t.write_ops += ops
            dur = float(batch_time_us(t.spec, ops, nbytes, read=False))
            self.env.process(self._background(t.write, dur))
        self._writes.clear()
        for (tname, is_read), (nbytes, ops) in self._moves.items():
            t = self.tiers[tname]
            dur = float(batch_time_us(t.spec, ops, nbytes, read=is_read))
            self.env.process(self._background(t.read if is_read else t.write, dur))
        self._moves.clear()

    # ------------------------------------------------------------------ between steps

    def _between_steps(self, step: int) -> None:
        residency = {t.name: t.policy for t in self.pools}
        for key, src, dst in self.migration.between_steps(step, residency):
            s, d = self.tiers.get(src), self.tiers.get(dst)
            if s is None or d is None or s is d or key not in s.policy:
                continue
            s.policy.remove(key)
            if key not in d.policy:
                self._pool_insert(d, key)
            d.migrated_in += 1
            d.migration_bytes += self.block_bytes
            self.migrated += 1
            for tag in ((src, True), (dst, False)):
                m = self._moves.setdefault(tag, [0, 0])
                m[0] += self.block_bytes
                m[1] += 1

    # ------------------------------------------------------------------ the hot path

    def _masks(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(block ids, touched sub-block mask per block) for one row's sorted positions."""
        sub = np.unique(pos // self.g)
        blocks = (sub * self.g) // self.bs
        bits = np.left_shift(np.int64(1), sub % (self.bs // self.g)).astype(np.uint64)
        starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
        return blocks[starts], np.bitwise_or.reduceat(bits, starts)

    def fetch(self, access: LayerAccess) -> list[KVFetch]:
        rows = len(access.request_ids)
        if self.step != access.step_idx:
            if self.step is not None:
                self._between_steps(self.step)
            self.step = access.step_idx
        self._flush_background()
        env = self.env
        t0 = env.now
        layer = access.layer_id

        # keys per row, in trace order (rows in order, blocks ascending)
        row_keys: list[list[int]] = []
        row_blocks: list = []
        row_masks: list[list[int]] | None = [] if self.g else None
        idxs = [self._idx(r) for r in access.request_ids]
        for i, idx in enumerate(idxs):
            if self.g:
                blocks, masks = self._masks(np.asarray(access.token_pos[i], dtype=np.int64))
                row_masks.append(masks.tolist())
                if access.block_size == self.bs:
                    blocks = access.block_ids[i]  # the same ids (the caller's array)
            elif access.block_size != self.bs:
                blocks = np.unique(np.asarray(access.token_pos[i], dtype=np.int64) // self.bs)
            else:
                blocks = access.block_ids[i]
            row_blocks.append(blocks)
            if len(blocks):
                need = int(access.token_pos[i][-1]) + 1 if len(access.token_pos[i]) else 0
                if need > self.length[idx]:  # the step's own token(s), produced in HBM now
                    self._extend(idx, need)
            row_keys.append(self.keyspace.keys(idx, layer, blocks).tolist())

        hbm = self.hbm.policy
        waits: list = []
        n_tiers = len(TIER_NAMES)
        counts = np.zeros((rows, n_tiers + 1), dtype=np.int64)  # blocks per row per source
        sub_counts = np.zeros((rows, n_tiers + 1), dtype=np.int64) if self.g else None
        served: list[list[int]] = [[] for _ in range(n_tiers)]
        seq_lens = [int(self.length[i]) for i in idxs]
        row_pooled: list[tuple | None] = []  # per row: keys each pool served (None: no misses)
        for i, keys in enumerate(row_keys):
            if self._needs_ctx:
                hbm.begin_record(access.step_idx, layer, idxs[i], seq_lens[i], self.bs)
            if row_masks is not None:
                miss, victims, missing = self._hbm_pass_masked(keys, row_masks[i], sub_counts[i])
            else:
                miss, victims = self._hbm_pass(keys)
                missing = None
            if self.pending or self.prefetched:
                waits.extend(self._prefetch_hits(keys, miss))
            if victims:
                self._hbm_victims(victims)
            c = counts[i]
            pooled = None
            if miss:
                cnt, wsum, pooled = self._pool_lookup(miss, served, missing)
                c[1:] = cnt[1:]
                if missing is not None:
                    sub_counts[i, 1:] = wsum[1:]
                    sub_counts[i, 0] += wsum[_UNSERVED]  # refilled, then read from HBM
            # HBM serves every block no pool served: its hits and the unserved refills
            c[0] = len(keys) - c[1] - c[2]
            row_pooled.append(pooled)
        n_hbm = len(hbm)
        if n_hbm > self.hbm.peak:
            self.hbm.peak = n_hbm
        total = counts.sum(axis=0)
        self.accesses += int(total[:n_tiers].sum())  # the unserved column is inside hbm
        self.unserved += int(total[_UNSERVED])
        if total[_UNSERVED]:
            self._lost_possible = True

        # per row per tier: blocks, bytes, ops
        out_blocks = counts[:, :n_tiers]
        if sub_counts is None:
            seg = out_blocks
            seg_bytes = self.block_bytes
        else:
            seg = sub_counts[:, :n_tiers]
            seg_bytes = self.g * self.kvb
        row_bytes = seg * seg_bytes
        tiers = [self.tiers.get(n) for n in TIER_NAMES]
        row_ops = np.zeros_like(seg)
        for j, t in enumerate(tiers):
            if t is not None:
                row_ops[:, j] = read_ops(t.spec, seg[:, j], seg_bytes)
        tier_bytes = row_bytes.sum(axis=0)
        tier_ops = row_ops.sum(axis=0)

        done: dict[str, float] = {}
        procs = []
        for j, t in enumerate(tiers):
            if t is None or out_blocks[:, j].sum() == 0:
                continue
            dur = float(batch_time_us(t.spec, tier_ops[j], tier_bytes[j], read=True))
            procs.append(env.process(self._transfer(
                t.read, dur, waits if j == 0 else [], done, t.name)))
        if procs:
            env.run(until=simpy.AllOf(env, procs))
        lat = {n: done[n] - t0 for n in done}
        for n, v in lat.items():
            t = self.tiers[n]
            j = TIER_NAMES.index(n)
            t.latencies.append(v)
            served_here = int(out_blocks[:, j].sum())
            if j == 0:  # HBM's list also holds the unserved blocks it was refilled with
                t.refilled += int(total[_UNSERVED])
                served_here -= int(total[_UNSERVED])
            t.hits += served_here
            t.bytes += int(tier_bytes[j])
            t.ops += int(tier_ops[j])
        stall = max((lat[n] for n in POOL_TIERS if n in lat), default=0.0)
        self.stall_total += stall
        self.stalls.append(stall)
        self.stall_step[access.step_idx] = self.stall_step.get(access.step_idx, 0.0) + stall
        self.stall_layer[layer] = self.stall_layer.get(layer, 0.0) + stall
        if self._observe is not None:
            for j in (1, 2):
                if served[j]:
                    self._observe(access.step_idx, TIER_NAMES[j], np.asarray(served[j]))

        if self._prefetch_on:
            ctx = AccessContext(step_idx=access.step_idx, layer_id=layer,
                                request_idx=idxs[0] if idxs else 0,
                                seq_len=max(seq_lens, default=0), block_size=self.bs)
            selected = np.fromiter((k for ks in row_keys for k in ks), dtype=np.int64)
            self._issue_prefetch(self.prefetch.plan(ctx, selected))
        gap = self.cfg.layer_compute_us
        if gap <= 0 and access.step_wall_us:
            gap = access.step_wall_us / self.num_layers
        if gap > 0:
            env.run(until=env.now + gap)

        # one KVFetch per row: each tier's block ids (the pools' from their keys; HBM the rest,
        # the caller's own array when no pool served any block of the row)
        result = []
        mask = _BLOCK_MASK
        for i in range(rows):
            blocks = row_blocks[i]
            pooled = row_pooled[i]
            lists = [blocks, (), ()]
            if pooled is not None and (pooled[0] or pooled[1]):
                arr = np.asarray(blocks, dtype=np.int64)
                keep = np.ones(len(arr), dtype=bool)
                for j, got in ((1, pooled[0]), (2, pooled[1])):
                    if got:
                        ids = np.asarray(got, dtype=np.int64) & mask  # ascending: keys were
                        lists[j] = ids
                        keep[np.searchsorted(arr, ids)] = False
                lists[0] = arr[keep]
            per = []
            for j, n in enumerate(TIER_NAMES):
                nb = int(out_blocks[i, j])
                if nb == 0:
                    per.append(empty_tier())
                    continue
                per.append(TierFetch(
                    hit_blocks=lists[j], bytes_read=int(row_bytes[i, j]),
                    read_ops=int(row_ops[i, j]), latency_us=float(lat[n]), batch_size=nb))
            result.append(KVFetch(hbm=per[0], local_pool=per[1], remote_pool=per[2]))
        return result

    def _hbm_pass(self, keys: list[int]) -> tuple[list[int], list[int]]:
        """Demand accesses of one row to HBM in order: (misses, victims). LRU and FIFO run
        on their OrderedDict directly (same semantics as ``access``, without method calls)."""
        miss: list[int] = []
        victims: list[int] = []
        fast = self._fast_hbm
        if fast is not None:
            d, refresh, cap = fast
            if cap == 0:
                return list(keys), []
            if refresh:
                # LRU, hits first: move keys to the MRU end until the first miss (one dict op
                # per hit instead of a lookup and a move; a mostly-hit row costs half). The
                # hits moved are exactly what the per-key loop does before that miss, so the
                # rest of the row continues from the same state.
                it = iter(keys)
                try:
                    _consume(map(d.move_to_end, it))
                    return [], []
                except KeyError as exc:
                    keys = [exc.args[0], *it]
            done = _dict_batch(d, refresh, cap, keys)
            if done is not None:
                if len(d) > self.hbm.peak:
                    self.hbm.peak = len(d)
                return done
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
            if len(d) > self.hbm.peak:
                self.hbm.peak = len(d)
            return miss, victims
        hbm = self.hbm.policy
        for k in keys:
            if k in hbm:
                hbm.touch(k)
            else:
                miss.append(k)
                v = hbm.insert(k)
                if v:
                    victims.extend(x for x in v if x != k)
        return miss, victims

    def _hbm_pass_masked(self, keys: list[int], masks: list[int], sub: np.ndarray
                         ) -> tuple[list[int], list[int], list[int]]:
        """Sub-block granularity: a resident block missing some touched sub-blocks is read
        (those sub-blocks only) from the pools; returns (misses, victims, missing counts)."""
        hbm = self.hbm.policy
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

    def _prefetch_hits(self, keys: list[int], miss: list[int]) -> list:
        """Demand hits on prefetched blocks: count them, and wait for in-flight transfers."""
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
                self.prefetch_useful += 1
        return waits

    def _pool_lookup(self, miss: list[int], served: list[list[int]],
                     weights: list[int] | None = None) -> tuple[list[int], list[int], tuple]:
        """Blocks (and sub-block weights) each pool tier served for these HBM misses, nearest
        first; the serving pool sees each as an access (touch). Index 3 = unserved. Also the
        keys (in ``miss`` order) the local and the remote pool served."""
        counts = [0, 0, 0, 0]
        wsum = [0, 0, 0, 0]
        by_tier: list = [None, [], []]
        todo, w = miss, weights
        for t in self.pools:
            if not todo:
                break
            tier_no = TIER_NAMES.index(t.name)
            has, touch = self._pool_ops[t.name]
            found = list(map(has, todo))
            n = found.count(True)
            if not n:
                continue
            got = todo if n == len(todo) else list(compress(todo, found))
            by_tier[tier_no] = got
            if touch is not None:
                _consume(map(touch, got))
            if self._observe is not None:
                served[tier_no].extend(got)
            counts[tier_no] = n
            if w is not None:
                wsum[tier_no] = sum(compress(w, found))
                w = list(compress(w, map(not_, found)))
            todo = [] if n == len(todo) else list(compress(todo, map(not_, found)))
        counts[_UNSERVED] = len(todo)
        if w is not None:
            wsum[_UNSERVED] = sum(w)
        return counts, wsum, (by_tier[1], by_tier[2])

    def _issue_prefetch(self, keys: np.ndarray) -> None:
        """Move predicted keys into HBM in the background, one batch per source tier."""
        if keys is None or len(keys) == 0 or not self.pools:
            return
        hbm = self.hbm.policy
        by_tier: dict[str, list[int]] = {}
        for k in np.unique(np.asarray(keys, dtype=np.int64)).tolist():
            if k in hbm:
                continue
            home = self._home(k)
            if home is None:
                continue
            victims = hbm.insert(k)
            if victims:
                if k in victims:
                    victims = [v for v in victims if v != k]
                    if victims:
                        self._hbm_victims(victims)
                    continue
                self._hbm_victims(victims)
            by_tier.setdefault(home.name, []).append(k)
        for tname, ks in by_tier.items():
            t = self.tiers[tname]
            nbytes = len(ks) * self.block_bytes
            ops = len(ks) * t.ops_per_block
            t.prefetch_blocks += len(ks)
            t.prefetch_bytes += nbytes
            dur = float(batch_time_us(t.spec, ops, nbytes, read=True))
            proc = self.env.process(self._background(t.read, dur))
            for k in ks:
                self.pending[k] = proc
                self.prefetched.add(k)
                if self.g:
                    self.have[k] = self.full_mask

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict | None:
        """``tiers``, ``stall`` and ``fetch_vs_recompute`` sections of summary.json."""
        self._flush_background()
        self.env.run()  # let background writes, prefetches and migrations finish
        tiers = {n: t.stats() for n, t in self.tiers.items()}
        tiers["_totals"] = {
            "accesses": self.accesses,
            "unserved_blocks": self.unserved,
            "block_size": self.bs,
            "kv_bytes_per_token": self.kvb,
            "fetch_granularity": self.g,
            "write_policy": self.cfg.write_policy,
            "preset": self.cfg.name,
            "policies": self.specs,
            "prefetch_useful": self.prefetch_useful,
            "prefetch_wasted": self.prefetch_wasted,
            "migrated_blocks": self.migrated,
            "virtual_time_us": float(self.env.now),
        }
        stall = {
            "total_us": self.stall_total,
            "per_fetch_us": _pcts(self.stalls),
            "per_step_us": {str(k): v for k, v in sorted(self.stall_step.items())},
            "per_layer_us": {str(k): v for k, v in sorted(self.stall_layer.items())},
        }
        fvr = fetch_vs_recompute(self.model, self.cfg, self.prompt_lens, self.bs)
        return {"tiers": tiers, "stall": stall, "fetch_vs_recompute": fvr}

