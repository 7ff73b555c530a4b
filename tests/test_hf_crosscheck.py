"""Cross-check against transformers' ``DeepseekV32ForCausalLM`` on the same random weights.

kvtier runs in exact mode (fp32 indexer without Hadamard/fp8, no latent fake-quantisation,
fp32 weights and residuals); HF runs in fp32 from the very weights written to the HF
checkpoint that kvtier converts and loads. Sequences are longer than ``index_topk`` (8), so
every decode step selects a strict subset. Compared: the top-k index SET of every decode step
x layer x row (HF: a hook on ``model.model.layers[i].self_attn.indexer``, kvtier: the model's
``tracer`` attribute) and the last-position logits of every forward.

Tolerance: ``LOGIT_ATOL`` = 1e-4 absolute on logits of magnitude ~5. Both sides compute the
same fp32 math in a different order (absorbed vs. expanded MLA, complex vs. rotate-half RoPE,
fused vs. per-expert MoE sums), so they differ by fp32 rounding only: about 2e-6 measured.
A semantic difference (RoPE layout, scale, mask, routing) moves logits by >= 1e-2.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hf_utils import converted, hf_model, model_args

from kvtier.model.convert import convert
from kvtier.model.hf_reference import write_hf_checkpoint
from kvtier.model.loading import build_model

LOGIT_ATOL = 1e-4
PROMPT, TOTAL = 12, 36  # prefill 12 tokens, then 24 decode steps up to 36 > index_topk


class Recorder:
    """kvtier tracer stand-in: keeps (layer, indices [B, K], scores [B, K]) of each decode layer."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_topk(self, layer_id, indices, scores) -> None:
        self.calls.append((layer_id, indices.clone(), scores.clone()))


def run_kvtier(model, tokens: torch.Tensor):
    rec = Recorder()
    model.tracer = rec
    logits = [model(tokens[:, :PROMPT], 0)]
    for pos in range(PROMPT, tokens.shape[1]):
        logits.append(model(tokens[:, pos : pos + 1], pos))
    model.tracer = None
    return torch.stack(logits), rec.calls


def run_hf(hf, tokens: torch.Tensor):
    from transformers import DynamicCache

    picked: list[torch.Tensor] = []

    def hook(_module, _inputs, out):
        if out.shape[1] == 1:  # decode steps only, like kvtier's trace hook
            picked.append(out[:, 0].long().clone())

    handles = [layer.self_attn.indexer.register_forward_hook(hook) for layer in hf.model.layers]
    # the cache argument is ``cache`` from transformers 5.2x, ``past_key_values`` before
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    cache = DynamicCache(config=hf.config)
    logits = []
    try:
        with torch.no_grad():
            chunks = [(0, PROMPT)] + [(p, p + 1) for p in range(PROMPT, tokens.shape[1])]
            for start, end in chunks:
                kw = {key: cache}
                out = hf(input_ids=tokens[:, start:end], use_cache=True, logits_to_keep=1, **kw)
                cache = getattr(out, key)
                logits.append(out.logits[:, -1].float())
    finally:
        for h in handles:
            h.remove()
    return torch.stack(logits), picked


def compare(ours, theirs, n_layers: int) -> None:
    logits_ours, calls = ours
    logits_hf, picked = theirs
    n_steps = TOTAL - PROMPT
    assert len(calls) == len(picked) == n_steps * n_layers
    k = model_args("exact").index_topk
    for i, ((layer, idx, scores), hf_idx) in enumerate(zip(calls, picked, strict=True)):
        step = PROMPT + i // n_layers
        assert layer == i % n_layers and idx.shape[-1] == k < step + 1
        for row in range(idx.shape[0]):
            a, b = set(idx[row].tolist()), set(hf_idx[row].tolist())
            assert a == b, f"layer {layer} step {step} row {row}: kvtier-only {a - b}, HF-only {b - a}"
        assert torch.isfinite(scores).all()
    diff = (logits_ours - logits_hf).abs().max().item()
    assert diff <= LOGIT_ATOL, f"max |logit diff| {diff:.3g} > {LOGIT_ATOL}"
    assert logits_hf.abs().max() > 1.0  # logits are not trivially tiny


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    prev = torch.get_default_dtype()
    yield
    torch.set_default_dtype(prev)


def _tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, TOTAL), generator=g)


def test_topk_sets_and_logits_match_transformers():
    args = model_args("exact")
    tokens = _tokens(args.vocab_size)
    model = build_model(args, converted("exact", 1))
    compare(run_kvtier(model, tokens), run_hf(hf_model("exact"), tokens), args.n_layers)


def test_yarn_rope_and_mscale_match_transformers(tmp_path):
    """max_seq_len > original_seq_len: YaRN frequencies and the m^2 softmax scale on both sides."""
    from kvtier.model.hf_reference import build_hf_model

    args = model_args("exact", original_seq_len=16, rope_factor=4.0)
    assert args.yarn
    hf = build_hf_model(args, seed=3)
    assert hf.model.layers[0].self_attn.scaling == pytest.approx(args.softmax_scale, rel=1e-12)
    write_hf_checkpoint(tmp_path / "hf", args, dtype="fp32", model=hf, tokenizer=False)
    convert(tmp_path / "hf", tmp_path / "kv", args.n_routed_experts, 1, progress=False)
    tokens = _tokens(args.vocab_size, seed=2)
    model = build_model(args, tmp_path / "kv")
    compare(run_kvtier(model, tokens), run_hf(hf, tokens), args.n_layers)


def test_crosscheck_detects_a_wrong_indexer_rope():
    """The comparison can fail: the v1 (interleaved) indexer RoPE changes the selections."""
    args = model_args("exact", v1=True)
    tokens = _tokens(args.vocab_size)
    model = build_model(args, converted("exact", 1))
    _, calls = run_kvtier(model, tokens)
    _, picked = run_hf(hf_model("exact"), tokens)
    differing = sum(
        set(idx[r].tolist()) != set(h[r].tolist())
        for (_, idx, _), h in zip(calls, picked, strict=True)
        for r in range(idx.shape[0])
    )
    assert differing > 0


@pytest.mark.parametrize("yarn", [False, True])
def test_config_mapping_round_trips(yarn):
    from transformers import DeepseekV32Config

    from kvtier.model.hf_reference import args_dict_from_hf_config, hf_config_dict

    args = model_args("exact", **({"original_seq_len": 16, "rope_factor": 4.0} if yarn else {}))
    cfg = DeepseekV32Config(**hf_config_dict(args)).to_dict()
    assert cfg["rope_parameters"]["rope_type"] == ("yarn" if yarn else "default")
    back = args_dict_from_hf_config(cfg)
    mine = args.to_dict()
    assert back["dtype"] == "bf16" and back.pop("score_func") == "sigmoid"
    back.pop("dtype")
    assert {k: mine[k] for k in back} == back
