"""The Triton kernels (model/kernels_triton.py) against their torch twins, on the CPU under
Triton's interpreter (``TRITON_INTERPRET=1``), fresh random inputs, several sizes.

Skipped where Triton is not installed (CI needs no Triton; the GPU run of the same checks is
``benchmarks/gpu_fastpath.py``). The interpreter executes the kernels' code with numpy, so these
pin the indexing, masking, splitting and scaling logic; fp8 rounding is the same as torch's."""

from __future__ import annotations

import os
import sys

import pytest

# the interpreter must be on before triton.language is first imported (its helpers are jitted)
_EARLY = "triton" in sys.modules
os.environ["TRITON_INTERPRET"] = "1"
torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if _EARLY:
    pytest.skip("triton was imported before this module could switch its interpreter on; "
                "run this file on its own", allow_module_level=True)

import numpy as np  # noqa: E402
import triton.runtime.interpreter as _interp  # noqa: E402

from kvtier.model import kernels as K  # noqa: E402
from kvtier.model import kernels_triton as KT  # noqa: E402

_patch_tensor = _interp._patch_lang_tensor


def _patch_tensor_index(tensor, scope):
    """Triton 3.6's interpreter turns a loop bound into ``int(array of shape (1,))``, which
    numpy >= 2 refuses; ``item()`` is what it means (interpreter-only shim)."""
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).item()))


_interp._patch_lang_tensor = _patch_tensor_index


pytestmark = pytest.mark.usefixtures("torch_fp32_one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
@pytest.mark.parametrize("shape", [(1, 128), (37, 256), (2, 3, 384)])
def test_act_quant_bitwise(fmt, shape):
    g = _gen(sum(shape))
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[-1] // 128).repeat_interleave(128)
    x.view(-1)[0] = 0.0
    y, s = KT.act_quant(x.to(torch.bfloat16), 128, fmt)
    ry, rs = K.torch_act_quant(x.to(torch.bfloat16), 128, fmt)
    assert torch.equal(s, rs)
    got, want = y.float(), ry.float()
    # Triton 3.6's interpreter converts to e4m3 with its own numpy rounding, not the GPU's
    # cvt.rn.satfinite: ties go away from zero and a mantissa that rounds up to the next
    # power of two loses the carry (124.3 -> 64, not 128). So on the CPU the values may
    # differ by one e4m3 step or by that carry; the GPU check (benchmarks/gpu_fastpath.py)
    # is bitwise. The scales, computed before the conversion, must be equal.
    ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want.abs())[1] - 4)
    carry = (torch.frexp(want.abs())[0] == 0.5) & (got == want / 2)
    assert torch.all(((got - want).abs() <= ulp) | carry)
    assert (got != want).float().mean() < 0.1


def _quant_pair(m, n, k, seed):
    g = _gen(seed)
    a, a_s = K.torch_act_quant(torch.randn(m, k, generator=g), 128, "ue8m0")
    b, b_s = K.quant_blocks(torch.randn(n, k, generator=g) * k**-0.5)
    return a, a_s, b, b_s


@pytest.mark.parametrize("m, n, k", [(1, 200, 256), (5, 64, 1024), (40, 130, 384), (70, 256, 256),
                                     (300, 129, 128)])
def test_fp8_gemm_matches_torch(m, n, k):
    a, a_s, b, b_s = _quant_pair(m, n, k, m * n)
    got = KT.fp8_gemm(a, a_s, b, b_s)
    ref = K.torch_fp8_gemm(a, a_s, b, b_s)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert _rel(got, ref) < 1e-6


@pytest.mark.parametrize("seed, tokens, experts, topk, block_m", [(0, 1, 8, 2, 16), (1, 5, 6, 3, 16),
                                                                 (2, 40, 4, 2, 64)])
