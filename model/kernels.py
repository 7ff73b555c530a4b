"""FP8 and sparse-attention kernels of the DeepSeek-V3.2-Exp model, behind one seam.

The model calls the module-level functions below; each dispatches to the active backend:

* ``act_quant``, ``fp8_gemm``, ``fp8_index``, ``hadamard``: the reference's TileLang kernels
  (``inference/kernel.py``; dsa_model.md §8);
* ``fp8_grouped_gemm``: every routed expert's fp8 GEMM in one call (rows sorted by expert,
  each expert's rows padded to ``block_m``), so the MoE needs no Python loop over experts;
* ``sparse_mla``: absorbed (MQA) attention of each query over only its own top-k cache rows,
  for decode and chunked prefill alike (no ``[S, S, heads]`` tensor anywhere);
* ``rms_norm`` (with the fused residual add) and ``rotary``: the model's elementwise chains,
  one kernel each on the GPU instead of 7-10 small ones (a decode step is launch-bound).

The ``"torch"`` backend below is the reference path (CPU and CUDA, plain math). The default
backend ``"auto"`` uses ``"triton"`` (``kernels_triton.py``, registered on first use when Triton
imports and a CUDA device is present) for CUDA tensors and torch otherwise; a backend provides
only what it accelerates, the rest falls back to torch. ``set_kernel_backend("torch")`` forces
the reference everywhere. Each Triton kernel is checked against its torch twin on fresh random
inputs (``tests/test_kernels_triton.py`` under Triton's CPU interpreter, and
``benchmarks/gpu_fastpath.py`` on the GPU, where the error bounds are written down).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

BLOCK = 128
FP8_MAX = 448.0
FP8 = torch.float8_e4m3fn
KERNEL_NAMES = (
    "act_quant", "fp8_gemm", "fp8_index", "hadamard", "fp8_grouped_gemm", "sparse_mla",
    "rms_norm", "rotary", "linear_bf16w",
)  # fmt: skip

_REGISTRY: dict[str, dict[str, Callable]] = {"torch": {}}
_active = "auto"
_accelerated_loaded = False


# ------------------------------------------------------------------------------- dispatch
def register_kernel(backend: str, name: str, fn: Callable) -> None:
    """Provide ``fn`` as kernel ``name`` of ``backend`` (same signature as the torch one)."""
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {name!r}; expected one of {KERNEL_NAMES}")
    _REGISTRY.setdefault(backend, {})[name] = fn


def set_kernel_backend(backend: str) -> str:
    """Select the backend used by the model ("auto", "torch", "triton", ...); returns the
    previous one. "auto" (the default) picks Triton for CUDA tensors when it is available."""
    global _active
    if backend == "triton":
        _load_accelerated()
    if backend != "auto" and backend not in _REGISTRY:
        raise ValueError(
            f"unknown kernel backend {backend!r}; registered: {sorted(_REGISTRY)} and 'auto'"
        )
    previous, _active = _active, backend
    return previous


def get_kernel_backend() -> str:
    return _active


def _load_accelerated() -> None:
    """Register the Triton kernels once, if Triton imports (never needed on CPU)."""
    global _accelerated_loaded
    if _accelerated_loaded:
        return
    _accelerated_loaded = True
    try:
        from . import kernels_triton  # noqa: F401  (registers itself)
    except Exception:  # no triton, or a triton without a usable backend
        pass


def _impl(name: str, x: torch.Tensor | None = None) -> Callable:
    backend = _active
    if backend == "auto":
        if x is None or not x.is_cuda:
            return _REGISTRY["torch"][name]
        _load_accelerated()
        backend = "triton" if "triton" in _REGISTRY else "torch"
    return _REGISTRY[backend].get(name) or _REGISTRY["torch"][name]


def kernel_for(name: str, x: torch.Tensor | None = None) -> str:
    """Which backend runs kernel ``name`` for an input like ``x`` (for logs and benchmarks)."""
    fn = _impl(name, x)
    return next(b for b, fns in _REGISTRY.items() if fns.get(name) is fn)


def act_quant(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None):
    """Per-group fp8 quantisation: ``(y e4m3 like x, s fp32 [..., N/block])``."""
    return _impl("act_quant", x)(x, block_size, scale_fmt)


def fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor
) -> torch.Tensor:
    """``a[..,K] (e4m3, per-128 scales a_s) @ b[N,K]ᵀ (128x128 block scales b_s)``."""
    return _impl("fp8_gemm", a)(a, a_s, b, b_s)


def fp8_index(
    q: torch.Tensor,
    q_s: torch.Tensor,
    k: torch.Tensor,
    k_s: torch.Tensor,
    start: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Indexer score ``o[b,m,n] = k_s[b,n]·Σ_h q_s[b,m,h]·ReLU(q[b,m,h]·k[b,n])`` in fp32.

    ``start`` (an int or a one-element int64 tensor): query ``m`` sits at position
    ``start + m`` and keys ``n > start + m`` score -inf (causal; the reference adds the same
    mask afterwards). None: no mask, as the reference kernel.
    """
    return _impl("fp8_index", q)(q, q_s, k, k_s, start)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard rotation of the last dim, returned in bf16."""
    return _impl("hadamard", x)(x)


def fp8_grouped_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    rows: torch.Tensor | None,
    b: torch.Tensor,
    b_s: torch.Tensor,
    block_expert: torch.Tensor,
    block_m: int,
) -> torch.Tensor:
    """Grouped fp8 GEMM over experts: ``out[r] = a[rows[r]] @ b[e(r)]ᵀ`` for every padded row.

    ``a[T, K]`` e4m3 with per-128 scales ``a_s[T, K/128]``; ``b[E, N, K]`` e4m3 with 128x128
    tile scales ``b_s[E, ceil(N/128), K/128]``; ``block_expert[nb]`` int32: the expert of rows
    ``[j·block_m, (j+1)·block_m)`` (-1: unused block); ``rows[nb·block_m]`` int32: the row of
    ``a`` each output row reads (-1: padding), None for ``rows[r] = r``. Output
    ``[nb·block_m, N]`` in the default dtype; rows of unused blocks and padding are
    unspecified. ``moe_align`` builds ``rows`` and ``block_expert``.
    """
    return _impl("fp8_grouped_gemm", a)(a, a_s, rows, b, b_s, block_expert, block_m)


def sparse_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    indices: torch.Tensor,
    start: int | torch.Tensor,
    scale: float,
    score_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention of each query over only its selected cache rows.

    ``q[b, s, H, C+R]`` (the absorbed nope part ``C`` = kv_lora_rank, then the rope part ``R``);
    ``kv[B, T, C]`` and ``pe[B, T, R]`` the latent caches (rows ``:b`` are used);
    ``indices[b, s, K]`` int64 cache positions per query. Query ``i`` sits at position
    ``start + i`` and only selected positions ``0 <= p <= start + i`` take part (the causal and
    -inf top-k slots of the reference's mask). Returns ``o[b, s, H, C] = softmax(scale·q·k)·kv``
    in ``kv``'s dtype: the reference's masked softmax over all positions, restricted to the
    positions it does not mask. ``score_dtype`` (default ``q``'s): the dtype of the scores and
    the softmax (v1: fp32), whose probabilities are cast to ``kv``'s dtype for ``P·V``; the
    Triton kernel always scores in fp32.
    """
    return _impl("sparse_mla", q)(q, kv, pe, indices, start, scale, score_dtype)


