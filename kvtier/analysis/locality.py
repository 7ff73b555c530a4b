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
from kvtier.analysis.stats import Dist, GroupDist


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
        # record_stats
        self.unique_blocks, self.block_span, self.block_density = Dist(), Dist(), Dist()
        self.tokens_per_block_mean, self.entropy, self.gini = Dist(), Dist(), Dist()
        self.recent_token = [Dist() for _ in settings.recent_token_windows]
        self.recent_block = [Dist() for _ in settings.recent_block_windows]
        self.mean_block_distance = Dist()
        # temporal_locality, working_set, cache_sim
        self.step_jaccard = Dist()
        self.reuse_hist = np.zeros(settings.reuse_cap_steps + 1, dtype=np.int64)
        self.first_touch = 0
        self.ws = [Dist() for _ in settings.ws_windows]
        self.lru_hits = np.zeros(self.caps.shape[0], dtype=np.int64)
        self.lru_accesses = 0
        self.streams = StreamIndex(per_layer_streams)
        self.ordinals = StepOrdinals()
        self.state = StreamState(int(self.ws_windows.max()) if self.ws_windows.shape[0] else 1,
                                 self.caps)
        self.jaccard_by_layer = GroupDist()
        # beyond: trace records
        self.iou_state = IoUState()
        self.iou = Dist()
        self.iou_by_layer = GroupDist()  # group = the later layer of the pair
        self.unique_by_layer = GroupDist()
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
        np.add.at(self.heat_sum, (decode_step, r.layer), u)
        np.add.at(self.heat_n, (decode_step, r.layer), 1)
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
        self.unique_blocks.add(u)
        self.block_span.add(span)
        self.block_density.add(u / span)
        self.tokens_per_block_mean.add(k / u)
        h = np.log(k) - slogc / k  # Shannon entropy of the per-block token shares
        with np.errstate(divide="ignore", invalid="ignore"):
            self.entropy.add(np.where(u > 1, h / np.log(np.maximum(u, 2)), 0.0))
        self.gini.add(gini)
        for j, d in enumerate(self.recent_token):
            d.add(r.near[:, j] / k)
        for j, d in enumerate(self.recent_block):
            d.add(nearb[:, j] / u)
        self.mean_block_distance.add(sumdist / u)
        # streams
        sid = self.streams(r.req, r.layer)
        sord = self.ordinals(sid, r.step)
        self.state.prepare(sid, boff, blocks)
        jacc = np.empty(r.n)
        ws = np.zeros((r.n, self.ws_windows.shape[0]), dtype=np.int64)
        self.first_touch += int(self.k.stream_pass(
            self.state, sid, r.step, sord, boff, blocks, self.ws_windows,
            self.s.reuse_cap_steps, self.reuse_hist, jacc, ws))
        self.step_jaccard.add(jacc)
        if self.per_layer_streams:
            self.jaccard_by_layer.add(r.layer, jacc)
        for j, d in enumerate(self.ws):
            d.add(ws[:, j])
        if self.caps.shape[0]:
            self.k.lru_pass(self.state, sid, boff, blocks, self.caps, self.lru_hits)
        self.lru_accesses += int(u.sum())

    # -- results ----------------------------------------------------------------------------

    def result(self, n_requests: int, key_mode: str, step_union: bool) -> dict:
        s = self.s
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
                "unique_blocks": self.unique_blocks.to_dict(),
                "block_span": self.block_span.to_dict(),
                "block_density": self.block_density.to_dict(),
                "tokens_per_block_mean": self.tokens_per_block_mean.to_dict(),
                "block_concentration": {"normalized_entropy": self.entropy.to_dict(),
                                        "gini": self.gini.to_dict()},
                "recent_locality": {
                    "recent_token_ratio": {str(w): d.to_dict() for w, d in
                                           zip(s.recent_token_windows, self.recent_token,
                                               strict=True)},
                    "recent_block_ratio": {str(w): d.to_dict() for w, d in
                                           zip(s.recent_block_windows, self.recent_block,
                                               strict=True)},
                    "mean_block_distance": self.mean_block_distance.to_dict(),
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
            "working_set": {str(w): d.to_dict() for w, d in zip(s.ws_windows, self.ws,
                                                                 strict=True)},
            "cache_sim": cache_sim,
            "read_amplification": {
                "ratio": self.amp_blocks * self.bs / self.amp_tokens if self.amp_tokens else 0.0,
                "per_record": self.amp_record.to_dict()},
            "cross_layer_overlap": {"iou": self.iou.to_dict(), "by_layer_pair": iou_pairs},
            "shared_cache": shared,
            "by_layer": {
                "layers": layers,
                "unique_blocks_mean": [self.unique_by_layer.dist(g)["mean"] for g in layers],
                "step_jaccard_mean": ([self.jaccard_by_layer.dist(g)["mean"] for g in layers]
                                      if self.per_layer_streams else None),
            },
            "unique_blocks_by_decode_step_layer": [
                [None if math.isnan(v) else float(v) for v in row] for row in heat],
            "tokens_per_block_hist": self.tpb_hist.tolist(),
        }
