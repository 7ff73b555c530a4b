"""Straightforward per-record reference implementations the tracer tests compare against."""

from __future__ import annotations

import math


def pct(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (Hyndman & Fan type 7), written out by hand."""
    n = len(sorted_xs)
    h = (n - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, n - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (h - lo)


def ref_fields(indices: list[int], step: int, block_size: int, n_prefix: int,
               scores: list[float] | None = None) -> dict:
    """What a record must say about one row of top-k indices (padding < 0 dropped)."""
    pos = sorted({i for i in indices if i >= 0})
    last = step
    offsets = sorted(last - p for p in pos)
    counts: dict[int, int] = {}
    for p in pos:
        counts[p // block_size] = counts.get(p // block_size, 0) + 1
    ids = sorted(counts)
    per_block = sorted(counts.values())
    inter = sum(1 for b in ids if b < n_prefix)
    out = {
        "step_idx": step,
        "seq_len_current": step + 1,
        "selected_token_pos": pos,
        "unique_token_pos_count": len(pos),
        "offset_min": offsets[0],
        "offset_p50": pct(offsets, 50),
        "offset_max": offsets[-1],
        "selected_block_ids": ids,
        "unique_blocks": len(ids),
        "tpb": (sum(per_block) / len(per_block), pct(per_block, 50), pct(per_block, 95)),
        "intersection_blocks": inter,
        "intersection_ratio": inter / len(ids),
        "block_counts": [counts[b] for b in ids],
    }
    if scores is not None:
        first: dict[int, float] = {}
        for i, s in zip(indices, scores, strict=True):
            if i >= 0 and i not in first:
                first[i] = float(s)
        sc = [first[p] for p in pos]
        out["scores"] = sc
        out["scores_stats"] = (min(sc), sum(sc) / len(sc), max(sc))
    return out
