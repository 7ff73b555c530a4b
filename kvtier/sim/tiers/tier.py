"""One tier of the emulator: its spec, its resident set (an eviction policy), its links and
the counters its ``summary.json`` section (``tiers.<name>``) is made of."""

from __future__ import annotations

import numpy as np
import simpy

from kvtier.policies.base import EvictionPolicy
from kvtier.schema import PERCENTILE_METHOD
from kvtier.sim.tiers.config import TierSpec
from kvtier.sim.tiers.cost import read_ops


def percentiles(values: list[float]) -> dict:
    """``{count, p50, p95, p99, max}`` of ``values`` (numpy's linear method; None when empty)."""
    if not values:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99], method=PERCENTILE_METHOD)
    return {"count": int(a.size), "p50": float(p50), "p95": float(p95), "p99": float(p99),
            "max": float(a.max())}


class Tier:
    """One tier's spec, resident set and counters. ``read`` / ``write`` are its link's simpy
    Resources (the same one unless the link is duplex)."""

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
        self.peak = 0  # the most blocks resident at once (updated where blocks enter)

    def add_read(self, latency_us: float, blocks: int, nbytes: int, ops: int, refilled: int = 0) -> None:
        """One (step, layer)'s read batch on this tier: ``blocks`` served, of which
        ``refilled`` (HBM only) were no tier's and refilled uncosted before being read."""
        self.latencies.append(latency_us)
        self.hits += blocks - refilled
        self.refilled += refilled
        self.bytes += nbytes
        self.ops += ops

    def stats(self) -> dict:
        return {
            "capacity_blocks": self.capacity,
            "hit_blocks": self.hits,
            "refilled_blocks": self.refilled,
            "bytes_read": self.bytes,
            "read_ops": self.ops,
            "latency_us": percentiles(self.latencies),
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