def test_grouped_gemm_and_alignment_match_per_expert_gemm(seed, tokens, experts, topk, block_m):
    g = _gen(seed)
    n, k = 192, 256
    a, a_s = K.torch_act_quant(torch.randn(tokens, k, generator=g), 128, "ue8m0")
    ws = [K.quant_blocks(torch.randn(n, k, generator=g) * k**-0.5) for _ in range(experts)]
    w = torch.stack([x[0] for x in ws])
    w_s = torch.stack([x[1] for x in ws])
    choice = torch.stack([torch.randperm(experts + 2, generator=g)[:topk] for _ in range(tokens)])
    choice = torch.where(choice < experts, choice, -1).flatten()  # some pairs on other ranks
    slot_pair, block_expert, pair_slot = K.moe_align(choice, experts, block_m)
    rows = torch.where(slot_pair >= 0, slot_pair // topk, -1).to(torch.int32)
    got = KT.fp8_grouped_gemm(a, a_s, rows, w, w_s, block_expert, block_m)
    ref = K.torch_fp8_grouped_gemm(a, a_s, rows, w, w_s, block_expert, block_m)
    for p, e in enumerate(choice.tolist()):
        r = int(pair_slot[p])
        if e < 0:
            assert r == slot_pair.numel()
            continue
        want = K.torch_fp8_gemm(a[p // topk : p // topk + 1], a_s[p // topk : p // topk + 1], w[e], w_s[e])
        assert int(block_expert[r // block_m]) == e
        assert _rel(got[r : r + 1], want) < 1e-6 and _rel(ref[r : r + 1], want) < 1e-6


@pytest.mark.parametrize("b, m, h, n, start", [(1, 1, 4, 300, None), (2, 1, 64, 200, 150),
                                               (1, 7, 4, 40, 33), (2, 5, 16, 130, 0)])
def test_fp8_index_matches_torch(b, m, h, n, start):
    g = _gen(b * m * h + n)
    q, _ = K.torch_act_quant(torch.randn(b, m, h, 128, generator=g), 128, "ue8m0")
    kk, ks = K.torch_act_quant(torch.randn(b, n, 128, generator=g), 128, "ue8m0")
    w = torch.randn(b, m, h, generator=g).abs()
    cache = torch.zeros(b, n + 11, 128, dtype=K.FP8)  # strided views, as the model passes
    cache[:, :n] = kk
    scales = torch.ones(b, n + 11, 1)
    scales[:, :n] = ks
    got = KT.fp8_index(q, w, cache[:, :n], scales[:, :n].squeeze(-1), start)
    ref = K.torch_fp8_index(q, w, kk, ks.squeeze(-1), start)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got))
    assert _rel(got[finite], ref[finite]) < 1e-6
    if start is not None:
        st = torch.tensor([start])
        assert torch.equal(KT.fp8_index(q, w, kk, ks.squeeze(-1), st).isfinite(), finite)


@pytest.mark.parametrize("b, s, h, k, start, splits", [(1, 1, 4, 16, 40, None), (2, 1, 20, 48, 60, 3),
                                                       (1, 9, 4, 16, 0, 1), (2, 6, 16, 24, 20, 2)])
def test_sparse_mla_matches_torch(b, s, h, k, start, splits):
    g = _gen(b * s * h + k)
    c_dim, r_dim, total = 128, 32, 80
    q = torch.randn(b, s, h, c_dim + r_dim, generator=g)
    kv = torch.randn(b + 1, total, c_dim, generator=g)  # cache rows :b used, like the model
    pe = torch.randn(b + 1, total, r_dim, generator=g)
    end = start + s
    idx = torch.stack([torch.stack([torch.randperm(max(end, k), generator=g)[:k] for _ in range(s)])
                       for _ in range(b)])  # includes positions after each query: masked
    got = KT.sparse_mla(q, kv, pe, idx, start, 0.3, splits=splits)
    ref = K.torch_sparse_mla(q, kv, pe, idx, start, 0.3)
    assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, strided, residual", [((3, 7, 512), False, False),
                                                     ((2, 5, 512), True, True), ((4, 96), False, True)])
def test_rms_norm_matches_torch(dtype, shape, strided, residual):
    g = _gen(len(shape) + strided)
    n = shape[-1]
    base = torch.randn(*shape[:-1], n + 64 if strided else n, generator=g).to(dtype)
    x = base[..., :n]  # a split view, as MLA's kv
    w = 1 + 0.1 * torch.randn(n, generator=g)
    r = torch.randn(*shape, generator=g).to(dtype) if residual else None
    got = KT.rms_norm(x, w, 1e-6, r)
    ref = K.torch_rms_norm(x, w, 1e-6, r)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    for a, b in zip(got if residual else [got], ref if residual else [ref], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < tol


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("b, s, h, d", [(1, 1, 1, 64), (2, 5, 4, 32), (1, 3, 70, 64)])
def test_rotary_matches_torch(interleaved, b, s, h, d):
    g = _gen(b * s * h + d)
    full = torch.randn(b, s, h, d + 96, generator=g).to(torch.bfloat16)
    x = full[..., 96:]  # the rope part of q, a strided view
    ang = torch.rand(s, d // 2, generator=g) * 6
    f = torch.polar(torch.ones_like(ang), ang)
    got = KT.rotary(x, f, interleaved)
    ref = K.torch_rotary(x, f, interleaved)
    assert got.shape == ref.shape and got.is_contiguous()
    assert _rel(got.float(), ref.float()) < 8e-3  # bf16 output rounding
    got32 = KT.rotary(x.float(), f, interleaved)
    assert _rel(got32, K.torch_rotary(x.float(), f, interleaved)) < 1e-6


@pytest.mark.parametrize("m, n, k", [(1, 300, 256), (3, 64, 200), (8, 129, 384)])
def test_linear_bf16w_matches_fp32_linear(m, n, k):
    g = _gen(m * n + k)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)  # exactly bf16 values
    x = torch.randn(m, k, generator=g)
    got = KT.linear_bf16w(x, w)
    ref = torch.nn.functional.linear(x, w.float())  # the fp32 head on the same values
    assert got.dtype == torch.float32 and _rel(got, ref) < 1e-6
