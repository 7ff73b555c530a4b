"""The torch kernels (act_quant, fp8_gemm, fp8_index, Hadamard) against straightforward math."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvtier.model import kernels  # noqa: E402

FP8 = torch.float8_e4m3fn


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dequant_act(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (y.float().unflatten(-1, (-1, 128)) * s.unsqueeze(-1)).flatten(-2)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_shapes_scales_and_roundtrip(scale_fmt):
    g = _gen(1)
    x = (torch.randn(3, 5, 384, generator=g) * torch.logspace(-3, 2, 5).view(1, 5, 1)).to(
        torch.bfloat16
    )
    y, s = kernels.act_quant(x, 128, scale_fmt)
    assert y.dtype == FP8 and y.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (3, 5, 3)
    amax = x.float().unflatten(-1, (3, 128)).abs().amax(-1).clamp_min(1e-4)
    if scale_fmt == "ue8m0":
        log2 = torch.log2(s)
        assert torch.equal(log2, log2.round()), "ue8m0 scales must be powers of two"
        # smallest power of two with amax / s <= 448
        assert torch.all(amax / s <= 448) and torch.all(amax / (s / 2) > 448 * (1 - 1e-6))
    else:
        torch.testing.assert_close(s, amax / 448, rtol=1e-6, atol=0)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, plus a subnormal floor
    err = (_dequant_act(y, s) - x.float()).abs()
    bound = x.float().abs() * 2**-4 + s.repeat_interleave(128, -1) * 2**-9
    assert torch.all(err <= bound)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_mag=st.floats(-6, 4),
    groups=st.integers(1, 3),
    fmt=st.sampled_from([None, "ue8m0"]),
)
def test_act_quant_property(seed, log_mag, groups, fmt):
    g = _gen(seed)
    x = torch.randn(4, 128 * groups, generator=g) * 10.0**log_mag
    x[0, 0] = 0.0
    y, s = kernels.act_quant(x, 128, fmt)
    back = _dequant_act(y, s)
    assert torch.isfinite(back).all() and y.float().abs().max() <= 448
    assert torch.all((back - x).abs() <= x.abs() * 2**-4 + s.repeat_interleave(128, -1) * 2**-9)
    if fmt == "ue8m0":
        assert torch.equal(torch.log2(s), torch.log2(s).round())


def test_act_quant_tiny_and_zero_groups():
    x = torch.zeros(2, 128)
    x[1, 0] = 1e-6
    y, s = kernels.act_quant(x, 128, "ue8m0")
    assert torch.all(s == 2.0 ** np.ceil(np.log2(1e-4 / 448)))  # amax clamped to 1e-4
    assert torch.all(y.float()[0] == 0)


def test_pow2_ceil_exact_on_boundaries():
    s = torch.tensor([0.25, 0.3, 1.0, 1.0000001, 3.0, 2.0**-20])
    torch.testing.assert_close(
        kernels._pow2_ceil(s), torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0, 2.0**-20])
    )


def test_act_quant_rejects_ragged_last_dim():
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.act_quant(torch.zeros(4, 100))


def test_quant_blocks_roundtrip_with_partial_tiles():
    w = torch.randn(200, 300, generator=_gen(2))
    q, s = kernels.quant_blocks(w)
    assert q.dtype == FP8 and q.shape == w.shape and s.shape == (2, 3)
    back = kernels.dequant_blocks(q, s)
    assert torch.all((back - w).abs() <= w.abs() * 2**-4 + s.max() * 2**-9)


def test_fp8_gemm_equals_dequantised_matmul():
    g = _gen(3)
    a = torch.randn(2, 7, 256, generator=g)
    b = torch.randn(200, 256, generator=g)
    aq, a_s = kernels.act_quant(a, 128, "ue8m0")
    bq, b_s = kernels.quant_blocks(b)
    out = kernels.fp8_gemm(aq, a_s, bq, b_s)
    assert out.shape == (2, 7, 200) and out.dtype == torch.get_default_dtype()
    # reference: explicit per-K-block accumulation, as the TileLang kernel does
    ref = torch.zeros(14, 200, dtype=torch.float64)
    a2, as2 = aq.reshape(14, 256).double(), a_s.reshape(14, 2).double()
    for kb in range(2):
        blk = a2[:, kb * 128 : (kb + 1) * 128] @ bq[:, kb * 128 : (kb + 1) * 128].double().t()
        bscale = b_s[:, kb].double().repeat_interleave(128)[:200]
        ref += blk * as2[:, kb : kb + 1] * bscale[None, :]
    torch.testing.assert_close(out.reshape(14, 200).double(), ref, rtol=1e-5, atol=1e-4)
    # and close to the unquantised product
    rel = (out - a @ b.t()).norm() / (a @ b.t()).norm()
    assert rel < 0.05


def test_fp8_index_equals_dequantised_formula():
    g = _gen(4)
    b, m, h, d, n = 2, 3, 4, 128, 37
    q = torch.randn(b, m, h, d, generator=g)
    k = torch.randn(b, n, d, generator=g)
    q8, q_s = kernels.act_quant(q, 128, "ue8m0")
    k8, k_s = kernels.act_quant(k, 128, "ue8m0")
    w = torch.randn(b, m, h, generator=g)
    out = kernels.torch_fp8_index(q8, w * q_s.squeeze(-1), k8, k_s.squeeze(-1), chunk_elems=50)
    qd, kd = _dequant_act(q8, q_s).double(), _dequant_act(k8, k_s).double()
    ref = torch.zeros(b, m, n, dtype=torch.float64)
    for hh in range(h):  # straightforward: sum over heads of w * relu(q_h . k)
        ref += w[:, :, hh, None].double() * torch.relu(
            torch.einsum("bmd,bnd->bmn", qd[:, :, hh], kd)
        )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(np.array([[1, 1], [1, -1]]), h)
    return h


@pytest.mark.parametrize("n", [2, 16, 128])
def test_hadamard_matches_sylvester_and_is_orthonormal(n):
    g = _gen(5)
    x = torch.randn(6, n, generator=g)
    y = kernels.torch_hadamard(x)
    assert y.dtype == torch.bfloat16
    ref = x.double().numpy() @ _sylvester(n) / np.sqrt(n)
    np.testing.assert_allclose(y.float().numpy(), ref, rtol=1e-2, atol=1e-2)
    exact = kernels.torch_hadamard(torch.eye(n)).float().numpy()
    # bf16 holds ±1/sqrt(n) to 8 bits, so the matrix is orthonormal up to bf16 rounding
    np.testing.assert_allclose(exact @ exact.T, np.eye(n), atol=2e-2)
    # the butterfly (unnormalised) equals the Sylvester matrix product
    np.testing.assert_allclose(
        kernels.hadamard_butterfly(x).double().numpy(),
        x.double().numpy() @ _sylvester(n),
        atol=1e-4,
    )
    q, k = torch.randn(2, n, generator=g)
    dot = (kernels.torch_hadamard(q).double() * kernels.torch_hadamard(k).double()).sum()
    assert abs(dot.item() - (q.double() * k.double()).sum().item()) < 0.05 * n**0.5


def _kernel_order_hadamard(x: np.ndarray, scale: float) -> np.ndarray:
    """fast_hadamard_transform's arithmetic, restated in numpy: fp32 butterflies at strides
    1, 2, ..., n/2 ((a, b) -> (a + b, a - b)), then ONE fp32 multiply by ``scale``."""
    y = x.astype(np.float32)
    n = y.shape[-1]
    stride = 1
    while stride < n:
        v = y.reshape(-1, n // (2 * stride), 2, stride)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        y = np.stack((a + b, a - b), axis=2).reshape(x.shape)
        stride *= 2
    return y * np.float32(scale)


def test_hadamard_rounds_once_like_the_kernel():
    """Bit-exact against the kernel's order of operations on bf16 rows of many magnitudes.
    Scaling the matrix before the product (the old torch path) rounds every term first and
    flipped ~1 in 6,000 bf16 outputs by one ulp (155 of 1,048,576 here)."""
    g = _gen(11)
    x = torch.randn(8192, 128, generator=g) * torch.logspace(-3, 2, 8192).unsqueeze(1)
    x = x.to(torch.bfloat16)
    want = _kernel_order_hadamard(x.float().numpy(), 128**-0.5)
    want = torch.from_numpy(want).to(torch.bfloat16)
    for fn in (kernels.torch_hadamard, kernels.hadamard):
        got = fn(x)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want), f"{(got != want).sum().item()} bf16 outputs differ"
    # the kernel's order is the exact transform (float64 sum, one fp32 rounding) at bf16
    exact = torch.from_numpy(x.double().numpy() @ _sylvester(128)).float()
    assert torch.equal((exact * 128**-0.5).to(torch.bfloat16), want)
    # leading dims: [b, s, heads, 128] as the indexer calls it
    q = x[:24].view(2, 3, 4, 128)
    assert torch.equal(kernels.hadamard(q), want[:24].view(2, 3, 4, 128))


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        kernels.torch_hadamard(torch.zeros(3, 96))


def test_kernel_dispatch_registry():
    calls = []

    def fake_hadamard(x):
        calls.append(x.shape)
        return x.to(torch.bfloat16)

    kernels.register_kernel("fake", "hadamard", fake_hadamard)
    prev = kernels.set_kernel_backend("fake")
    try:
        assert kernels.get_kernel_backend() == "fake"
        kernels.hadamard(torch.ones(1, 4))
        y, _ = kernels.act_quant(torch.ones(1, 128))  # not registered: falls back to torch
        assert y.dtype == FP8
    finally:
        kernels.set_kernel_backend(prev)
    assert calls == [torch.Size([1, 4])]
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.set_kernel_backend("nope")
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.register_kernel("fake", "matmul", fake_hadamard)
