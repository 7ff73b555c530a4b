"""Triton kernels of the GPU fast path, registered as backend ``"triton"`` of ``kernels.py``.

Importing this module registers them; ``kernels.py`` does so on the first CUDA call when
Triton imports. Each function has the signature of its torch twin in ``kernels.py`` and
computes the same function (only the summation order differs); where an input falls outside
what a kernel handles (shapes, dtypes, CPU tensors outside Triton's interpreter) it calls the
torch twin. The checks against the torch path and the measured error bounds are in
``tests/test_kernels_triton.py`` (CPU, ``TRITON_INTERPRET=1``) and ``benchmarks/gpu_fastpath.py``
(GPU).

What each kernel buys (H200 figures in docs/BENCHMARKS.md):

* ``act_quant``: one pass instead of ~8 torch ops.
* ``fp8_gemm``: fp8 tensor-core GEMM on the e4m3 operands, the per-128 activation scales and
  128x128 weight scales applied to each K-block's fp32 partial product (DeepGEMM's scheme), so
  no weight is ever dequantised. M <= 64 (decode) computes ``Cᵀ = B·Aᵀ`` with the weight rows
  as the MMA's M side and splits K across programs (partial sums reduced in a fixed order,
  deterministic, so TP ranks stay bit-identical); larger M is a tiled GEMM.
* ``fp8_grouped_gemm``: the same per-expert GEMM for all experts in one launch over
  ``moe_align``'s padded row blocks.
* ``fp8_index``: the indexer score ``k_s·Σ_h w_h·ReLU(q_h·k)`` with the 64 heads as the MMA's
  M side, ReLU and the head sum in registers, the causal mask applied in the kernel and fully
  masked key tiles skipped.
* ``sparse_mla``: flash-attention over the gathered top-k latent rows (576-wide q·k, 512-wide
  p·v), online softmax in fp32; decode splits the K selected rows across programs and merges
  the partial softmaxes.
* ``rms_norm`` / ``rotary``: one kernel per call instead of the 7-10 elementwise torch ops
  (they dominate the launch count of a decode step).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import kernels as K

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _ok(*ts: torch.Tensor) -> bool:
    """Triton runs CUDA tensors (or anything under the interpreter)."""
    return _INTERPRET or all(t.is_cuda for t in ts)


_SMS: dict = {}


def _sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (8 under the CPU interpreter)."""
    if device not in _SMS:
        cuda = device.type == "cuda"
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 8
    return _SMS[device]


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


