"""FP8 kernels of the DeepSeek-V3.2-Exp reference (``inference/kernel.py``) in plain torch.

The model calls the module-level functions ``act_quant``, ``fp8_gemm``, ``fp8_index`` and
``hadamard``; they dispatch to the active backend. The ``"torch"`` backend below runs on CPU
and CUDA and follows the TileLang kernels' math (dsa_model.md §8); a GPU backend (tilelang,
DeepGEMM) plugs in with ``register_kernel(backend, name, fn)`` + ``set_kernel_backend(name)``
and only needs to provide the kernels it accelerates (the rest fall back to torch).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

BLOCK = 128
FP8_MAX = 448.0
FP8 = torch.float8_e4m3fn
KERNEL_NAMES = ("act_quant", "fp8_gemm", "fp8_index", "hadamard")

_REGISTRY: dict[str, dict[str, Callable]] = {"torch": {}}
_active = "torch"


# ------------------------------------------------------------------------------- dispatch
def register_kernel(backend: str, name: str, fn: Callable) -> None:
    """Provide ``fn`` as kernel ``name`` of ``backend`` (same signature as the torch one)."""
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {name!r}; expected one of {KERNEL_NAMES}")
    _REGISTRY.setdefault(backend, {})[name] = fn


def set_kernel_backend(backend: str) -> str:
    """Select the backend used by the model; returns the previous one."""
    global _active
    if backend not in _REGISTRY:
        raise ValueError(f"unknown kernel backend {backend!r}; registered: {sorted(_REGISTRY)}")
    previous, _active = _active, backend
    return previous


def get_kernel_backend() -> str:
    return _active


def _impl(name: str) -> Callable:
    return _REGISTRY[_active].get(name) or _REGISTRY["torch"][name]


def act_quant(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None):
    """Per-group fp8 quantisation: ``(y e4m3 like x, s fp32 [..., N/block])``."""
    return _impl("act_quant")(x, block_size, scale_fmt)


def fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor
) -> torch.Tensor:
    """``a[..,K] (e4m3, per-128 scales a_s) @ b[N,K]ᵀ (128x128 block scales b_s)``."""
    return _impl("fp8_gemm")(a, a_s, b, b_s)


def fp8_index(
    q: torch.Tensor, q_s: torch.Tensor, k: torch.Tensor, k_s: torch.Tensor
) -> torch.Tensor:
    """Indexer score ``o[b,m,n] = k_s[b,n]·Σ_h q_s[b,m,h]·ReLU(q[b,m,h]·k[b,n])`` in fp32."""
    return _impl("fp8_index")(q, q_s, k, k_s)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard rotation of the last dim, returned in bf16."""
    return _impl("hadamard")(x)


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
    return out * k_s.unsqueeze(1)


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