def grouped_block_m(n_pairs: int, n_experts: int) -> int:
    """Row block of the grouped GEMM: 16 when experts get a few rows each (decode), 64 for
    prefill chunks (fewer padded rows than blocks of 128, still large MMA tiles)."""
    return 16 if n_pairs <= 4 * n_experts else 64


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
):
    """``weight·x/sqrt(mean(x²)+eps)`` in fp32, in ``x``'s dtype; with ``residual`` the sum
    ``r = x + residual`` (fp32) is normalised and ``(norm(r), r)`` returned, both in ``x``'s
    dtype (the reference's fused residual)."""
    return _impl("rms_norm", x)(x, weight, eps, residual)


def rotary(x: torch.Tensor, freqs_cis: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate ``x[b, s, h, d]`` by ``freqs_cis[s, d/2]`` (complex) in fp32, in ``x``'s dtype:
    pairs ``(x[2i], x[2i+1])`` if ``interleaved``, else ``(x[i], x[i+d/2])``."""
    return _impl("rotary", x)(x, freqs_cis, interleaved)


def linear_bf16w(x: torch.Tensor, w_bf16: torch.Tensor) -> torch.Tensor:
    """``x @ wᵀ`` in fp32 for fp32 ``x`` and a bf16 copy of fp32 weights whose values are
    exactly bf16 (the fp32 ``head``, stored in bf16 by the checkpoints): the fp32 GEMM's
    function (only the summation order differs) reading half the bytes."""
    return _impl("linear_bf16w", x)(x, w_bf16)


def moe_align(
    experts: torch.Tensor, n_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert and pad each expert's rows to ``block_m``; torch ops
    only and no host synchronisation (CUDA-graph safe).

    ``experts[P]`` int64: the local expert of pair ``p`` or -1 (an expert of another rank).
    Returns ``(slot_pair[R] int32, block_expert[nb] int32, pair_slot[P] int64)``: the pair each
    padded row holds (-1: padding), the expert of each block (-1: unused) and the padded row of
    each pair (``R`` for pairs of no local expert). ``nb = min(P, E) + P // block_m`` bounds
    the blocks any routing needs, ``R = nb·block_m``.
    """
    p = experts.numel()
    dev = experts.device
    nb = min(p, n_experts) + p // block_m
    r = nb * block_m
    e = torch.where(experts >= 0, experts, n_experts)  # sentinel sorts last
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, e, torch.ones_like(e))
    padded = (counts[:n_experts] + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = torch.cat([ends.new_zeros(1), ends])  # [E + 1]; the sentinel starts at the end
    first = torch.cumsum(counts, 0) - counts  # first sorted index of each expert
    sorted_e, order = torch.sort(e, stable=True)
    rank_in = torch.arange(p, device=dev) - first[sorted_e]
    dest = torch.where(sorted_e < n_experts, starts[sorted_e] + rank_in, r)
    pair_slot = torch.empty(p, dtype=torch.int64, device=dev).scatter_(0, order, dest)
    slot_pair = torch.full((r + 1,), -1, dtype=torch.int32, device=dev)
    slot_pair.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(nb, device=dev) * block_m
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return slot_pair[:r], block_expert, pair_slot


# ------------------------------------------------------------------------ torch backend
def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2 s)`` exactly (the kernel's exponent-bit rounding, ue8m0)."""
    mant, exp = torch.frexp(s)  # s = mant * 2^exp with mant in [0.5, 1)
    exp = exp - (mant == 0.5).to(exp.dtype)
    return torch.ldexp(torch.ones_like(s), exp)


def torch_act_quant(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None):
    n = x.size(-1)
    if n % block_size:
        raise ValueError(f"act_quant: last dim {n} is not a multiple of {block_size}")
    g = x.float().unflatten(-1, (n // block_size, block_size))
    amax = g.abs().amax(-1).clamp_min(1e-4)
    s = amax * torch.tensor(1.0 / FP8_MAX, dtype=torch.float32)
    if scale_fmt is not None:
        s = _pow2_ceil(s)
    y = (g / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8).flatten(-2)
    return y, s


def dequant_blocks(
    w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantise ``w[N,K]`` with one scale per 128x128 tile (partial edge tiles allowed)."""
    n, k = w.shape
    s = scale.float().repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return (w.float() * s).to(dtype)


def quant_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight ``w[N,K]`` to e4m3 with 128x128 tile scales (amax/448), as in the
    DeepSeek checkpoints; the inverse of ``dequant_blocks`` up to fp8 rounding."""
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, BLOCK, kb, BLOCK)
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * BLOCK, kb * BLOCK)[:n, :k].contiguous(), scale


def torch_fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor
) -> torch.Tensor:
    k = a.size(-1)
    a_deq = (a.float().unflatten(-1, (-1, BLOCK)) * a_s.float().unsqueeze(-1)).flatten(-2)
    b_deq = dequant_blocks(b, b_s)
    out = a_deq.reshape(-1, k) @ b_deq.t()
    return out.view(*a.shape[:-1], b.size(0)).to(torch.get_default_dtype())


def torch_fp8_index(
    q: torch.Tensor,
    q_s: torch.Tensor,
    k: torch.Tensor,
    k_s: torch.Tensor,
    start: int | torch.Tensor | None = None,
    chunk_elems: int = 1 << 26,
) -> torch.Tensor:
    """Chunked over queries so the ``[b, m, h, n]`` fp32 intermediate stays bounded."""
    b, m, h, d = q.shape
    n = k.size(1)
    q_s = q_s.reshape(b, m, h).float()
    k_s = k_s.reshape(b, n).float()
    kf = k.float().transpose(1, 2)  # [b, d, n]
    out = torch.empty(b, m, n, dtype=torch.float32, device=q.device)
    step = max(1, chunk_elems // max(1, b * h * n))
    for i in range(0, m, step):
        qc = q[:, i : i + step].float()  # [b, c, h, d]
        c = qc.size(1)
        logits = torch.relu(qc.reshape(b, c * h, d) @ kf).view(b, c, h, n)
        out[:, i : i + step] = (q_s[:, i : i + step].unsqueeze(-2) @ logits).squeeze(-2)
    out = out * k_s.unsqueeze(1)
    if start is not None:
        out.masked_fill_(causal_mask(start, m, n, q.device), float("-inf"))
    return out


def causal_mask(start: int | torch.Tensor, m: int, n: int, device: torch.device) -> torch.Tensor:
    """``[m, n]`` bool, True where key ``j > start + i`` (masked)."""
    pos = torch.arange(m, device=device) + (
        start.reshape(()) if isinstance(start, torch.Tensor) else start
    )
    return torch.arange(n, device=device)[None, :] > pos[:, None]


def torch_fp8_grouped_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    rows: torch.Tensor | None,
    b: torch.Tensor,
    b_s: torch.Tensor,
    block_expert: torch.Tensor,
    block_m: int,
) -> torch.Tensor:
    """Reference: one ``torch_fp8_gemm`` per expert present (host loop: CPU/reference only)."""
    nb = block_expert.numel()
    out = torch.zeros(nb * block_m, b.size(1), dtype=torch.get_default_dtype(), device=a.device)
    slots = torch.arange(nb * block_m, device=a.device)
    src = slots if rows is None else rows.long()
    slot_expert = block_expert.long().repeat_interleave(block_m)
    for e in torch.unique(block_expert).tolist():
        if e < 0:
            continue
        sel = slots[(slot_expert == e) & (src >= 0)]
        if sel.numel():
            out[sel] = torch_fp8_gemm(a[src[sel]], a_s[src[sel]], b[e], b_s[e])
    return out


def torch_sparse_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    indices: torch.Tensor,
    start: int | torch.Tensor,
    scale: float,
    score_dtype: torch.dtype | None = None,
    chunk_elems: int = 1 << 27,
) -> torch.Tensor:
    """Gather the selected rows and run a masked softmax over them (scores in ``score_dtype``,
    P·V in ``kv``'s dtype), chunked over queries so the gathered rows stay bounded."""
    b, s, h, d = q.shape
    c_dim = kv.size(-1)
    k = indices.size(-1)
    dtype = score_dtype or q.dtype
    rows = torch.arange(b, device=q.device)[:, None, None]
    pos = torch.arange(s, device=q.device) + (
        start.reshape(()) if isinstance(start, torch.Tensor) else start
    )
    out = torch.empty(b, s, h, c_dim, dtype=kv.dtype, device=q.device)
    step = max(1, chunk_elems // max(1, b * k * d))
    for i in range(0, s, step):
        idx = indices[:, i : i + step]
        valid = (idx >= 0) & (idx <= pos[i : i + step, None])
        safe = idx.clamp_min(0)
        kv_sel = kv[rows, safe]  # [b, c, K, C]
        pe_sel = pe[rows, safe]
        qc = q[:, i : i + step].to(dtype)
        scores = (
            torch.einsum("bshc,bskc->bshk", qc[..., :c_dim], kv_sel.to(dtype))
            + torch.einsum("bshr,bskr->bshk", qc[..., c_dim:], pe_sel.to(dtype))
        ) * scale
        scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
        probs = scores.softmax(dim=-1).to(kv.dtype)
        out[:, i : i + step] = torch.einsum("bshk,bskc->bshc", probs, kv_sel)
    return out


def torch_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
):
    def norm(v: torch.Tensor) -> torch.Tensor:
        return weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps))

    dtype = x.dtype
    if residual is None:
        return norm(x.float()).to(dtype)
    r = x.float() + residual.float()
    return norm(r).to(dtype), r.to(dtype)