# ------------------------------------------------------------------------------ act_quant
@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, M, N, BM: tl.constexpr, UE8M0: tl.constexpr):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = g * 128 + tl.arange(0, 128)
    mask = rm[:, None] < M
    offs = rm[:, None].to(tl.int64) * N + rk[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    s = amax * (1.0 / 448.0)
    if UE8M0:  # 2^ceil(log2 s) from the exponent bits, as the reference kernel
        bits = s.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = (e << 23).to(tl.float32, bitcast=True)
    y = tl.clamp(tl.math.div_rn(x, s[:, None]), -448.0, 448.0)
    tl.store(y_ptr + offs, y.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + rm.to(tl.int64) * (N // 128) + g, s, mask=rm < M)


def act_quant(x: torch.Tensor, block_size: int = K.BLOCK, scale_fmt: str | None = None):
    n = x.size(-1)
    if block_size != 128 or n % 128 or not _ok(x) or x.numel() == 0:
        return K.torch_act_quant(x, block_size, scale_fmt)
    x2 = x.contiguous().view(-1, n)
    m = x2.size(0)
    y = torch.empty(x2.shape, dtype=K.FP8, device=x.device)
    s = torch.empty(m, n // 128, dtype=torch.float32, device=x.device)
    bm = 32
    _act_quant_kernel[(triton.cdiv(m, bm), n // 128)](
        x2, y, s, m, n, BM=bm, UE8M0=scale_fmt is not None, num_warps=4
    )
    return y.view(x.shape), s.view(*x.shape[:-1], n // 128)


# -------------------------------------------------------------------------------- fp8 GEMM
@triton.jit
def _gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, KB,
                 BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = Σ_kb (A[:, kb]·B[:, kb]ᵀ)·a_s[:, kb]·b_s[n/128, kb]; BN == 128."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    gid = pid // width
    first_m = gid * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsz
    pid_n = (pid % width) // gsz
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, 128)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    b_ptrs = b_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(0, KB):
        a = tl.load(a_ptrs, mask=rm[:, None] < M, other=0.0)
        b = tl.load(b_ptrs, mask=rn[:, None] < N, other=0.0)
        sa = tl.load(as_ptr + rm * KB + kb, mask=rm < M, other=0.0)
        sb = tl.load(bs_ptr + pid_n * KB + kb)
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb)
        a_ptrs += 128
        b_ptrs += 128
    c = c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _gemv_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, KB, kb_per_split,
                 BM: tl.constexpr, BN: tl.constexpr):
    """Small M: Cᵀ tile [BN, BM] = B[BN, K]·A[BM, K]ᵀ over one K range; BN divides 128.
    c_ptr is [splits, M, N] (fp32 partial sums) or [M, N] when there is one split."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, 128)
    kb0 = pid_s * kb_per_split
    sb_row = (pid_n * BN) // 128
    b_ptrs = b_ptr + rn[:, None].to(tl.int64) * K + kb0 * 128 + rk[None, :]
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + kb0 * 128 + rk[None, :]
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for i in range(0, kb_per_split):  # the last split may run past KB: masked
        kb = kb0 + i
        live = kb < KB
        w = tl.load(b_ptrs, mask=(rn[:, None] < N) & live, other=0.0)
        x = tl.load(a_ptrs, mask=(rm[:, None] < M) & live, other=0.0)
        sa = tl.load(as_ptr + rm * KB + kb, mask=(rm < M) & live, other=0.0)
        sb = tl.load(bs_ptr + sb_row * KB + kb, mask=live, other=0.0)
        acc += tl.dot(w, tl.trans(x)) * (sb * sa[None, :])
        b_ptrs += 128
        a_ptrs += 128
    c = c_ptr + pid_s.to(tl.int64) * M * N + rm[None, :] * N + rn[:, None]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm[None, :] < M) & (rn[:, None] < N))


def _splits(n_tiles: int, kb: int, device: torch.device) -> tuple[int, int]:
    """K splits so that about two waves of programs fill the GPU."""
    want = max(1, min(kb, (2 * _sms(device) + n_tiles - 1) // n_tiles))
    per = triton.cdiv(kb, want)
    return triton.cdiv(kb, per), per


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor):
    k = a.size(-1)
    n = b.size(0)
    if k % 128 or b.dtype != K.FP8 or not _ok(a, b) or a.numel() == 0:
        return K.torch_fp8_gemm(a, a_s, b, b_s)
    a2 = a.contiguous().view(-1, k)
    s2 = a_s.contiguous().view(-1, k // 128).float()
    b = b.contiguous()
    b_s = b_s.contiguous()
    m = a2.size(0)
    kb = k // 128
    dtype = torch.get_default_dtype()
    if m <= 64:
        bm = _pow2(m, 16)
        bn = 64
        n_tiles = triton.cdiv(n, bn)
        splits, per = _splits(n_tiles, kb, a.device)
        if splits == 1:
            out = torch.empty(m, n, dtype=dtype, device=a.device)
        else:
            out = torch.empty(splits, m, n, dtype=torch.float32, device=a.device)
        _gemv_kernel[(n_tiles, splits)](
            a2, s2, b, b_s, out, m, n, k, kb, per, BM=bm, BN=bn, num_warps=4, num_stages=4
        )
        if splits > 1:
            out = out.sum(0).to(dtype)
    else:
        bm = 64 if m <= 256 else 128
        out = torch.empty(m, n, dtype=dtype, device=a.device)
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, 128),)
        _gemm_kernel[grid](
            a2, s2, b, b_s, out, m, n, k, kb, BM=bm, BN=128, GROUP_M=8,
            num_warps=8 if bm == 128 else 4, num_stages=4,
        )  # fmt: skip
    return out.view(*a.shape[:-1], n)


# ------------------------------------------------------------------------ grouped GEMM
@triton.jit
def _grouped_kernel(a_ptr, as_ptr, rows_ptr, be_ptr, b_ptr, bs_ptr, c_ptr, N, K, KB, NB,
                    HAS_ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    SWAP: tl.constexpr):
    """One [BM, BN] output tile of the rows of one expert block. SWAP (small blocks)
    computes the transposed tile with the weight rows on the MMA's M side."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(be_ptr + pid_b)
    if e < 0:
        return
    slots = pid_b * BM + tl.arange(0, BM)
    if HAS_ROWS:
        src = tl.load(rows_ptr + slots)
    else:
        src = slots
    valid = src >= 0
    src = tl.where(valid, src, 0).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, 128)
    e64 = e.to(tl.int64)
    b_ptrs = b_ptr + e64 * N * K + rn[:, None].to(tl.int64) * K + rk[None, :]
    a_ptrs = a_ptr + src[:, None] * K + rk[None, :]
    s_row = bs_ptr + e64 * NB * KB + ((pid_n * BN) // 128) * KB
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(0, KB):
        w = tl.load(b_ptrs, mask=rn[:, None] < N, other=0.0)
        x = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
        sa = tl.load(as_ptr + src * KB + kb, mask=valid, other=0.0)
        sb = tl.load(s_row + kb)
        if SWAP:
            acc += tl.dot(w, tl.trans(x)) * (sb * sa[None, :])
        else:
            acc += tl.dot(x, tl.trans(w)) * (sa[:, None] * sb)
        b_ptrs += 128
        a_ptrs += 128
    if SWAP:
        c = c_ptr + slots[None, :].to(tl.int64) * N + rn[:, None]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=rn[:, None] < N)
    else:
        c = c_ptr + slots[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=rn[None, :] < N)


def fp8_grouped_gemm(a, a_s, rows, b, b_s, block_expert, block_m):
    e, n, k = b.shape
    if k % 128 or b.dtype != K.FP8 or not _ok(a, b) or block_m not in (16, 32, 64, 128):
        return K.torch_fp8_grouped_gemm(a, a_s, rows, b, b_s, block_expert, block_m)
    nb = block_expert.numel()
    out = torch.empty(nb * block_m, n, dtype=torch.get_default_dtype(), device=a.device)
    swap = block_m <= 32
    bn = 64 if swap else 128
    _grouped_kernel[(nb, triton.cdiv(n, bn))](
        a.contiguous(), a_s.contiguous().float(), rows if rows is not None else block_expert,
        block_expert, b, b_s, out, n, k, k // 128, b_s.size(1),
        HAS_ROWS=rows is not None, BM=block_m, BN=bn, SWAP=swap,
        num_warps=4, num_stages=4 if swap else 3,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- indexer score
@triton.jit
def _index_kernel(q_ptr, w_ptr, k_ptr, ks_ptr, start_ptr, o_ptr, M, N,
                  sqb, sqm, swb, swm, skb, skn, sksb, sksn, sob, som,
                  H: tl.constexpr, QB: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr):
    """o[b, m, n] for QB queries (QB·H rows of q) and BN keys."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    rows = tl.arange(0, QB * H)
    qi = pid_m * QB + rows // H
    hh = rows % H
    rvalid = qi < M
    d = tl.arange(0, 128)
    mq = pid_m * QB + tl.arange(0, QB)
    rn = pid_n * BN + tl.arange(0, BN)
    o_ptrs = o_ptr + pid_b * sob + mq[:, None].to(tl.int64) * som + rn[None, :]
    o_mask = (mq[:, None] < M) & (rn[None, :] < N)
    start = 0
    if CAUSAL:
        start = tl.load(start_ptr)
        last = start + tl.minimum(pid_m * QB + QB, M) - 1
        if pid_n * BN > last:  # every key of this tile is after every query: all masked
            tl.store(o_ptrs, tl.full([QB, BN], float("-inf"), tl.float32), mask=o_mask)
            return
    q = tl.load(q_ptr + pid_b * sqb + qi[:, None].to(tl.int64) * sqm + hh[:, None] * 128
                + d[None, :], mask=rvalid[:, None], other=0.0)
    w = tl.load(w_ptr + pid_b * swb + qi.to(tl.int64) * swm + hh, mask=rvalid, other=0.0)
    kk = tl.load(k_ptr + pid_b * skb + rn[:, None].to(tl.int64) * skn + d[None, :],
                 mask=rn[:, None] < N, other=0.0)
    ks = tl.load(ks_ptr + pid_b * sksb + rn.to(tl.int64) * sksn, mask=rn < N, other=0.0)
    s = tl.dot(q, tl.trans(kk))  # [QB*H, BN]
    s = tl.maximum(s, 0.0) * w[:, None]
    o = tl.sum(tl.reshape(s, [QB, H, BN]), axis=1) * ks[None, :]
    if CAUSAL:
        o = tl.where(rn[None, :] <= start + mq[:, None], o, float("-inf"))
    tl.store(o_ptrs, o, mask=o_mask)


def _start_tensor(start, device: torch.device) -> torch.Tensor:
    if isinstance(start, torch.Tensor):
        return start.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(start)], dtype=torch.int64, device=device)


def fp8_index(q, q_s, k, k_s, start=None):
    b, m, h, d = q.shape
    n = k.size(1)
    if (d != 128 or h & (h - 1) or h > 128 or q.dtype != K.FP8 or k.dtype != K.FP8
            or not _ok(q, k)):  # fmt: skip
        return K.torch_fp8_index(q, q_s, k, k_s, start)
    q = q.contiguous()
    q_s = q_s.reshape(b, m, h).float().contiguous()
    k_s = k_s.reshape(k_s.shape[0], k_s.shape[1]) if k_s.dim() == 3 else k_s
    if k.stride(-1) != 1:
        k = k.contiguous()
    # queries per program: 16 q rows at least (the MMA's minimum), 128 in prefill
    qb = max(1, 16 // h, min(128 // h, _pow2(m)))
    out = torch.empty(b, m, n, dtype=torch.float32, device=q.device)
    st = _start_tensor(start if start is not None else 0, q.device)
    bn = 128
    _index_kernel[(b, triton.cdiv(m, qb), triton.cdiv(n, bn))](
        q, q_s, k, k_s, st, out, m, n,
        q.stride(0), q.stride(1), q_s.stride(0), q_s.stride(1), k.stride(0), k.stride(1),
        k_s.stride(0), k_s.stride(1), out.stride(0), out.stride(1),
        H=h, QB=qb, BN=bn, CAUSAL=start is not None, num_warps=4 if qb * h <= 64 else 8,
        num_stages=2,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------ sparse MLA
@triton.jit
def _sparse_mla_kernel(q_ptr, kv_ptr, pe_ptr, idx_ptr, start_ptr, o_ptr, m_ptr, l_ptr,
                       S, H, K, k_per_split, scale_log2,
                       skvb, skvn, speb, spen, sqt, sqh,
                       DC: tl.constexpr, DR: tl.constexpr, HB: tl.constexpr, BK: tl.constexpr,
                       SPLIT: tl.constexpr):
    """Query t (batch row t // S, position start + t % S), heads [pid_h·HB, +HB), selected
    rows [split·k_per_split, +k_per_split). SPLIT: write the un-normalised partial output
    and its running max / sum (log2 domain) for ``_combine``."""
    pid_h = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    bt = t // S
    qpos = tl.load(start_ptr) + t % S
    rh = pid_h * HB + tl.arange(0, HB)
    hmask = rh < H
    dc = tl.arange(0, DC)
    dr = tl.arange(0, DR)
    q_row = q_ptr + t * sqt + rh[:, None].to(tl.int64) * sqh
    qn = tl.load(q_row + dc[None, :], mask=hmask[:, None], other=0.0)
    qr = tl.load(q_row + DC + dr[None, :], mask=hmask[:, None], other=0.0)
    m_i = tl.full([HB], float("-inf"), tl.float32)
    l_i = tl.zeros([HB], tl.float32)
    acc = tl.zeros([HB, DC], tl.float32)
    k_lo = sp * k_per_split
    for k0 in range(0, k_per_split, BK):  # k_per_split is a multiple of BK
        rk = k_lo + k0 + tl.arange(0, BK)
        kmask = rk < K
        pos = tl.load(idx_ptr + t * K + rk, mask=kmask, other=-1)
        valid = kmask & (pos >= 0) & (pos <= qpos)
        pos = tl.where(valid, pos, 0).to(tl.int64)
        kvt = tl.load(kv_ptr + bt * skvb + pos[:, None] * skvn + dc[None, :],
                      mask=valid[:, None], other=0.0)
        pet = tl.load(pe_ptr + bt * speb + pos[:, None] * spen + dr[None, :],
                      mask=valid[:, None], other=0.0)
        s = tl.dot(qn, tl.trans(kvt)) + tl.dot(qr, tl.trans(pet))
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kvt.dtype), kvt)
        m_i = m_new
    if SPLIT:
        base = (sp * tl.num_programs(1) + t) * H + rh
        tl.store(o_ptr + base[:, None].to(tl.int64) * DC + dc[None, :], acc,
                 mask=hmask[:, None])
        tl.store(m_ptr + base, m_i, mask=hmask)
        tl.store(l_ptr + base, l_i, mask=hmask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + (t * H + rh[:, None].to(tl.int64)) * DC + dc[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=hmask[:, None])


#: (heads per program, selected rows per step, warps, stages): the fastest of the four
#: configurations benchmarks/gpu_fastpath.py sweeps (H200: 182 TFLOP/s in prefill; decode
#: differs by < 15% between them); it sweeps them again on every run
MLA_CONFIG = {"hb": 64, "bk": 64, "warps": 8, "stages": 1}


def sparse_mla(q, kv, pe, indices, start, scale, score_dtype=None, splits: int | None = None):
    b, s, h, d = q.shape
    c_dim, r_dim = kv.size(-1), pe.size(-1)
    k = indices.size(-1)
    if (d != c_dim + r_dim or c_dim & (c_dim - 1) or r_dim & (r_dim - 1) or kv.stride(-1) != 1
            or pe.stride(-1) != 1 or kv.dtype != q.dtype or pe.dtype != q.dtype
            or not _ok(q, kv)):  # fmt: skip
        return K.torch_sparse_mla(q, kv, pe, indices, start, scale, score_dtype)
    cfg = MLA_CONFIG
    hb = min(cfg["hb"], _pow2(h, 16))
    bk = cfg["bk"]
    q3 = q.contiguous().view(b * s, h, d)
    idx = indices.contiguous().view(b * s, k)
    t = b * s
    st = _start_tensor(start, q.device)
    n_h = triton.cdiv(h, hb)
    if splits is None:  # decode: few queries, so spread the selected rows over programs
        want = (2 * _sms(q.device)) // max(1, n_h * t)
        splits = max(1, min(want, triton.cdiv(k, bk)))
    per = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, per)
    scale_log2 = scale * 1.4426950408889634
    common = dict(DC=c_dim, DR=r_dim, HB=hb, BK=bk, num_warps=cfg["warps"],
                  num_stages=cfg["stages"])  # fmt: skip
    args = (s, h, k, per, scale_log2, kv.stride(0), kv.stride(1), pe.stride(0), pe.stride(1),
            q3.stride(0), q3.stride(1))  # fmt: skip
    if splits == 1:
        out = torch.empty(t, h, c_dim, dtype=q.dtype, device=q.device)
        _sparse_mla_kernel[(n_h, t, 1)](q3, kv, pe, idx, st, out, out, out, *args,
                                        SPLIT=False, **common)
        return out.view(b, s, h, c_dim)
    acc = torch.empty(splits, t, h, c_dim, dtype=torch.float32, device=q.device)
    mx = torch.empty(splits, t, h, dtype=torch.float32, device=q.device)
    sm = torch.empty(splits, t, h, dtype=torch.float32, device=q.device)
    _sparse_mla_kernel[(n_h, t, splits)](q3, kv, pe, idx, st, acc, mx, sm, *args,
                                         SPLIT=True, **common)
    top = mx.amax(0)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    wgt = torch.exp2(mx - top)  # 0 for splits that saw no valid row
    out = (acc * wgt.unsqueeze(-1)).sum(0) / (sm * wgt).sum(0).clamp_min(1e-30).unsqueeze(-1)
    return out.to(q.dtype).view(b, s, h, c_dim)


# ------------------------------------------------------------------- RMSNorm and RoPE
@triton.jit
def _rms_kernel(x_ptr, r_ptr, w_ptr, y_ptr, ro_ptr, N, sx, sr, eps,
                HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(r_ptr + row * sr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(ro_ptr + row * N + cols, x.to(ro_ptr.dtype.element_ty), mask=m)
    ms = tl.sum(x * x, axis=0) / N
    w = tl.load(w_ptr + cols, mask=m, other=0.0)
    y = w * (x * tl.math.rsqrt(ms + eps))
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor | None:
    """``t`` as ``[rows, n]`` with unit column stride, without copying (None if impossible)."""
    if t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, n)
    except RuntimeError:
        return None


def rms_norm(x, weight, eps, residual=None):
    n = x.size(-1)
    x2 = _rows(x, n)
    r2 = None if residual is None else _rows(residual, n)
    if (x2 is None or (residual is not None and r2 is None) or weight.dtype != torch.float32
            or not _ok(x) or x.numel() == 0 or n > 16384):  # fmt: skip
        return K.torch_rms_norm(x, weight, eps, residual)
    rows = x2.size(0)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ro = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else y
    block = _pow2(n, 16)
    _rms_kernel[(rows,)](
        x2, r2 if r2 is not None else x2, weight, y, ro, n, x2.stride(0),
        r2.stride(0) if r2 is not None else 0, float(eps), HAS_RES=residual is not None,
        BLOCK=block, num_warps=8 if block >= 4096 else 4,
    )  # fmt: skip
    return y if residual is None else (y, ro)


@triton.jit
def _rope_kernel(x_ptr, f_ptr, y_ptr, S, H, sxb, sxs, sxh,
                 HALF: tl.constexpr, HB: tl.constexpr, INTERLEAVED: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # batch row * S + position
    b = pid // S
    s = pid % S
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    hm = h < H
    i = tl.arange(0, HALF)
    c = tl.load(f_ptr + s * (2 * HALF) + 2 * i)
    sn = tl.load(f_ptr + s * (2 * HALF) + 2 * i + 1)
    if INTERLEAVED:
        ia = 2 * i
        ib = 2 * i + 1
    else:
        ia = i
        ib = i + HALF
    src = x_ptr + b * sxb + s * sxs + h[:, None].to(tl.int64) * sxh
    a = tl.load(src + ia[None, :], mask=hm[:, None], other=0.0).to(tl.float32)
    bb = tl.load(src + ib[None, :], mask=hm[:, None], other=0.0).to(tl.float32)
    dst = y_ptr + (pid * H + h[:, None].to(tl.int64)) * (2 * HALF)
    ty = y_ptr.dtype.element_ty
    tl.store(dst + ia[None, :], (a * c[None, :] - bb * sn[None, :]).to(ty), mask=hm[:, None])
    tl.store(dst + ib[None, :], (a * sn[None, :] + bb * c[None, :]).to(ty), mask=hm[:, None])


def rotary(x, freqs_cis, interleaved=True):
    b, s, h, d = x.shape
    half = d // 2
    # where it was measured faster on the H200 (graph replay): the indexer's non-interleaved
    # rope at decode, 1.9 vs 9.6 us; the torch ops won for MLA's interleaved 128 heads
    # (5.9 vs 8.2 us) and for prefill chunks (123 vs 287 us), so those stay on torch
    if (d % 2 or half & (half - 1) or x.stride(-1) != 1 or freqs_cis.dtype != torch.complex64
            or not _ok(x) or (not _INTERPRET and (interleaved or b * s > 64))):  # fmt: skip
        return K.torch_rotary(x, freqs_cis, interleaved)
    f = torch.view_as_real(freqs_cis.reshape(s, half)).contiguous()  # [s, half, 2] fp32
    y = torch.empty(b, s, h, d, dtype=x.dtype, device=x.device)
    hb = min(_pow2(h), 64)
    _rope_kernel[(b * s, triton.cdiv(h, hb))](
        x, f, y, s, h, x.stride(0), x.stride(1), x.stride(2), HALF=half, HB=hb,
        INTERLEAVED=interleaved, num_warps=4,
    )  # fmt: skip
    return y


# ---------------------------------------------------- fp32 x bf16-exact weights (the head)
@triton.jit
def _gemv_bf16w_kernel(x_ptr, w_ptr, o_ptr, N, K, M: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr):
    """o[m, n] = Σ_k x[m, k]·w[n, k] with fp32 FMAs (w converted exactly), M <= 8 rows."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    nm = rn < N
    rk = tl.arange(0, BK)
    for m in tl.static_range(M):
        acc = tl.zeros([BN], tl.float32)
        for k0 in range(0, K, BK):
            km = k0 + rk < K
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + k0 + rk[None, :],
                        mask=nm[:, None] & km[None, :], other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + m * K + k0 + rk, mask=km, other=0.0)
            acc += tl.sum(w * xv[None, :], axis=1)
        tl.store(o_ptr + m * N + rn, acc, mask=nm)


def linear_bf16w(x, w_bf16):
    n, k = w_bf16.shape
    x2 = x.reshape(-1, k)
    m = x2.size(0)
    if m > 8 or x.dtype != torch.float32 or w_bf16.dtype != torch.bfloat16 or not _ok(x):
        return K.torch_linear_bf16w(x, w_bf16)
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    _gemv_bf16w_kernel[(triton.cdiv(n, 64),)](x2.contiguous(), w_bf16, out, n, k, M=m, BN=64,
                                              BK=128, num_warps=4)  # fmt: skip
    return out.view(*x.shape[:-1], n)


for _name, _fn in (("act_quant", act_quant), ("fp8_gemm", fp8_gemm),
                   ("fp8_grouped_gemm", fp8_grouped_gemm), ("fp8_index", fp8_index),
                   ("sparse_mla", sparse_mla), ("rms_norm", rms_norm),
                   ("rotary", rotary), ("linear_bf16w", linear_bf16w)):  # fmt: skip
    K.register_kernel("triton", _name, _fn)
