"""DeepSeek-V3.2-Exp (DSA) inference model, a faithful re-implementation of the upstream v2
``inference/model.py`` (dsa_model.md §3-§7) with a ``v1`` flag, an fp32 ``indexer_exact``
mode, a sparse (gathered top-k) decode and a trace hook after the indexer's top-k.

Parameter and module names produce exactly the converted checkpoint keys of dsa_model.md §9.
Tensor parallelism follows the reference: the module globals ``world_size`` and ``rank`` are
set from ``torch.distributed`` in ``Transformer.__init__`` and size every shard.
"""

from __future__ import annotations

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

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        dtype = x.dtype
        if residual is None:
            return self._norm(x.float()).to(dtype)
        r = x.float() + residual.float()
        return self._norm(r).to(dtype), r.to(dtype)


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
    dtype, shape = x.dtype, x.shape
    xf = x.float()
    if not interleaved:
        xf = xf.view(*shape[:-1], 2, -1).transpose(-1, -2)
    xc = torch.view_as_complex(xf.reshape(*shape[:-1], -1, 2).contiguous())
    y = torch.view_as_real(xc * freqs_cis.view(1, x.size(1), 1, -1)).flatten(-2)
    if not interleaved:
        y = torch.cat([y[..., 0::2], y[..., 1::2]], dim=-1)
    return y.to(dtype)


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
        start_pos: int,
        freqs_cis: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(indices int64 [b,s,K], scores fp32 [b,s,K])`` with K = min(topk, end)."""
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        q = self._rope(self.wq_b(qr).view(bsz, seqlen, self.n_heads, self.head_dim), freqs_cis)
        k = self._rope(self.k_norm(self.wk(x)).unsqueeze(2), freqs_cis).squeeze(2)
        weights = self._head_weights(x)  # [b, s, h]
        if self.exact:
            self.k_cache[:bsz, start_pos:end_pos] = k.float()
            keys = self.k_cache[:bsz, :end_pos]  # [b, t, d]
            logits = torch.relu(q.float().flatten(1, 2) @ keys.transpose(1, 2) * self.softmax_scale)
            logits = logits.view(bsz, seqlen, self.n_heads, end_pos)
            score = (weights.unsqueeze(-2) @ logits).squeeze(-2)
        else:
            q8, q_s = kernels.act_quant(
                kernels.hadamard(q).contiguous(), block_size, self.scale_fmt
            )
            k8, k_s = kernels.act_quant(
                kernels.hadamard(k).contiguous(), block_size, self.scale_fmt
            )
            self.k_cache[:bsz, start_pos:end_pos] = k8
            self.k_scale_cache[:bsz, start_pos:end_pos] = k_s
            w = weights.unsqueeze(-1) * q_s * self.softmax_scale  # q's dequant scale folded in
            score = kernels.fp8_index(
                q8,
                w.squeeze(-1),
                self.k_cache[:bsz, :end_pos],
                self.k_scale_cache[:bsz, :end_pos].squeeze(-1),
            )
        if mask is not None:
            score = score + mask
        values, indices = score.topk(min(self.index_topk, end_pos), dim=-1)
        if _tp_active():
            self._check_ranks(indices, start_pos)
        return indices, values

    def _check_ranks(self, indices: torch.Tensor, start_pos: int) -> None:
        """Compare with rank 0's top-k; every rank raises on a mismatch (no rank hangs)."""
        ref = indices.clone()
        dist.broadcast(ref, src=0)
        bad = (ref != indices).any(-1)  # [b, s]
        flag = bad.any().to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            where = bad.nonzero()[0].tolist() if bad.any() else "on another rank"
            raise TopkMismatchError(
                f"indexer top-k differs between tensor-parallel ranks at layer {self.layer_id}, "
                f"step {start_pos} (start_pos); rank {rank}: first differing (row, token) {where}"
            )


