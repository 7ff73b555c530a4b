"""Everything the analysis computes at one block size.

The four sections named as the seed note's analysis tooling names them (``record_stats``,
``temporal_locality``, ``working_set``, ``cache_sim``) come from the *stream records* (the
trace's records, or with ``--step-union`` one virtual record per (request, step)); the
sections beyond it (cross-layer overlap, the shared-cache curves, read amplification at this
size, per-layer and per-decode-step views) from the trace's own records. docs/ANALYSIS.md gives
every definition.
"""

from __future__ import annotations

import math

import numpy as np

from kvtier.analysis.kernels import clogc_table
from kvtier.analysis.shared import SharedCache
from kvtier.analysis.state import IoUState, StepOrdinals, StreamIndex, StreamState
from kvtier.analysis.stats import Dist, DistSet, GroupDist, GroupMean

#: the record_stats columns kept in one DistSet (the recent ratios follow them)
RECORD_COLUMNS = ("unique_blocks", "block_span", "block_density", "tokens_per_block_mean",
                  "normalized_entropy", "gini", "mean_block_distance")


class Records:
    """The record columns a block-size analysis reads (a ``Chunk`` or virtual records)."""

    __slots__ = ("req", "layer", "step", "seq_len", "offsets", "pos", "gidx", "near")

    def __init__(self, req, layer, step, seq_len, offsets, pos, gidx=None, near=None):
        self.req, self.layer, self.step, self.seq_len = req, layer, step, seq_len
        self.offsets, self.pos, self.gidx, self.near = offsets, pos, gidx, near

    @property
    def n(self) -> int:
        return int(self.req.shape[0])


