"""DeepSeek-V3.2-Exp (DSA) inference model, a faithful re-implementation of the upstream v2
``inference/model.py`` (dsa_model.md §3-§7) with a ``v1`` flag, an fp32 ``indexer_exact``
mode and a trace hook after the indexer's top-k.

Where the reference is dense, kvtier runs the same function over the selected positions only:
decode and (chunked) prefill attend to each query's own top-k cache rows (``kernels.sparse_mla``),
the prefill runs in chunks of ``Transformer.prefill_chunk`` queries against the caches (O(S·k)
attention, the indexer never holds more than chunk × S scores), and the routed experts run as
grouped GEMMs (``kernels.fp8_grouped_gemm``) instead of a loop. ``MLA.sparse_decode = False``,
``MLA.sparse_prefill = False`` and ``MoE.grouped = False`` restore the reference's paths; the
tests pin each fast path to its reference. CUDA decode steps replay captured graphs
(``model/cuda_graphs.py``).

Parameter and module names produce exactly the converted checkpoint keys of dsa_model.md §9.
Tensor parallelism follows the reference: the module globals ``world_size`` and ``rank`` are
set from ``torch.distributed`` in ``Transformer.__init__`` and size every shard.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import kernels
from .args import ModelArgs

world_size = 1
rank = 0
block_size = kernels.BLOCK


class TopkMismatchError(RuntimeError):
    """The indexer's top-k differs between tensor-parallel ranks."""


class TopkTracer(Protocol):
    """What the model calls after the indexer's top-k of a decode step (kvtier/trace/tracer.py)."""

    def on_topk(self, layer_id: int, indices: torch.Tensor, scores: torch.Tensor) -> None: ...


def _tp_active() -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


@dataclass
class Span:
    """The positions one forward covers: tokens ``[start, end)`` of every batch row.

    ``index`` (decode): the position as a one-element int64 device tensor, so that cache writes
    and masks read it on the device (a CUDA graph replays with new positions); ``kv_len``:
    the cache rows the indexer scores (``end``, or a graph's bucket, masked past the query);
    ``causal``: a prefill chunk whose keys after each query are masked inside the kernels.
    """

    start: int
    end: int
    kv_len: int
    index: torch.Tensor | None = None
    causal: bool = False

    @classmethod
    def of(cls, start_pos: int | Span, seqlen: int) -> Span:
        if isinstance(start_pos, Span):
            return start_pos
        return cls(start_pos, start_pos + seqlen, start_pos + seqlen)

    @property
    def mask_start(self) -> int | torch.Tensor | None:
        """Position of the first query for the kernels' causal mask (None: no mask)."""
        if self.index is not None:
            return self.index
        return self.start if self.causal else None

    def write(self, cache: torch.Tensor, value: torch.Tensor) -> None:
        """``cache[:b, start:end] = value`` (through ``index`` when set; fp8 as bytes)."""
        bsz = value.size(0)
        if self.index is None:
            cache[:bsz, self.start : self.end] = value
            return
        if cache.dtype == kernels.FP8:
            cache, value = cache.view(torch.uint8), value.view(torch.uint8)
        cache[:bsz].index_copy_(1, self.index, value.to(cache.dtype))


#: per-position weights of the top-k fingerprint (< 2^20, so 2048 int64 products of
#: positions < 2^24 cannot overflow); fixed, so every rank uses the same ones
_FP_WEIGHTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def topk_fingerprint(indices: torch.Tensor) -> torch.Tensor:
    """Two int64 hashes per top-k row (``[rows, 2]``): ``Σ_k idx[k]·w_j[k]`` for two fixed
    random weight vectors. A single differing position always changes both (all weights are
    positive); several cancel in both with probability about 2^-40."""
    k = indices.size(-1)
    key = (k, indices.device)
    if key not in _FP_WEIGHTS:
        g = torch.Generator().manual_seed(0x5EED)
        with torch.inference_mode(False):
            _FP_WEIGHTS[key] = torch.randint(1, 1 << 20, (k, 2), generator=g).to(indices.device)
    return indices.reshape(-1, k) @ _FP_WEIGHTS[key]


# ----------------------------------------------------------------------------- linears
def linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, scale_fmt: str | None
):
    """``x @ weightᵀ``; fp8 weights quantise the activations per 128 and use ``fp8_gemm``."""
    if weight.dtype != kernels.FP8:
        return F.linear(x, weight)
    xq, xs = kernels.act_quant(x.contiguous(), block_size, scale_fmt)
    return kernels.fp8_gemm(xq, xs, weight, scale)


class Linear(nn.Module):
    """Bias-free linear layer with bf16/fp32 weights or e4m3 weights + 128x128 tile scales."""

    dtype = torch.bfloat16
    scale_fmt: str | None = None

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype or Linear.dtype)
        )
        if self.weight.element_size() == 1:
            shape = (-(-out_features // block_size), -(-in_features // block_size))
            self.scale = nn.Parameter(torch.empty(*shape, dtype=torch.float32))
        else:
            self.register_parameter("scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.scale, self.scale_fmt)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


class ColumnParallelLinear(Linear):
    """Output features split across ranks; no gather (the consumer works on its shard)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None):
        if out_features % world_size:
            raise ValueError(
                f"out_features {out_features} not divisible by world_size {world_size}"
            )
        self.part_out_features = out_features // world_size
        super().__init__(in_features, self.part_out_features, dtype)


class RowParallelLinear(Linear):
    """Input features split across ranks; partial sums all-reduced in fp32."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        reduce_output: bool = True,
        dtype: torch.dtype | None = None,
    ):
        if in_features % world_size:
            raise ValueError(f"in_features {in_features} not divisible by world_size {world_size}")
        self.part_in_features = in_features // world_size
        self.reduce_output = reduce_output
        super().__init__(self.part_in_features, out_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.scale, self.scale_fmt)
        if self.reduce_output and _tp_active():
            y = y.float()
            dist.all_reduce(y)
        return y.type_as(x)


class ParallelEmbedding(nn.Module):
    """Vocabulary split across ranks; out-of-shard ids give zeros, then one all-reduce."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        if vocab_size % world_size:
            raise ValueError(f"vocab_size {vocab_size} not divisible by world_size {world_size}")
        self.vocab_size = vocab_size
        self.dim = dim
        self.part_vocab_size = vocab_size // world_size
        self.vocab_start_idx = rank * self.part_vocab_size
        self.vocab_end_idx = self.vocab_start_idx + self.part_vocab_size
        self.weight = nn.Parameter(torch.empty(self.part_vocab_size, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _tp_active():
            return F.embedding(x, self.weight)
        outside = (x < self.vocab_start_idx) | (x >= self.vocab_end_idx)
        y = F.embedding((x - self.vocab_start_idx).masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(y)
        return y


# ------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """fp32 RMSNorm; with ``residual`` it first adds it in fp32 (fused residual)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    """fp32 LayerNorm with bias (the indexer's ``k_norm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.dim,), self.weight, self.bias, self.eps).type_as(x)


# -------------------------------------------------------------------------------- RoPE
def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotary frequencies ``f_i`` (fp32, [rope_dim/2]) with the YaRN correction."""
    dim = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.yarn:
        low, high = args.yarn_range
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def precompute_freqs_cis(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """complex64 ``[max_seq_len, rope_dim/2]`` with ``exp(j·p·f_i)``."""
    freqs = rope_frequencies(args).to(device)
    t = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(
    x: torch.Tensor, freqs_cis: torch.Tensor, interleaved: bool = True
) -> torch.Tensor:
    """Rotate ``x[b, s, h, rope_dim]`` by ``freqs_cis[s, rope_dim/2]`` in fp32.

    interleaved: pairs (x[2i], x[2i+1]) (MLA, v1 indexer); otherwise pairs (x[i], x[i+d/2])
    (NeoX rotate-half, the v2 indexer).
    """
    return kernels.rotary(x, freqs_cis, interleaved)


# ----------------------------------------------------------------------------- indexer
class Indexer(nn.Module):
    """DSA lightning indexer: scores every cached position and picks the top-k.

    Replicated on every TP rank (all ``index_n_heads`` heads), with an fp8 key cache. In
    ``indexer_exact`` mode it computes HF transformers' fp32 formula instead (no Hadamard, no
    fp8) and keeps an fp32 key cache.
    """

    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.dim = args.dim
        self.n_heads = args.index_n_heads
        self.head_dim = args.index_head_dim
        self.rope_head_dim = args.qk_rope_head_dim
        self.index_topk = args.index_topk
        self.exact = args.indexer_exact
        self.interleaved = args.v1
        self.v1 = args.v1
        self.scale_fmt = args.scale_fmt
        self.softmax_scale = self.head_dim**-0.5
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = Linear(self.dim, self.head_dim)
        self.k_norm = LayerNorm(self.head_dim)
        # the checkpoint stores weights_proj in bf16; v2 keeps it in fp32 and feeds x.float()
        wp_dtype = torch.get_default_dtype() if args.v1 else torch.float32
        self.weights_proj = Linear(self.dim, self.n_heads, dtype=wp_dtype)
        cache_dtype = torch.float32 if self.exact else kernels.FP8
        n_scales = max(1, self.head_dim // block_size)
        shape = (args.max_batch_size, args.max_seq_len)
        self.register_buffer(
            "k_cache", torch.zeros(*shape, self.head_dim, dtype=cache_dtype), persistent=False
        )
        self.register_buffer(
            "k_scale_cache", torch.ones(*shape, n_scales, dtype=torch.float32), persistent=False
        )

    def _rope(self, t: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        pe, nope = torch.split(t, [self.rope_head_dim, self.head_dim - self.rope_head_dim], dim=-1)
        pe = apply_rotary_emb(pe, freqs_cis, self.interleaved)
        return torch.cat([pe, nope], dim=-1)

    def _head_weights(self, x: torch.Tensor) -> torch.Tensor:
        xin = x if self.v1 else x.float()  # v1 scales in the projection's (bf16) dtype
        w = self.weights_proj(xin.to(self.weights_proj.weight.dtype)) * self.n_heads**-0.5
        return w.float()

    def forward(
        self,
        x: torch.Tensor,
        qr: torch.Tensor,
        start_pos: int | Span,
        freqs_cis: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(indices int64 [b,s,K], scores fp32 [b,s,K])`` with K = min(topk, end).

        Scores cover cache rows ``[0, kv_len)``; the reference's ``mask`` (whole-prompt
        prefill) is added as upstream, a ``Span``'s causal mask is applied in ``fp8_index``.
        """
        bsz, seqlen, _ = x.shape
        span = Span.of(start_pos, seqlen)
        q = self._rope(self.wq_b(qr).view(bsz, seqlen, self.n_heads, self.head_dim), freqs_cis)
        k = self._rope(self.k_norm(self.wk(x)).unsqueeze(2), freqs_cis).squeeze(2)
        weights = self._head_weights(x)  # [b, s, h]
        if self.exact:
            span.write(self.k_cache, k.float())
            keys = self.k_cache[:bsz, : span.kv_len]  # [b, t, d]
            logits = torch.relu(q.float().flatten(1, 2) @ keys.transpose(1, 2) * self.softmax_scale)
            logits = logits.view(bsz, seqlen, self.n_heads, span.kv_len)
            score = (weights.unsqueeze(-2) @ logits).squeeze(-2)
            if span.mask_start is not None:
                masked = kernels.causal_mask(span.mask_start, seqlen, span.kv_len, x.device)
                score = score.masked_fill(masked, float("-inf"))
        else:
            q8, q_s = kernels.act_quant(
                kernels.hadamard(q).contiguous(), block_size, self.scale_fmt
            )
            k8, k_s = kernels.act_quant(
                kernels.hadamard(k).contiguous(), block_size, self.scale_fmt
            )
            span.write(self.k_cache, k8)
            span.write(self.k_scale_cache, k_s)
            w = weights.unsqueeze(-1) * q_s * self.softmax_scale  # q's dequant scale folded in
            score = kernels.fp8_index(
                q8,
                w.squeeze(-1),
                self.k_cache[:bsz, : span.kv_len],
                self.k_scale_cache[:bsz, : span.kv_len].squeeze(-1),
                span.mask_start,
            )
        if mask is not None:
            score = score + mask
        values, indices = score.topk(min(self.index_topk, span.end), dim=-1)
        # TP: each rank hashes its top-k; Transformer compares the hashes across ranks
        self.fingerprint = topk_fingerprint(indices) if _tp_active() else None
        return indices, values

    fingerprint: torch.Tensor | None = None


# --------------------------------------------------------------------------------- MLA
class MLA(nn.Module):
    """Multi-head latent attention with a latent KV cache (kv_lora_rank + rope part).

    Every forward without the reference's prefill ``mask`` (decode, and prefill chunks at any
    start position) runs in absorbed (MQA) mode over ONLY each query's top-k selected cache
    rows (``kernels.sparse_mla``): O(K) per head instead of the reference's masked softmax over
    all positions. ``sparse_decode=False`` restores the reference's masked-dense decode, and
    the reference's prefill (masked-dense MHA over the chunk, start 0) runs when a ``mask`` is
    given (``Transformer`` does so with ``sparse_prefill=False``); all give the same function.
    """

    sparse_decode = True
    #: None: chunked sparse prefill for CUDA inputs and for prompts continued at start_pos > 0
    #: (which the reference cannot do); the reference's masked-dense prefill otherwise, so CPU
    #: runs keep the reference's numerics bit for bit (tests/test_reference_numerics.py)
    sparse_prefill: bool | None = None

    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.dim = args.dim
        self.n_heads = args.n_heads
        if args.n_heads % world_size:
            raise ValueError(f"n_heads {args.n_heads} not divisible by world_size {world_size}")
        self.n_local_heads = args.n_heads // world_size
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_nope_head_dim + args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.v1 = args.v1
        self.fake_quant_latent = not args.v1 and not args.indexer_exact
        self.scale_fmt = args.scale_fmt
        self.softmax_scale = args.softmax_scale

        self.wq_a = Linear(self.dim, self.q_lora_rank)
        self.q_norm = RMSNorm(self.q_lora_rank)
        self.wq_b = ColumnParallelLinear(self.q_lora_rank, self.n_heads * self.qk_head_dim)
        self.wkv_a = Linear(self.dim, self.kv_lora_rank + self.qk_rope_head_dim)
        self.kv_norm = RMSNorm(self.kv_lora_rank)
        self.wkv_b = ColumnParallelLinear(
            self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
        )
        self.wo = RowParallelLinear(self.n_heads * self.v_head_dim, self.dim)
        self.indexer = Indexer(args, layer_id)

        shape = (args.max_batch_size, args.max_seq_len)
        self.register_buffer("kv_cache", torch.zeros(*shape, self.kv_lora_rank), persistent=False)
        self.register_buffer(
            "pe_cache", torch.zeros(*shape, self.qk_rope_head_dim), persistent=False
        )
        self._wkv_b_cache: tuple[tuple[int, int], torch.Tensor] | None = None

    def _wkv_b(self) -> torch.Tensor:
        """``wkv_b`` as ``[H, nope + v, kv_lora]``, tile-dequantised once per weight version."""
        w = self.wkv_b.weight
        if self.wkv_b.scale is None:
            return w.view(self.n_local_heads, -1, self.kv_lora_rank)
        key = (w._version, self.wkv_b.scale._version)
        if self._wkv_b_cache is None or self._wkv_b_cache[0] != key:
            deq = kernels.dequant_blocks(w, self.wkv_b.scale, torch.get_default_dtype())
            self._wkv_b_cache = (key, deq)
        return self._wkv_b_cache[1].view(self.n_local_heads, -1, self.kv_lora_rank)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int | Span,
        freqs_cis: torch.Tensor,
        mask: torch.Tensor | None,
        tracer: TopkTracer | None = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        span = Span.of(start_pos, seqlen)
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(bsz, seqlen, self.n_local_heads, self.qk_head_dim)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis)
        if self.fake_quant_latent:  # v2 simulates the deployed fp8 latent cache
            kv8, kv_s = kernels.act_quant(kv.contiguous(), block_size, self.scale_fmt)
            kv = (
                (kv8.float().unflatten(-1, (-1, block_size)) * kv_s.unsqueeze(-1))
                .flatten(-2)
                .to(kv.dtype)
            )
        span.write(self.kv_cache, kv)
        span.write(self.pe_cache, k_pe.squeeze(2))
        # v1: score einsums and softmax in fp32, probabilities cast back, the q_nope·wkv_b,
        # P·V and output einsums in the model dtype; v2: everything in the model dtype
        cdt = torch.float32 if self.v1 else x.dtype

        topk, topk_scores = self.indexer(x, qr, span, freqs_cis, mask)
        if mask is not None:  # the reference's MHA prefill over the current chunk (start 0)
            q = torch.cat([q_nope, q_pe], dim=-1)
            kvb = self.wkv_b(kv).view(
                bsz, seqlen, self.n_local_heads, self.qk_nope_head_dim + self.v_head_dim
            )
            k_nope, v = torch.split(kvb, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_local_heads, -1)], dim=-1)
            scores = torch.einsum("bshd,bthd->bsht", q.to(cdt), k.to(cdt)) * self.softmax_scale
            index_mask = torch.full((bsz, seqlen, seqlen), float("-inf"), device=x.device).scatter_(
                -1, topk, 0
            )
            scores = scores + (index_mask + mask).unsqueeze(2).to(scores.dtype)
            out = torch.einsum("bsht,bthd->bshd", scores.softmax(dim=-1).to(x.dtype), v)
            return self.wo(out.flatten(2))
        # absorbed MQA: decode, and prefill chunks against the caches
        if tracer is not None and seqlen == 1:
            tracer.on_topk(self.layer_id, topk[:, 0, :], topk_scores[:, 0, :])
        wkv_b = self._wkv_b()
        q_abs = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, : self.qk_nope_head_dim])
        if self.sparse_decode or seqlen > 1:
            o = kernels.sparse_mla(
                torch.cat([q_abs, q_pe.to(q_abs.dtype)], dim=-1),
                self.kv_cache[:bsz],
                self.pe_cache[:bsz],
                topk,
                span.start if span.index is None else span.index,
                self.softmax_scale,
                score_dtype=cdt,
            )
        else:  # the reference: dense scores over every cached position, masked to the top-k
            n_keys = span.kv_len  # = end; a graph's bucket: rows past the query are never selected
            kv_all = self.kv_cache[:bsz, :n_keys]
            scores = (
                torch.einsum("bshc,btc->bsht", q_abs.to(cdt), kv_all.to(cdt))
                + torch.einsum(
                    "bshr,btr->bsht", q_pe.to(cdt), self.pe_cache[:bsz, :n_keys].to(cdt)
                )
            ) * self.softmax_scale
            index_mask = torch.full((bsz, 1, n_keys), float("-inf"), device=x.device).scatter_(
                -1, topk, 0
            )
            scores = scores + index_mask.unsqueeze(2).to(scores.dtype)
            o = torch.einsum("bsht,btc->bshc", scores.softmax(dim=-1).to(x.dtype), kv_all)
        out = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, -self.v_head_dim :])
        return self.wo(out.flatten(2))


# ------------------------------------------------------------------------- FFN and MoE
class MLP(nn.Module):
    """SwiGLU feed-forward, column/row parallel (dense layers and shared experts)."""

    def __init__(self, dim: int, inter_dim: int, reduce_output: bool = True):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, inter_dim)
        self.w2 = RowParallelLinear(inter_dim, dim, reduce_output=reduce_output)
        self.w3 = ColumnParallelLinear(dim, inter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2((F.silu(self.w1(x).float()) * self.w3(x).float()).type_as(x))


class Expert(nn.Module):
    """One routed expert: a whole (not TP-split) SwiGLU owned by a single rank."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2((F.silu(self.w1(x).float()) * self.w3(x).float()).type_as(x))


class Gate(nn.Module):
    """Router: sigmoid/softmax scores, correction bias, group-limited top-k, route scale."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dim = args.dim
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.score_func = args.score_func
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        if args.has_gate_bias:  # reference: only dim == 7168 (ModelArgs.gate_bias)
            self.bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x[T, dim]`` -> (weights fp32 [T, topk], expert indices int64 [T, topk])."""
        scores = F.linear(x.float(), self.weight.float())
        scores = scores.softmax(dim=-1) if self.score_func == "softmax" else scores.sigmoid()
        original = scores
        if self.bias is not None:
            scores = scores + self.bias
        if self.n_groups > 1:
            grouped = scores.view(x.size(0), self.n_groups, -1)
            if self.bias is None:
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            scores = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
        indices = scores.topk(self.topk, dim=-1)[1]
        weights = original.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, indices


class MoE(nn.Module):
    """Routed experts (whole experts split by rank) plus TP-sharded shared experts.

    With fp8 weights the local experts' ``w1``/``w3`` live in one ``[E, 2·inter, dim]`` tensor
    and ``w2`` in one ``[E, dim, inter]`` tensor (each expert's parameters are views into them,
    so the checkpoint keys and ``load_state_dict`` are unchanged); the grouped path
    (``grouped``: None = on for CUDA inputs) sorts the (token, expert) pairs by expert and runs
    one grouped fp8 GEMM per projection, the reference path loops over the used experts.
    """

    grouped: bool | None = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dim = args.dim
        if args.n_routed_experts % world_size:
            raise ValueError(
                f"n_routed_experts {args.n_routed_experts} not divisible by world_size {world_size}"
            )
        self.n_routed_experts = args.n_routed_experts
        self.n_local_experts = args.n_routed_experts // world_size
        self.n_activated_experts = args.n_activated_experts
        self.moe_inter_dim = args.moe_inter_dim
        self.experts_start_idx = rank * self.n_local_experts
        self.experts_end_idx = self.experts_start_idx + self.n_local_experts
        self.gate = Gate(args)
        self._stacked: tuple[torch.Tensor, ...] | None = None
        stack = Linear.dtype == kernels.FP8 and self.n_local_experts > 0
        if stack:
            e, i, d = self.n_local_experts, args.moe_inter_dim, args.dim
            nb = lambda n: -(-n // block_size)  # noqa: E731
            self._stacked = (
                torch.empty(e, 2 * i, d, dtype=kernels.FP8),
                torch.empty(e, nb(2 * i), nb(d), dtype=torch.float32),
                torch.empty(e, d, i, dtype=kernels.FP8),
                torch.empty(e, nb(d), nb(i), dtype=torch.float32),
            )
        experts: list[Expert | None] = []
        for j in range(self.n_routed_experts):
            if not self.experts_start_idx <= j < self.experts_end_idx:
                experts.append(None)
                continue
            expert = Expert(args.dim, args.moe_inter_dim)
            if stack:  # re-point its parameters into the stacked tensors (one expert at a time)
                self._adopt(expert, j - self.experts_start_idx)
            experts.append(expert)
        self.experts = nn.ModuleList(experts)
        self.shared_experts = MLP(
            args.dim, args.n_shared_experts * args.moe_inter_dim, reduce_output=False
        )

    def _adopt(self, expert: Expert, j: int) -> None:
        assert self._stacked is not None
        w13, s13, w2, s2 = self._stacked
        i, nbi = self.moe_inter_dim, self.moe_inter_dim // block_size
        for lin, w, sc in ((expert.w1, w13[j, :i], s13[j, :nbi]),
                           (expert.w3, w13[j, i:], s13[j, nbi:]),
                           (expert.w2, w2[j], s2[j])):  # fmt: skip
            w.copy_(lin.weight.detach())
            sc.copy_(lin.scale.detach())
            lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
            lin.scale = nn.Parameter(sc, requires_grad=lin.scale.requires_grad)

    def stacked_weights(self) -> tuple[torch.Tensor, ...] | None:
        """``(w13, s13, w2, s2)``; re-stacked if the expert parameters were moved (``.to()``)."""
        if self._stacked is None:
            return None
        first = self.experts[self.experts_start_idx]
        last = self.experts[self.experts_end_idx - 1]
        w13, _, w2, _ = self._stacked
        if (first.w1.weight.data_ptr() != w13[0].data_ptr()
                or last.w2.weight.data_ptr() != w2[-1].data_ptr()):  # fmt: skip
            dev = first.w1.weight.device
            self._stacked = tuple(torch.empty_like(t, device=dev) for t in self._stacked)
            for j in range(self.n_local_experts):
                self._adopt(self.experts[self.experts_start_idx + j], j)
        return self._stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(-1, self.dim)
        weights, indices = self.gate(x)
        grouped = self.grouped if self.grouped is not None else x.is_cuda
        if grouped and self._stacked is not None:
            y = self._grouped(x, weights, indices)
        else:
            y = self._loop(x, weights, indices)
        y += self.shared_experts(x)
        if _tp_active():
            dist.all_reduce(y)
        return y.type_as(x).view(shape)

    def _loop(self, x, weights, indices) -> torch.Tensor:
        """The reference: one iteration per used local expert (host sync for the list)."""
        y = torch.zeros_like(x, dtype=torch.float32)
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts)
        local = counts[self.experts_start_idx : self.experts_end_idx].nonzero().flatten()
        for i in (local + self.experts_start_idx).tolist():
            rows, slot = torch.where(indices == i)
            y.index_add_(0, rows, self.experts[i](x[rows]) * weights[rows, slot, None])
        return y

    def _grouped(self, x, weights, indices) -> torch.Tensor:
        """All local experts in two grouped fp8 GEMMs, no host synchronisation: pairs sorted by
        expert (``kernels.moe_align``), ``w1|w3`` on each pair's token row, SwiGLU, ``w2``,
        then each token sums its pairs' outputs times their routing weights (fp32)."""
        w13, s13, w2, s2 = self.stacked_weights()
        n_tok, topk = indices.shape
        local = indices - self.experts_start_idx
        local = torch.where((local >= 0) & (local < self.n_local_experts), local, -1)
        block_m = kernels.grouped_block_m(n_tok * topk, self.n_local_experts)
        slot_pair, block_expert, pair_slot = kernels.moe_align(
            local.flatten(), self.n_local_experts, block_m
        )
        rows = torch.where(slot_pair >= 0, slot_pair // topk, -1).to(torch.int32)
        xq, xs = kernels.act_quant(x.contiguous(), block_size, Linear.scale_fmt)
        h13 = kernels.fp8_grouped_gemm(xq, xs, rows, w13, s13, block_expert, block_m)
        i = self.moe_inter_dim
        h = (F.silu(h13[:, :i].float()) * h13[:, i:].float()).type_as(x)
        hq, hs = kernels.act_quant(h, block_size, Linear.scale_fmt)
        out = kernels.fp8_grouped_gemm(hq, hs, None, w2, s2, block_expert, block_m)
        out = torch.cat([out, out.new_zeros(1, out.size(1))])  # row R: pairs of other ranks
        picked = out[pair_slot].float().view(n_tok, topk, -1)
        return (picked * weights.unsqueeze(-1)).sum(dim=1)


# ----------------------------------------------------------------------- block, model
class Block(nn.Module):
    """attn_norm -> MLA -> ffn_norm (fused residual) -> MLP or MoE."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attn = MLA(args, layer_id)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args)
        self.attn_norm = RMSNorm(args.dim)
        self.ffn_norm = RMSNorm(args.dim)

    def forward(self, x, residual, start_pos, freqs_cis, mask, tracer=None):
        if residual is None:
            x, residual = self.attn_norm(x), x
        else:
            x, residual = self.attn_norm(x, residual)
        x = self.attn(x, start_pos, freqs_cis, mask, tracer)
        x, residual = self.ffn_norm(x, residual)
        return self.ffn(x), residual


_DEFAULT_DTYPE_FOR = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Transformer(nn.Module):
    """Embedding -> blocks -> norm -> fp32 head on the last position (``[b, vocab]`` logits).

    ``tracer`` (default None) receives ``on_topk(layer_id, indices [B,K], scores [B,K])`` from
    every layer of every decode forward (s == 1); prefill is never traced.

    Prefill (s > 1) runs in chunks of ``prefill_chunk`` tokens at any ``start_pos`` (the
    reference: one masked-dense forward at start 0, restored by ``MLA.sparse_prefill=False``).
    On CUDA, decode steps with ``end >= index_topk`` replay CUDA graphs (``cuda_graphs``).
    Under tensor parallelism every forward (every ``rank_check_every``-th; 0: off, with a
    warning) hashes each layer's top-k on every rank and compares the hashes with one
    all-reduce; the host reads the result at the start of the next forward, or in
    ``check_ranks()``, so no step waits for it. A mismatch raises ``TopkMismatchError`` on
    every rank, naming layer, step and row.
    """

    prefill_chunk = 2048
    cuda_graphs = True
    rank_check_every = 1

    def __init__(self, args: ModelArgs):
        global world_size, rank
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        want = _DEFAULT_DTYPE_FOR.get(args.dtype)
        if want is not None and torch.get_default_dtype() != want:
            raise ValueError(
                f"field 'dtype' is {args.dtype!r} but torch's default dtype is "
                f"{torch.get_default_dtype()}; call torch.set_default_dtype({want}) first"
            )
        Linear.dtype = {"fp8": kernels.FP8, "bf16": torch.bfloat16, "fp32": torch.float32}[
            args.dtype
        ]
        Linear.scale_fmt = args.scale_fmt
        super().__init__()
        self.args = args
        self.max_seq_len = args.max_seq_len
        self.max_batch_size = args.max_batch_size
        self.world_size, self.rank = world_size, rank
        self.tracer: TopkTracer | None = None
        self.embed = ParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList([Block(i, args) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim)
        # the checkpoint stores head in bf16; fp32 here so the logits are computed in fp32
        self.head = ColumnParallelLinear(args.dim, args.vocab_size, dtype=torch.float32)
        self.register_buffer("freqs_cis", precompute_freqs_cis(args), persistent=False)
        self.register_buffer("positions", torch.arange(args.max_seq_len), persistent=False)
        self._graphs = None  # cuda_graphs.DecodeGraphs, made on the first CUDA decode
        self._rank_pending: deque = deque()
        self._forwards = 0
        self._warned_no_check = False

    def resize_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Re-allocate every KV cache as ``[max_batch_size, max_seq_len, ...]`` (contents
        dropped): one model serves a batch of 8 at 16K and then one 128K sequence without
        holding both sizes. Refused where it would change YaRN (the attention scale)."""
        new = ModelArgs.from_dict({**self.args.to_dict(), "max_batch_size": max_batch_size,
                                   "max_seq_len": max_seq_len})  # fmt: skip
        if new.yarn != self.args.yarn:
            raise ValueError(f"max_seq_len {max_seq_len}: YaRN would switch {'on' if new.yarn else 'off'} "
                             f"(it applies above original_seq_len {self.args.original_seq_len})")
        dev = self.freqs_cis.device
        for layer in self.layers:
            for mod, names in ((layer.attn, ("kv_cache", "pe_cache")),
                               (layer.attn.indexer, ("k_cache", "k_scale_cache"))):  # fmt: skip
                for name in names:
                    old = getattr(mod, name)
                    setattr(mod, name, None)  # free first: the two sizes never coexist
                    buf = torch.zeros(max_batch_size, max_seq_len, *old.shape[2:], dtype=old.dtype,
                                      device=dev)  # fmt: skip
                    if name == "k_scale_cache":
                        buf.fill_(1.0)
                    mod.register_buffer(name, buf, persistent=False)
                    del old
        self.args = new
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.register_buffer("freqs_cis", precompute_freqs_cis(new, dev), persistent=False)
        self.register_buffer("positions", torch.arange(max_seq_len, device=dev), persistent=False)
        self._graphs = None  # captured graphs point at the old caches

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        if seqlen > 1 and start_pos != 0 and MLA.sparse_prefill is False:
            raise ValueError(
                f"prefill of {seqlen} tokens at start_pos {start_pos}: the reference's "
                "masked-dense prefill (MLA.sparse_prefill = False) runs only at start_pos 0"
            )
        if start_pos + seqlen > self.max_seq_len:
            raise ValueError(
                f"position {start_pos + seqlen} exceeds max_seq_len {self.max_seq_len}"
            )
        if bsz > self.max_batch_size:
            raise ValueError(f"batch of {bsz} exceeds max_batch_size {self.max_batch_size}")
        self._poll_ranks(wait=False)
        end = start_pos + seqlen
        if seqlen == 1:
            if self._use_graphs(tokens, end):
                if self._graphs is None:
                    from .cuda_graphs import DecodeGraphs

                    self._graphs = DecodeGraphs(self)
                return self._graphs.run(tokens, start_pos)
            span = Span(start_pos, end, end, index=self.positions[start_pos:end])
            return self.run_span(tokens, span, None, self.tracer)
        sparse = MLA.sparse_prefill
        if sparse is None:
            sparse = tokens.is_cuda or start_pos > 0
        if not sparse:  # the reference: one masked-dense forward at start 0
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device).triu_(1)
            return self.run_span(tokens, Span(0, seqlen, seqlen), mask, None)
        logits = None
        for c0 in range(0, seqlen, self.prefill_chunk):
            c1 = min(seqlen, c0 + self.prefill_chunk)
            span = Span(start_pos + c0, start_pos + c1, start_pos + c1, causal=True)
            logits = self.run_span(tokens[:, c0:c1], span, None, None)
        return logits

    def _use_graphs(self, tokens: torch.Tensor, end: int) -> bool:
        return (
            self.cuda_graphs
            and tokens.is_cuda
            and end >= self.args.index_topk
            and torch.cuda.is_current_stream_capturing() is False
        )

    def run_span(
        self,
        tokens: torch.Tensor,
        span: Span,
        mask: torch.Tensor | None,
        tracer: TopkTracer | None,
        submit: bool = True,
    ) -> torch.Tensor:
        """One forward over ``span`` (no validation; ``forward`` is the entry point).
        ``submit=False`` (graph capture) leaves the rank-check flags in ``last_rank_flags``."""
        if span.index is not None:  # (as real pairs: index_select of complex is not everywhere)
            pairs = torch.view_as_real(self.freqs_cis).index_select(0, span.index)
            freqs_cis = torch.view_as_complex(pairs)
        else:
            freqs_cis = self.freqs_cis[span.start : span.end]
        h, residual = self.embed(tokens), None
        for layer in self.layers:
            h, residual = layer(h, residual, span, freqs_cis, mask, tracer)
        h, _ = self.norm(h, residual)
        logits = self._head(h[:, -1].float())
        self.last_rank_flags = None
        if _tp_active():
            parts = [torch.empty_like(logits) for _ in range(world_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
            self.last_rank_flags = self._rank_check_flags()
            if submit:
                self.submit_rank_check(self.last_rank_flags, span.start, tokens.size(1))
        return logits

    last_rank_flags: torch.Tensor | None = None
    _head_shadow: tuple | None = None

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 head. On CUDA, when every weight is exactly a bf16 value (checkpoints
        store the head in bf16), a bf16 copy is read instead (``kernels.linear_bf16w``: fp32
        math, half the bytes; the fp32 head is a quarter of a 4-layer decode step), for one row
        (batch 1: H200 0.45 vs 0.87 ms; at 8 rows the kernel re-reads the weights per row and
        is 2x slower than cuBLAS). Checked once per weight version (one host sync); otherwise
        the fp32 GEMM as the reference."""
        w = self.head.weight
        if x.size(0) != 1 or not x.is_cuda:  # measured faster than cuBLAS fp32 at one row only
            return self.head(x)
        if torch.cuda.is_current_stream_capturing() and self._head_shadow is None:
            return self.head(x)
        key = (w.data_ptr(), w._version)
        if self._head_shadow is None or self._head_shadow[0] != key:
            wb = w.detach().to(torch.bfloat16)
            self._head_shadow = (key, wb if torch.equal(wb.float(), w.detach()) else None)
        shadow = self._head_shadow[1]
        return self.head(x) if shadow is None else kernels.linear_bf16w(x, shadow)

    # ------------------------------------------------------------- TP top-k rank check
    def _rank_check_flags(self) -> torch.Tensor | None:
        """All-reduce (MAX) each layer's top-k hashes and their negation: a row differs on
        some rank iff max != -max(-h), i.e. max != min. Returns the ``[layers, rows]``
        mismatch flags on the device; nothing waits for them here (inside a CUDA graph the
        all-reduce is captured with the rest of the step)."""
        self._forwards += 1
        every = self.rank_check_every
        if every <= 0:
            if not self._warned_no_check:
                warnings.warn("Transformer.rank_check_every <= 0: the cross-rank top-k check "
                              "is off", stacklevel=3)  # fmt: skip
                self._warned_no_check = True
            return None
        if (self._forwards - 1) % every:
            return None
        fps = [layer.attn.indexer.fingerprint for layer in self.layers]
        if any(f is None for f in fps):
            return None
        hashes = torch.stack(fps)  # [L, rows, 2]
        both = torch.cat([hashes, -hashes])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        n = len(fps)
        return (both[:n] != -both[n:]).any(-1)

    def submit_rank_check(self, flags: torch.Tensor | None, start: int, seqlen: int) -> None:
        """Queue a forward's device-side flags for a later host check: a non-blocking copy
        into pinned memory and an event, read by ``_poll_ranks``."""
        if flags is None:
            return
        event = None
        host = flags
        if flags.is_cuda:
            host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._rank_pending.append((host, event, start, seqlen))

    def _poll_ranks(self, wait: bool) -> None:
        """Check the queued flags whose copies are complete (all of them if ``wait``)."""
        while self._rank_pending:
            host, event, start, seqlen = self._rank_pending[0]
            if event is not None and not wait and not event.query():
                return
            self._rank_pending.popleft()
            if event is not None:
                event.synchronize()
            if bool(host.any()):
                self._rank_pending.clear()
                layer, row = (int(v) for v in host.nonzero()[0])
                b, i = divmod(row, seqlen)
                raise TopkMismatchError(
                    f"indexer top-k differs between tensor-parallel ranks at layer {layer}, "
                    f"step {start + i} (start_pos {start}); rank {rank}: batch row {b} "
                    f"(checked after the forward, so later steps may have run)"
                )

    def check_ranks(self) -> None:
        """Wait for every queued cross-rank top-k check and raise ``TopkMismatchError`` on a
        mismatch (``generate`` calls this at the end; each forward checks what is done)."""
        self._poll_ranks(wait=True)