# --------------------------------------------------------------------------------- MLA
class MLA(nn.Module):
    """Multi-head latent attention with a latent KV cache (kv_lora_rank + rope part).

    Prefill (s > 1, start 0) runs masked-dense MHA over the current chunk like the reference.
    Decode (s == 1) runs in absorbed (MQA) mode over ONLY the top-k selected cache rows:
    O(K) per head instead of the reference's O(end) masked softmax (``sparse_decode=False``
    restores the reference's masked-dense decode; both give the same result).
    """

    sparse_decode = True

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
        start_pos: int,
        freqs_cis: torch.Tensor,
        mask: torch.Tensor | None,
        tracer: TopkTracer | None = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
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
        self.kv_cache[:bsz, start_pos:end_pos] = kv
        self.pe_cache[:bsz, start_pos:end_pos] = k_pe.squeeze(2)
        # v1: score einsums and softmax in fp32, probabilities cast back, the q_nope·wkv_b,
        # P·V and output einsums in the model dtype; v2: everything in the model dtype
        cdt = torch.float32 if self.v1 else x.dtype

        topk, topk_scores = self.indexer(x, qr, start_pos, freqs_cis, mask)
        if mask is not None:  # MHA prefill over the current chunk (start_pos == 0)
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
        else:  # absorbed MQA decode
            if tracer is not None:
                tracer.on_topk(self.layer_id, topk[:, 0, :], topk_scores[:, 0, :])
            wkv_b = self._wkv_b()
            q_abs = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, : self.qk_nope_head_dim])
            if self.sparse_decode:
                rows = torch.arange(bsz, device=x.device).unsqueeze(1)
                kv_sel = self.kv_cache[rows, topk[:, 0]]  # [b, K, c]
                pe_sel = self.pe_cache[rows, topk[:, 0]]
                scores = (
                    torch.einsum("bshc,bkc->bshk", q_abs.to(cdt), kv_sel.to(cdt))
                    + torch.einsum("bshr,bkr->bshk", q_pe.to(cdt), pe_sel.to(cdt))
                ) * self.softmax_scale
                o = torch.einsum("bshk,bkc->bshc", scores.softmax(dim=-1).to(x.dtype), kv_sel)
            else:  # the reference: dense scores over every cached position, masked to the top-k
                kv_all = self.kv_cache[:bsz, :end_pos]
                scores = (
                    torch.einsum("bshc,btc->bsht", q_abs.to(cdt), kv_all.to(cdt))
                    + torch.einsum(
                        "bshr,btr->bsht", q_pe.to(cdt), self.pe_cache[:bsz, :end_pos].to(cdt)
                    )
                ) * self.softmax_scale
                index_mask = torch.full((bsz, 1, end_pos), float("-inf"), device=x.device).scatter_(
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
    """Routed experts (whole experts split by rank) plus TP-sharded shared experts."""

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
        self.experts_start_idx = rank * self.n_local_experts
        self.experts_end_idx = self.experts_start_idx + self.n_local_experts
        self.gate = Gate(args)
        self.experts = nn.ModuleList(
            [
                Expert(args.dim, args.moe_inter_dim)
                if self.experts_start_idx <= i < self.experts_end_idx
                else None
                for i in range(self.n_routed_experts)
            ]
        )
        self.shared_experts = MLP(
            args.dim, args.n_shared_experts * args.moe_inter_dim, reduce_output=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(-1, self.dim)
        weights, indices = self.gate(x)
        y = torch.zeros_like(x, dtype=torch.float32)
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts)
        local = counts[self.experts_start_idx : self.experts_end_idx].nonzero().flatten()
        for i in (local + self.experts_start_idx).tolist():  # one iteration per used expert
            rows, slot = torch.where(indices == i)
            y.index_add_(0, rows, self.experts[i](x[rows]) * weights[rows, slot, None])
        y += self.shared_experts(x)
        if _tp_active():
            dist.all_reduce(y)
        return y.type_as(x).view(shape)


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
    """

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

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        if seqlen > 1 and start_pos != 0:
            raise ValueError(
                f"prefill of {seqlen} tokens at start_pos {start_pos}: like the reference, "
                "multi-token forwards are supported only at start_pos 0 (no chunked prefill)"
            )
        if start_pos + seqlen > self.max_seq_len:
            raise ValueError(
                f"position {start_pos + seqlen} exceeds max_seq_len {self.max_seq_len}"
            )
        if bsz > self.max_batch_size:
            raise ValueError(f"batch of {bsz} exceeds max_batch_size {self.max_batch_size}")
        freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device).triu_(1)
        tracer = self.tracer if mask is None else None
        h, residual = self.embed(tokens), None
        for layer in self.layers:
            h, residual = layer(h, residual, start_pos, freqs_cis, mask, tracer)
        h, _ = self.norm(h, residual)
        logits = self.head(h[:, -1].float())
        if _tp_active():
            parts = [torch.empty_like(logits) for _ in range(world_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits
