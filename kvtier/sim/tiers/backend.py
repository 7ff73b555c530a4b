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

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np

from kvtier.backend import LayerAccess
from kvtier.policies.base import _BLOCK_MASK, AccessContext, EvictionPolicy
from kvtier.schema import TIER_NAMES, KVFetch, TierFetch, empty_tier
from kvtier.sim.tiers.backing_store import UNSERVED, BackingStore
from kvtier.sim.tiers.config import POOL_TIERS, ConfigError, TierConfig, _check
from kvtier.sim.tiers.cost import batch_time_us, read_ops
from kvtier.sim.tiers.fast_path import consume
from kvtier.sim.tiers.fast_path import dict_batch as _dict_batch  # noqa: F401 (tests import it here)
from kvtier.sim.tiers.hbm_cache import HBMCache, row_masks
from kvtier.sim.tiers.keyspace import KeySpace
from kvtier.sim.tiers.prefetcher import Prefetcher
from kvtier.sim.tiers.recompute import ModelDims, fetch_vs_recompute
from kvtier.sim.tiers.specs import eviction_factory, make_migration, make_placement, make_prefetch
from kvtier.sim.tiers.tier import Tier
from kvtier.sim.tiers.timing import LinkClock


class TieredBackend:
    """KVBackend over HBM + local pool + remote pool, timed by simpy (see module doc).

    Composed of the tiers (``tier.Tier``: resident set and counters each), HBM's demand cache
    (``hbm_cache``), the pools behind it (``backing_store``: placement, demotion, lookups,
    migration), the prefetcher (``prefetcher``) and the virtual clock (``timing``: links,
    background transfers, stall). Here: the request lifecycle (keys, writes of prompt and
    decoded KV, release), a fetch from keys to records, where blocks leaving HBM go, and the
    summary.
    """

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
        self.clock = LinkClock(config.links)
        self.specs = {"eviction": str(eviction), "pool_eviction": str(pool_eviction),
                      "placement": placement, "prefetch": prefetch, "migration": migration}

        hbm_factory = eviction if callable(eviction) else eviction_factory(eviction)
        pool_factory = pool_eviction if callable(pool_eviction) else eviction_factory(pool_eviction)
        self.tiers: dict[str, Tier] = {}
        for tname, spec in config.tiers().items():
            cap = spec.total_capacity_bytes // self.block_bytes
            pol = (hbm_factory if tname == "hbm" else pool_factory)(cap)
            if tname != "hbm" and getattr(pol, "offline", False):
                raise ConfigError(f"pool_eviction {pool_eviction!r}: offline policies only fit the hbm tier")
            r, w = self.clock.links[spec.link]
            self.tiers[tname] = Tier(tname, spec, cap, pol, r, w, self.block_bytes)
        self.hbm = HBMCache(self.tiers["hbm"], self.bs, self.g)
        self.store = BackingStore(self.tiers, make_placement(placement), self.clock,
                                  self.block_bytes, lost_possible=config.write_policy == "write_back")
        self.pools = self.store.pools  # the pool tiers, nearest first
        prefetch_policy = make_prefetch(prefetch)
        if hasattr(prefetch_policy, "bind"):
            prefetch_policy.bind(self.num_layers)
        self.migration = make_migration(migration)
        self.prefetcher = Prefetcher(prefetch_policy, self.hbm, self.store, self.clock,
                                     self.block_bytes, self._hbm_victims)
        self._observe = getattr(self.migration, "observe", None)
        if self.migration.name == "none":
            self._observe = None
        if getattr(self.hbm.policy, "offline", False):
            if future_keys is None:
                raise ConfigError(f"eviction {eviction!r} is offline: it needs the future key "
                                  "stream (kvtier replay passes it)")
            if self.prefetcher.on:
                raise ConfigError(f"eviction {eviction!r} is offline and cannot see prefetches: "
                                  "use --prefetch none")
            if config.write_policy == "write_back":
                raise ConfigError(f"eviction {eviction!r} is offline and cannot see write-back "
                                  "inserts: use write_policy = 'write_through'")
            self.hbm.policy.set_future(np.asarray(future_keys, dtype=np.int64))

        self.keyspace = KeySpace()
        self.length: dict[int, int] = {}  # tokens whose KV is written
        self.target: dict[int, int] = {}  # prompt + appended tokens
        self.prompt_lens: dict[int, int] = {}
        self.released: set[int] = set()
        self.dirty: set[int] = set()  # write-back: HBM blocks not yet written to a pool
        self.step: int | None = None
        self.accesses = self.unserved = 0
        self.migrated = 0

    @property
    def placement(self) -> Any:
        """The placement policy (``backing_store.BackingStore.placement``)."""
        return self.store.placement

    @placement.setter
    def placement(self, policy: Any) -> None:
        self.store.placement = policy

    @property
    def _lost_possible(self) -> bool:
        """False while every HBM-resident block provably has a pool copy (nothing was unserved
        or dropped by a pool, no write-back): HBM victims then need no pool lookups
        (``BackingStore.lost_possible``; tests/test_tiered_backend.py overrides this to
        check the shortcut against always looking)."""
        return self.store.lost_possible

    @_lost_possible.setter
    def _lost_possible(self, value: bool) -> None:
        self.store.lost_possible = value

    @property
    def stall_total(self) -> float:
        """Total stall so far (µs): what attention waited for KV not in HBM."""
        return self.clock.stall_total

    @property
    def prefetch_useful(self) -> int:
        """Prefetched blocks read before HBM evicted them."""
        return self.prefetcher.useful

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
            self.store.store(keys.tolist(), (tokens * self.kvb).tolist())

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
        have = self.hbm.have
        for layer in range(self.num_layers):
            keys = self.keyspace.keys(idx, layer, blocks).tolist()
            for k, nb, is_new, b_lo, b_hi in zip(keys, nbytes, fresh, lo.tolist(), hi.tolist(), strict=True):
                if self.g:
                    bits = self._token_bits(b_lo, b_hi)
                    if k in hbm:
                        have[k] = have.get(k, 0) | bits
                if wb:
                    if k not in hbm:
                        victims = self.hbm.insert(k)
                        if victims:
                            self._hbm_victims(victims)
                        if self.g:
                            have[k] = bits
                    self.dirty.add(k)
                elif is_new:
                    self.store.store([k], [nb])
                else:
                    home = self.store.home(k)
                    if home is None:
                        self.store.store([k], [nb])
                    else:
                        self.clock.queue_write(home, nb, 1)

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
        self.hbm.remove(keys)
        self.store.remove(keys)
        if self.dirty:
            consume(map(self.dirty.discard, keys))
        self.prefetcher.forget(keys)

    # ------------------------------------------------------------------ blocks leaving HBM

    def _hbm_victims(self, victims: list[int]) -> None:
        """Blocks leaving HBM: dirty ones (write-back) and ones no pool holds any more are
        written to the pools; the rest are dropped (the pools keep a copy)."""
        self.hbm.tier.evictions += len(victims)
        have = self.hbm.have
        if have:
            for v in victims:
                have.pop(v, None)
        if self.prefetcher.prefetched:
            self.prefetcher.evicted(victims)
        if not self.pools:
            return
        dirty = self.dirty
        if dirty:
            for v in [v for v in victims if v in dirty]:
                dirty.discard(v)
                home = self.store.home(v)
                if home is None:
                    self.store.store([v], [self.block_bytes])
                else:
                    self.clock.queue_write(home, self.block_bytes, 1)
        if not self._lost_possible:
            return
        lost = self.store.missing(victims)  # refilled after being dropped: back down
        if lost:
            self.store.store(lost, [self.block_bytes] * len(lost))

    # ------------------------------------------------------------------ the hot path

    def fetch(self, access: LayerAccess) -> list[KVFetch]:
        if self.step != access.step_idx:
            if self.step is not None:  # a step boundary: migration
                residency = {t.name: t.policy for t in self.pools}
                self.migrated += self.store.migrate(self.migration.between_steps(self.step, residency))
            self.step = access.step_idx
        self.clock.flush()
        layer = access.layer_id
        idxs = [self._idx(r) for r in access.request_ids]
        row_blocks, row_keys, masks = self._row_keys(access, idxs)

        # each row's blocks through HBM, its misses through the pools
        hbm = self.hbm
        pf = self.prefetcher
        rows = len(idxs)
        waits: list = []
        counts = np.zeros((rows, len(TIER_NAMES) + 1), dtype=np.int64)  # blocks per row per source
        sub_counts = np.zeros_like(counts) if self.g else None  # sub-blocks, with granularity
        served: list[list[int]] | None = [[], [], []] if self._observe is not None else None
        seq_lens = [int(self.length[i]) for i in idxs]
        row_pooled: list[tuple | None] = []  # per row: keys each pool served (None: no misses)
        for i, keys in enumerate(row_keys):
            if hbm.needs_ctx:
                hbm.policy.begin_record(access.step_idx, layer, idxs[i], seq_lens[i], self.bs)
            if masks is not None:
                miss, victims, missing = hbm.access_masked(keys, masks[i], sub_counts[i])
            else:
                miss, victims = hbm.access(keys)
                missing = None
            if pf.pending or pf.prefetched:
                waits.extend(pf.demand_hits(keys, miss))
            if victims:
                self._hbm_victims(victims)
            c = counts[i]
            pooled = None
            if miss:
                cnt, wsum, pooled = self.store.lookup(miss, served, missing)
                c[1:] = cnt[1:]
                if missing is not None:
                    sub_counts[i, 1:] = wsum[1:]
                    sub_counts[i, 0] += wsum[UNSERVED]  # refilled, then read from HBM
            # HBM serves every block no pool served: its hits and the unserved refills
            c[0] = len(keys) - c[1] - c[2]
            row_pooled.append(pooled)
        hbm.note_size()
        unserved = int(counts[:, UNSERVED].sum())
        self.accesses += int(counts[:, :UNSERVED].sum())  # the unserved column is inside hbm
        self.unserved += unserved
        if unserved:
            self._lost_possible = True

        # one read batch per tier, timed; per row its blocks, bytes and ops of each tier
        out_blocks = counts[:, :UNSERVED]
        seg, seg_bytes = ((out_blocks, self.block_bytes) if sub_counts is None
                          else (sub_counts[:, :UNSERVED], self.g * self.kvb))
        row_bytes = seg * seg_bytes
        tiers = [self.tiers.get(n) for n in TIER_NAMES]
        row_ops = np.zeros_like(seg)
        for j, t in enumerate(tiers):
            if t is not None:
                row_ops[:, j] = read_ops(t.spec, seg[:, j], seg_bytes)
        tier_bytes = row_bytes.sum(axis=0)
        tier_ops = row_ops.sum(axis=0)
        lat = self.clock.read([
            (t, float(batch_time_us(t.spec, tier_ops[j], tier_bytes[j], read=True)), waits if j == 0 else [])
            for j, t in enumerate(tiers) if t is not None and out_blocks[:, j].sum() != 0])
        for n, v in lat.items():
            j = TIER_NAMES.index(n)  # HBM's blocks include the unserved ones it was refilled with
            self.tiers[n].add_read(v, int(out_blocks[:, j].sum()), int(tier_bytes[j]), int(tier_ops[j]),
                                   unserved if j == 0 else 0)
        self.clock.add_stall(access.step_idx, layer,
                             max((lat[n] for n in POOL_TIERS if n in lat), default=0.0))
        if served is not None:
            for j in (1, 2):
                if served[j]:
                    self._observe(access.step_idx, TIER_NAMES[j], np.asarray(served[j]))

        if pf.on:
            ctx = AccessContext(step_idx=access.step_idx, layer_id=layer,
                                request_idx=idxs[0] if idxs else 0,
                                seq_len=max(seq_lens, default=0), block_size=self.bs)
            pf.after_read(ctx, np.fromiter((k for ks in row_keys for k in ks), dtype=np.int64))
        gap = self.cfg.layer_compute_us
        if gap <= 0 and access.step_wall_us:
            gap = access.step_wall_us / self.num_layers
        if gap > 0:
            self.clock.advance(gap)
        return _row_fetches(row_blocks, row_pooled, out_blocks, row_bytes, row_ops, lat)

    def _row_keys(self, access: LayerAccess, idxs: list[int]) -> tuple[list, list[list[int]], list | None]:
        """Per row, in trace order (rows in order, blocks ascending): its block ids (the
        caller's array where the block size matches), their keys and, with granularity,
        their touched sub-block masks. A row's own new token(s) are written first."""
        row_keys: list[list[int]] = []
        row_blocks: list = []
        masks: list[list[int]] | None = [] if self.g else None
        for i, idx in enumerate(idxs):
            if self.g:
                blocks, m = row_masks(np.asarray(access.token_pos[i], dtype=np.int64), self.g, self.bs)
                masks.append(m.tolist())
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
            row_keys.append(self.keyspace.keys(idx, access.layer_id, blocks).tolist())
        return row_blocks, row_keys, masks

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict | None:
        """``tiers``, ``stall`` and ``fetch_vs_recompute`` sections of summary.json."""
        self.clock.finish()  # let background writes, prefetches and migrations finish
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
            "prefetch_useful": self.prefetcher.useful,
            "prefetch_wasted": self.prefetcher.wasted,
            "migrated_blocks": self.migrated,
            "virtual_time_us": float(self.clock.now),
        }
        fvr = fetch_vs_recompute(self.model, self.cfg, self.prompt_lens, self.bs)
        return {"tiers": tiers, "stall": self.clock.stall_summary(), "fetch_vs_recompute": fvr}


def _row_fetches(row_blocks: list, row_pooled: list, out_blocks: np.ndarray, row_bytes: np.ndarray,
                 row_ops: np.ndarray, lat: dict[str, float]) -> list[KVFetch]:
    """One KVFetch per row: each tier's block ids (the pools' from their keys; HBM the rest,
    the caller's own array when no pool served any block of the row), blocks, bytes, ops and
    the tier's batch latency."""
    result = []
    mask = _BLOCK_MASK
    for i, blocks in enumerate(row_blocks):
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