def torch_rotary(x: torch.Tensor, freqs_cis: torch.Tensor, interleaved: bool = True):
    dtype, shape = x.dtype, x.shape
    xf = x.float()
    if not interleaved:
        xf = xf.view(*shape[:-1], 2, -1).transpose(-1, -2)
    xc = torch.view_as_complex(xf.reshape(*shape[:-1], -1, 2).contiguous())
    y = torch.view_as_real(xc * freqs_cis.view(1, x.size(1), 1, -1)).flatten(-2)
    if not interleaved:
        y = torch.cat([y[..., 0::2], y[..., 1::2]], dim=-1)
    return y.to(dtype)


def torch_linear_bf16w(x: torch.Tensor, w_bf16: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), w_bf16.float())


def hadamard_butterfly(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of the last dim in fp32: the in-place butterfly
    over strides 1, 2, ..., n/2 with (a, b) -> (a + b, a - b), natural Sylvester order."""
    n = x.size(-1)
    if n & (n - 1):
        raise ValueError(f"hadamard: last dim {n} is not a power of two")
    y = x.float()
    shape = y.shape
    h = 1
    while h < n:
        y = y.reshape(*shape[:-1], n // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + c, a - c), dim=-2)
        h *= 2
    return y.reshape(shape)


def torch_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x · H_n / sqrt(n)`` rounded as ``fast_hadamard_transform`` rounds it: the exact fp32
    butterfly (same stride order as the kernel), then one fp32 multiply by ``n^-0.5``, then
    bf16. Scaling the matrix first would round every term before the sum and flip ~1 in 6,000
    bf16 outputs, enough to move fp8-quantised indexer rows
    (tests/test_model_kernels.py::test_hadamard_rounds_once_like_the_kernel)."""
    n = x.size(-1)
    return (hadamard_butterfly(x) * n**-0.5).to(torch.bfloat16)


@lru_cache(maxsize=1)
def _fast_hadamard() -> Callable | None:
    try:
        from fast_hadamard_transform import hadamard_transform
    except Exception:  # not installed, or built without CUDA
        return None
    return hadamard_transform


def default_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``fast_hadamard_transform`` on CUDA bf16 when importable (as the reference), else torch."""
    fast = _fast_hadamard() if x.is_cuda else None
    if fast is not None:
        return fast(x.to(torch.bfloat16).contiguous(), scale=x.size(-1) ** -0.5)
    return torch_hadamard(x)


register_kernel("torch", "act_quant", torch_act_quant)
register_kernel("torch", "fp8_gemm", torch_fp8_gemm)
register_kernel("torch", "fp8_index", torch_fp8_index)
register_kernel("torch", "hadamard", default_hadamard)
register_kernel("torch", "fp8_grouped_gemm", torch_fp8_grouped_gemm)
register_kernel("torch", "sparse_mla", torch_sparse_mla)
register_kernel("torch", "rms_norm", torch_rms_norm)
register_kernel("torch", "rotary", torch_rotary)
register_kernel("torch", "linear_bf16w", torch_linear_bf16w)
