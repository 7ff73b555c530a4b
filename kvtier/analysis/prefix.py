"""Prefix overlap (point D) over decode steps, and the hot prefix blocks.

Per record, at the recorded block size b: the cached prefix is the request's first
``prefix.prefix_cached_blocks`` blocks (what an earlier request already wrote, i.e. what a
prefix cache would serve), so ``cached_prefix_token_share`` = selected positions below
``prefix_cached_blocks * b`` / selected positions. ``prefix.intersection_ratio`` is the
recorded share of touched blocks inside the request's own hashed prefix. Both are averaged by
decode step (the record's step minus its request's first step). Hot prefix blocks: how many
records touch each prefix block id (``prefix.intersection_blocks``; in traces that record only
their count, the first that many touched blocks, which are the prefix ones).
"""

from __future__ import annotations

import numpy as np

from kvtier.analysis.chunk import Chunk, float_column, int_column, list_values
from kvtier.analysis.stats import Dist, GroupMean

HOT_TOP = 32


class PrefixOverlap:
    def __init__(self) -> None:
        self.ratio = Dist()
        self.share = Dist()
        self.ratio_by_step = GroupMean()
        self.share_by_step = GroupMean()
        self.hit_by_step = GroupMean()
        self.touch = np.zeros(0, dtype=np.int64)
        self.records = 0
        self.cached_records = 0
        self.cached_requests: set[int] = set()

    def cut(self, c: Chunk) -> np.ndarray:
        """Per record, the first token past its cached prefix (0: none cached)."""
        cached = int_column(c.table, "prefix.prefix_cached_blocks")
        return np.maximum(cached, 0) * int(c.block_size or 0)

    def add(self, c: Chunk, decode_step: np.ndarray, below: np.ndarray,
            recorded_blocks: tuple[np.ndarray, np.ndarray] | None) -> None:
        t = c.table
        n = c.n
        self.records += n
        k = c.lens().astype(np.float64)
        ratio = float_column(t, "prefix.intersection_ratio")
        share = below / k
        cached = int_column(t, "prefix.prefix_cached_blocks") > 0
        hit = float_column(t, "prefix.prefix_cache_hit")
        self.ratio.add(ratio)
        self.share.add(share)
        self.ratio_by_step.add(decode_step, ratio)
        self.share_by_step.add(decode_step, share)
        self.hit_by_step.add(decode_step, hit)
        self.cached_records += int(cached.sum())
        self.cached_requests.update(np.unique(c.req[cached]).tolist())
        ids = self._touched_prefix_blocks(t, recorded_blocks)
        if ids is not None and ids.shape[0]:
            m = int(ids.max()) + 1
            if m > self.touch.shape[0]:
                self.touch = np.concatenate([self.touch, np.zeros(m - self.touch.shape[0],
                                                                  np.int64)])
            self.touch[:m] += np.bincount(ids, minlength=m)

    @staticmethod
    def _touched_prefix_blocks(t, recorded_blocks) -> np.ndarray | None:
        lv = list_values(t, "prefix.intersection_blocks")
        if lv is not None:
            return lv[1]
        if recorded_blocks is None:
            return None
        count = int_column(t, "prefix.intersection_blocks")
        boff, blocks = recorded_blocks
        k = np.clip(count, 0, np.diff(boff))
        first = np.repeat(boff[:-1], k)
        within = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        return blocks[first + within]

    def result(self, block_size: int | None) -> dict:
        steps = self.share_by_step.groups()
        order = np.argsort(-self.touch, kind="stable")[:HOT_TOP]
        hot = [{"block_id": int(b), "records": int(self.touch[b]),
                "share_of_records": int(self.touch[b]) / self.records if self.records else 0.0}
               for b in order.tolist() if self.touch[b] > 0]
        return {
            "block_size_tokens": block_size,
            "records": self.records,
            "records_with_cached_prefix": self.cached_records,
            "requests_with_cached_prefix": len(self.cached_requests),
            "intersection_ratio": self.ratio.to_dict(),
            "cached_prefix_token_share": self.share.to_dict(),
            "by_decode_step": {
                "decode_step": steps,
                "records": [int(self.share_by_step.n[g]) for g in steps],
                "intersection_ratio_mean": [self.ratio_by_step.mean(g) for g in steps],
                "cached_prefix_token_share_mean": [self.share_by_step.mean(g) for g in steps],
                "prefix_cache_hit_share": [self.hit_by_step.mean(g) for g in steps],
            },
            "hot_prefix_blocks": hot,
        }
