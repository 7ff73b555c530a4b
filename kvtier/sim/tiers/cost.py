"""The per-batch cost model shared by the emulator and the fetch-vs-recompute estimate:
``t = base + hops*per_hop + ceil(ops / max_batch) * per_op + bytes / bw`` (kv_tiers.md §8)."""

from __future__ import annotations

import numpy as np

from kvtier.sim.tiers.config import TierSpec


def read_ops(tier: TierSpec, segments, seg_bytes):
    """Ops for ``segments`` contiguous pieces of ``seg_bytes`` each. Sliced methods
    (per-row DMA, RDMA scatter-gather) issue one op per ``slice_bytes`` of each segment;
    gathers issue one op per segment. Works on scalars and numpy arrays."""
    if tier.method in ("per_row_dma", "rdma_sg") and tier.slice_bytes:
        return segments * (-(-np.asarray(seg_bytes) // tier.slice_bytes))
    return segments


def batch_time_us(tier: TierSpec, ops, nbytes, *, read: bool = True):
    """Unloaded time of one batch on ``tier`` (µs); zero work costs zero. Scalars or arrays."""
    bw = tier.read_bw_gb_s if read else tier.write_bw_gb_s
    ops = np.asarray(ops, dtype=np.float64)
    nbytes = np.asarray(nbytes, dtype=np.float64)
    t = tier.latency_us + np.ceil(ops / tier.max_batch) * tier.per_op_us + nbytes / (bw * 1e3)
    return np.where((ops > 0) | (nbytes > 0), t, 0.0)
