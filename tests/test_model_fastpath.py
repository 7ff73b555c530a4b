"""The model's fast paths against the reference paths they replace (CPU, torch kernels):
chunked sparse prefill == the reference's one-shot masked-dense prefill, grouped MoE == the
per-expert loop, and the alignment behind the grouped GEMM."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvtier.model import kernels  # noqa: E402
from kvtier.model import model as M  # noqa: E402
from kvtier.model.args import ModelArgs  # noqa: E402
from kvtier.model.random_init import init_random_  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_fp32_one_thread")


class Recorder:
    def __init__(self):
        self.calls = []

    def on_topk(self, layer_id, indices, scores):
        self.calls.append((layer_id, indices.clone()))


def build(seed, **overrides):
    return init_random_(M.Transformer(ModelArgs.builtin("tiny", **overrides)), seed=seed).eval()


def run(model, tokens, prompt, steps, chunk=None, split=None):
    """Prefill (reference if chunk is None, else chunked; ``split`` continues the prompt in a
    second call at start_pos = split), then teacher-forced decode steps."""
    rec = Recorder()
    model.tracer = rec
    prev = M.MLA.sparse_prefill, M.Transformer.prefill_chunk
    M.MLA.sparse_prefill = chunk is not None
    M.Transformer.prefill_chunk = chunk or 2048
    try:
        if split:
            model(tokens[:, :split], 0)
            out = [model(tokens[:, split:prompt], split)]
        else:
            out = [model(tokens[:, :prompt], 0)]
        for p in range(prompt, prompt + steps):
            out.append(model(tokens[:, p : p + 1], p))
    finally:
        M.MLA.sparse_prefill, M.Transformer.prefill_chunk = prev
        model.tracer = None
    return torch.stack(out), rec.calls


@pytest.mark.parametrize(
    "seed, dtype, exact, layers, batch, prompt, chunk, split",
    [
        (0, "fp32", True, 3, 2, 40, 40, None),  # one chunk: sparse attention only
        (1, "fp32", True, 3, 1, 53, 7, None),  # many chunks, some shorter than index_topk
        (2, "fp32", True, 3, 2, 37, 16, None),
        (3, "fp32", True, 3, 2, 48, 8, 21),  # prompt continued at start_pos 21 (prefix reuse)
        (4, "fp32", False, 1, 2, 37, 16, None),  # fp8 indexer
        (5, "fp8", False, 1, 1, 64, 9, None),  # the default fp8 config
    ],
)
def test_chunked_prefill_equals_masked_dense(seed, dtype, exact, layers, batch, prompt, chunk,
                                             split):
    """fp32 to 1e-5 and identical top-k sets. Runs with the fp8 indexer or fp8 weights use one
    layer: the two paths sum attention in a different order (1e-7), and fp8 quantisation of
    the next layer's inputs would turn such differences into different selections; within a
    layer both paths see the same inputs. 16 indexer heads (tiny has 4): with 4, a key whose
    four ReLUs are all 0 scores exactly 0, and such ties at the top-k boundary are broken by
    torch.topk differently for different score shapes (one-shot vs chunk), a legitimate
    difference this test is not about."""
    model = build(seed, dtype=dtype, indexer_exact=exact, n_layers=layers, index_n_heads=16)
    g = torch.Generator().manual_seed(100 + seed)
    tokens = torch.randint(0, 1024, (batch, prompt + 6), generator=g)
    ref, ref_topk = run(model, tokens, prompt, 6)
    got, got_topk = run(model, tokens, prompt, 6, chunk=chunk, split=split)
    assert len(ref_topk) == len(got_topk) == 6 * layers
    for (la, ia), (lb, ib) in zip(ref_topk, got_topk, strict=True):
        assert la == lb and torch.equal(ia.sort(-1).values, ib.sort(-1).values)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_sparse_mla_equals_masked_dense_attention():
    """``torch_sparse_mla`` over selected rows == a dense masked softmax over all positions."""
    g = torch.Generator().manual_seed(7)
    b, s, h, c, r, start, k = 2, 5, 3, 16, 8, 9, 6
    q = torch.randn(b, s, h, c + r, generator=g)
    kv, pe = torch.randn(b, start + s, c, generator=g), torch.randn(b, start + s, r, generator=g)
    idx = torch.stack([torch.stack([torch.randperm(start + s, generator=g)[:k] for _ in range(s)])
                       for _ in range(b)])  # fmt: skip
    got = kernels.torch_sparse_mla(q, kv, pe, idx, start, 0.2)
    scores = (torch.einsum("bshc,btc->bsht", q[..., :c], kv)
              + torch.einsum("bshr,btr->bsht", q[..., c:], pe)) * 0.2  # fmt: skip
    allowed = torch.zeros(b, s, start + s, dtype=torch.bool).scatter_(-1, idx, True)
    allowed &= ~kernels.causal_mask(start, s, start + s, q.device)
    scores = scores.masked_fill(~allowed.unsqueeze(2), float("-inf"))
    ref = torch.einsum("bsht,btc->bshc", scores.softmax(-1), kv)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed, tokens", [(0, 1), (1, 3), (2, 40), (3, 8)])
def test_grouped_moe_equals_per_expert_loop(seed, tokens):
    model = build(seed)  # fp8 weights: the experts are stacked
    for layer in model.layers[1:]:
        moe = layer.ffn
        assert moe.stacked_weights() is not None
        x = torch.randn(tokens, moe.dim, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            w, idx = moe.gate(x)
            loop = moe._loop(x, w, idx)
            grouped = moe._grouped(x, w, idx)
            M.MoE.grouped = True
            try:
                y_fast = moe(x)
            finally:
                M.MoE.grouped = None
            y_ref = moe(x)  # CPU: the loop
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)


def test_stacked_expert_weights_follow_loading_and_moves():
    """Expert parameters are views of the stacked tensors: loading writes through, and a
    ``.to()`` that breaks the views is detected and re-stacked."""
    model = build(0)
    moe = model.layers[1].ffn
    w13 = moe.stacked_weights()[0]
    e0 = moe.experts[0]
    with torch.no_grad():
        e0.w3.weight.copy_(torch.ones_like(e0.w3.weight))
    assert torch.equal(w13[0, moe.moe_inter_dim :].float(), torch.ones_like(e0.w3.weight).float())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.device("cpu"), copy=True) if hasattr(model, "_unused") else None
    for lin in (e0.w1, e0.w2, e0.w3):  # what Module.to() does: new storage per parameter
        lin.weight = torch.nn.Parameter(lin.weight.detach().clone())
    for e in moe.experts:
        for lin in (e.w1, e.w2, e.w3):
            lin.weight = torch.nn.Parameter(lin.weight.detach().clone())
    stacked = moe.stacked_weights()
    assert stacked[0].data_ptr() != w13.data_ptr()
    assert e0.w1.weight.data_ptr() == stacked[0][0].data_ptr()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


def test_moe_align_blocks_cover_every_pair():
    g = torch.Generator().manual_seed(3)
    for n_pairs, experts, block in [(1, 4, 16), (8, 256, 16), (37, 5, 4), (100, 3, 8)]:
        e = torch.randint(-1, experts, (n_pairs,), generator=g)
        slot_pair, block_expert, pair_slot = kernels.moe_align(e, experts, block)
        r = slot_pair.numel()
        assert r == block_expert.numel() * block
        for p, ex in enumerate(e.tolist()):
            if ex < 0:
                assert int(pair_slot[p]) == r
            else:
                s = int(pair_slot[p])
                assert int(slot_pair[s]) == p and int(block_expert[s // block]) == ex
        used = slot_pair[slot_pair >= 0]
        assert sorted(used.tolist()) == [p for p, ex in enumerate(e.tolist()) if ex >= 0]
