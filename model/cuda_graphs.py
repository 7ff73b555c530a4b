"""CUDA graphs for the decode step: one launch instead of ~100 kernel launches per layer.

A decode step at 671B shapes is a few hundred small kernels per layer; launched one by one
from Python the CPU, not the GPU, sets the pace (several ms per step for 4 layers). This
module captures ``Transformer.run_span`` for one token per row once per (batch size, key
bucket) and replays it. What makes the step replayable is in the model: the position is a
device tensor (``Span.index``: cache writes by ``index_copy_``, RoPE by ``index_select``), the
indexer scores ``kv_len`` cache rows (the bucket, ``bucket`` positions wide) with the rows
after the query masked, and nothing in the step synchronises with the host (grouped MoE,
``moe_align``, the asynchronous TP rank check).

The tracer's copies are captured too: inside the graph every layer's top-k and scores are
copied into static buffers; after each replay the model hands those to ``tracer.on_topk``
(non-blocking copies into pinned memory, ordered after the replay on the same stream).
Steps whose ``end < index_topk`` (K would change) run eagerly. ``Transformer.cuda_graphs =
False`` turns graphs off; ``tests``/``benchmarks/gpu_fastpath.py`` check replayed steps equal
eager ones.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .model import Span


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    pos: torch.Tensor
    logits: torch.Tensor
    topk: torch.Tensor
    scores: torch.Tensor
    flags: torch.Tensor | None


class _Capture:
    """Stands in for the tracer while capturing: copies each layer's top-k into buffers."""

    def __init__(self, topk: torch.Tensor, scores: torch.Tensor) -> None:
        self.topk, self.scores = topk, scores

    def on_topk(self, layer_id: int, indices: torch.Tensor, scores: torch.Tensor) -> None:
        self.topk[layer_id].copy_(indices)
        self.scores[layer_id].copy_(scores)


class DecodeGraphs:
    """Captured decode steps of one ``Transformer`` (made by it on the first CUDA decode)."""

    bucket = 1024  # key positions per graph: a 16K-context run of 32 steps needs one or two
    max_graphs = 8

    def __init__(self, model) -> None:
        self.model = model
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: OrderedDict[tuple[int, int, bool], _Graph] = OrderedDict()
        self.captures = 0
        self.replays = 0

    def kv_len(self, end: int) -> int:
        return min(-(-end // self.bucket) * self.bucket, self.model.max_seq_len)

    def run(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        from .model import MLA

        model = self.model
        end = start_pos + 1
        # the attention path is baked into a graph: sparse and masked-dense get their own
        key = (tokens.size(0), self.kv_len(end), MLA.sparse_decode)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(tokens, start_pos, key[1])
            self.graphs[key] = g
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        g.tokens.copy_(tokens)
        g.pos.copy_(model.positions[start_pos:end])
        g.graph.replay()
        self.replays += 1
        tracer = model.tracer
        if tracer is not None:
            for layer in range(len(model.layers)):
                tracer.on_topk(layer, g.topk[layer], g.scores[layer])
        model.submit_rank_check(g.flags, start_pos, 1)
        return g.logits.clone()

    def _capture(self, tokens: torch.Tensor, start_pos: int, kv_len: int) -> _Graph:
        model = self.model
        dev = tokens.device
        bsz = tokens.size(0)
        n_layers = len(model.layers)
        k = model.args.index_topk
        static_tokens = tokens.clone()
        pos = model.positions[start_pos : start_pos + 1].clone()
        topk = torch.empty(n_layers, bsz, k, dtype=torch.int64, device=dev)
        scores = torch.empty(n_layers, bsz, k, dtype=torch.float32, device=dev)
        rec = _Capture(topk, scores)
        span = Span(start_pos, start_pos + 1, kv_len, index=pos)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: compiles kernels, writes this step's caches
            for _ in range(2):
                model.run_span(static_tokens, span, None, rec, submit=False)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the tracer's builder thread may touch CUDA (events) meanwhile
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = model.run_span(static_tokens, span, None, rec, submit=False)
        self.captures += 1
        return _Graph(graph, static_tokens, pos, logits, topk, scores, model.last_rank_flags)