class BlockSizeAnalysis:
    def __init__(self, bs: int, settings, kern, per_layer_streams: bool) -> None:
        self.bs = bs
        self.s = settings
        self.k = kern
        self.clogc = clogc_table(bs)
        self.block_wins = np.asarray(settings.recent_block_windows, dtype=np.int64)
        self.ws_windows = np.asarray(settings.ws_windows, dtype=np.int64)
        self.caps = np.asarray(settings.lru_caps, dtype=np.int64)
        self.per_layer_streams = per_layer_streams
        # record_stats: one column each, in RECORD_COLUMNS order, then the recent ratios
        self.nt = len(settings.recent_token_windows)
        self.nb_w = len(settings.recent_block_windows)
        self.record = DistSet(len(RECORD_COLUMNS) + self.nt + self.nb_w)
        # temporal_locality, working_set, cache_sim
        self.step_jaccard = Dist()
        self.reuse_hist = np.zeros(settings.reuse_cap_steps + 1, dtype=np.int64)
        self.first_touch = 0
        self.ws = DistSet(len(settings.ws_windows))
        self.lru_hits = np.zeros(self.caps.shape[0], dtype=np.int64)
        self.lru_accesses = 0
        self.streams = StreamIndex(per_layer_streams)
        self.ordinals = StepOrdinals()
        self.state = StreamState(int(self.ws_windows.max()) if self.ws_windows.shape[0] else 1,
                                 self.caps)
        self.jaccard_by_layer = GroupMean()
        # beyond: trace records
        self.iou_state = IoUState()
        self.iou = Dist()
        self.iou_by_layer = GroupDist()  # group = the later layer of the pair
        self.unique_by_layer = GroupMean()
        self.heat_sum = np.zeros((0, 0))
        self.heat_n = np.zeros((0, 0), dtype=np.int64)
        self.amp_blocks = 0
        self.amp_tokens = 0
        self.amp_record = Dist()
        self.tpb_hist = np.zeros(bs + 1, dtype=np.int64)
        self.shared = SharedCache(settings.shared_samples, kern)
        self.layers_seen = np.zeros(0, dtype=bool)

    # -- trace records ----------------------------------------------------------------------

    def trace_records(self, r: Records, bd, decode_step: np.ndarray) -> None:
        """Cross-layer IoU, the shared-cache sample, read amplification at this size, the
        per-layer and per-decode-step views, tokens per touched block."""
        boff, blocks, counts = bd[0], bd[1], bd[2]
        u = np.diff(boff)
        k = np.diff(r.offsets)
        self.amp_blocks += int(u.sum())
        self.amp_tokens += int(k.sum())
        self.amp_record.add(u * self.bs / k)
        self.tpb_hist += np.bincount(counts, minlength=self.bs + 1)
        self.unique_by_layer.add(r.layer, u)
        # unique blocks per (decode step, layer)
        d_max, l_max = int(decode_step.max()) + 1, int(r.layer.max()) + 1
        if d_max > self.heat_sum.shape[0] or l_max > self.heat_sum.shape[1]:
            hs = np.zeros((max(d_max, self.heat_sum.shape[0]), max(l_max, self.heat_sum.shape[1])))
            hn = np.zeros(hs.shape, dtype=np.int64)
            hs[:self.heat_sum.shape[0], :self.heat_sum.shape[1]] = self.heat_sum
            hn[:self.heat_n.shape[0], :self.heat_n.shape[1]] = self.heat_n
            self.heat_sum, self.heat_n = hs, hn
        cell = decode_step * self.heat_sum.shape[1] + r.layer
        size = self.heat_sum.size
        self.heat_sum += np.bincount(cell, weights=u, minlength=size).reshape(self.heat_sum.shape)
        self.heat_n += np.bincount(cell, minlength=size).reshape(self.heat_n.shape)
        # cross-layer IoU (per request, consecutive layers of one step)
        self.iou_state.prepare(r.req, boff, blocks)
        iou = np.empty(r.n)
        self.k.iou_pass(self.iou_state, r.req, r.gidx, r.step, r.layer, boff, blocks, iou)
        self.iou.add(iou)
        self.iou_by_layer.add(r.layer, iou)
        self.shared.add(r.req, r.layer, boff, blocks)

    # -- stream records (the seed tooling's sections) ---------------------------------------

    def stream_records(self, r: Records, bd) -> None:
        boff, blocks, counts, span, slogc, gini, nearb, sumdist = bd
        del counts
        u = np.diff(boff)
        k = np.diff(r.offsets).astype(np.float64)
        uf = u.astype(np.float64)
        h = np.log(k) - slogc / k  # Shannon entropy of the per-block token shares
        m = np.empty((r.n, len(RECORD_COLUMNS) + self.nt + self.nb_w))
        m[:, 0] = uf
        m[:, 1] = span
        m[:, 2] = uf / span
        m[:, 3] = k / uf
        m[:, 4] = np.where(u > 1, h / np.log(np.maximum(uf, 2.0)), 0.0)
        m[:, 5] = gini
        m[:, 6] = sumdist / uf
        base = len(RECORD_COLUMNS)
        m[:, base:base + self.nt] = r.near / k[:, None]
        m[:, base + self.nt:] = nearb / uf[:, None]
        self.record.add(m)
        # streams
        sid = self.streams(r.req, r.layer)
        sord = self.ordinals(sid, r.step)
        self.state.prepare(sid, boff, blocks)
        jacc = np.empty(r.n)
        ws = np.zeros((r.n, self.ws_windows.shape[0]), dtype=np.int64)
        self.first_touch += int(self.k.stream_pass(
            self.state, sid, r.step, sord, boff, blocks, self.ws_windows,
            self.s.reuse_cap_steps, self.reuse_hist, jacc, ws, self.caps, self.lru_hits))
        self.step_jaccard.add(jacc)
        if self.per_layer_streams:
            self.jaccard_by_layer.add(r.layer, jacc)
        self.ws.add(ws)
        self.lru_accesses += int(u.sum())

    # -- results ----------------------------------------------------------------------------

    def result(self, n_requests: int, key_mode: str, step_union: bool) -> dict:
        s = self.s
        rec = self.record.dist
        base = len(RECORD_COLUMNS)
        hist = self.reuse_hist
        total = int(hist.sum())
        nz = np.flatnonzero(hist)
        cdf = np.cumsum(hist[nz]) / total if total else np.zeros(0)
        cache_sim = {}
        for c, hits in zip(self.caps.tolist(), self.lru_hits.tolist(), strict=True):
            acc = self.lru_accesses
            cache_sim[str(c)] = {"capacity_blocks": c, "hits": hits, "misses": acc - hits,
                                 "hit_rate": hits / acc if acc else 0.0}
        n_streams = self.streams.count()
        layers = self.unique_by_layer.groups()
        iou_pairs = [{"layers": [g - 1, g], **self.iou_by_layer.dist(g)}
                     for g in self.iou_by_layer.groups()]
        with np.errstate(invalid="ignore", divide="ignore"):
            heat = np.where(self.heat_n > 0, self.heat_sum / np.maximum(self.heat_n, 1), np.nan)
        shared = self.shared.result(per_stream=cache_sim, n_streams=n_streams,
                                    same_keys=self.per_layer_streams and not step_union)
        return {
            "block_size_tokens": self.bs,
            "key_mode": key_mode,
            "step_union": step_union,
            "streams": n_streams,
            "record_stats": {
                "unique_blocks": rec(0),
                "block_span": rec(1),
                "block_density": rec(2),
                "tokens_per_block_mean": rec(3),
                "block_concentration": {"normalized_entropy": rec(4), "gini": rec(5)},
                "recent_locality": {
                    "recent_token_ratio": {str(w): rec(base + j) for j, w in
                                           enumerate(s.recent_token_windows)},
                    "recent_block_ratio": {str(w): rec(base + self.nt + j) for j, w in
                                           enumerate(s.recent_block_windows)},
                    "mean_block_distance": rec(6),
                },
            },
            "temporal_locality": {
                "step_jaccard": self.step_jaccard.to_dict(),
                "reuse_distance_hist_steps": {str(d): int(hist[d]) for d in nz.tolist()},
                "reuse_distance_cdf_steps": [{"reuse_distance_steps": int(d), "cdf": float(c)}
                                             for d, c in zip(nz.tolist(), cdf, strict=True)],
                "first_touch_blocks": self.first_touch,
                "reuse_samples": total,
                "reuse_cap_steps": s.reuse_cap_steps,
            },
            "working_set": {str(w): self.ws.dist(j) for j, w in enumerate(s.ws_windows)},
            "cache_sim": cache_sim,
            "read_amplification": {
                "ratio": self.amp_blocks * self.bs / self.amp_tokens if self.amp_tokens else 0.0,
                "per_record": self.amp_record.to_dict()},
            "cross_layer_overlap": {"iou": self.iou.to_dict(), "by_layer_pair": iou_pairs},
            "shared_cache": shared,
            "by_layer": {
                "layers": layers,
                "unique_blocks_mean": [self.unique_by_layer.mean(g) for g in layers],
                "step_jaccard_mean": ([self.jaccard_by_layer.mean(g) for g in layers]
                                      if self.per_layer_streams else None),
            },
            "unique_blocks_by_decode_step_layer": [
                [None if math.isnan(v) else float(v) for v in row] for row in heat],
            "tokens_per_block_hist": self.tpb_hist.tolist(),
        }
