"""Checkpoint conversion (model/convert.py): HF release layout -> model{rank}-mp{N}.safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from hf_utils import CONFIGS, converted, copy_checkpoint, hf_checkpoint, rewrite_hf
from safetensors.torch import load_file

from kvtier.cli import main
from kvtier.model.convert import (
    MAPPING,
    ConversionError,
    convert,
    expected_names,
    plan_conversion,
    rename,
    to_hf_name,
)
from kvtier.model.hf_reference import dequantize_fp8_blocks


def _hf_tensors(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


# --------------------------------------------------------------------------- renames
@pytest.mark.parametrize(
    ("hf", "kv", "dim"),
    [
        ("model.embed_tokens.weight", "embed.weight", 0),
        ("lm_head.weight", "head.weight", 0),
        ("model.norm.weight", "norm.weight", None),
        ("model.layers.3.input_layernorm.weight", "layers.3.attn_norm.weight", None),
        ("model.layers.3.post_attention_layernorm.weight", "layers.3.ffn_norm.weight", None),
        ("model.layers.3.self_attn.q_a_proj.weight", "layers.3.attn.wq_a.weight", None),
        ("model.layers.3.self_attn.q_a_proj.weight_scale_inv", "layers.3.attn.wq_a.scale", None),
        ("model.layers.3.self_attn.q_a_layernorm.weight", "layers.3.attn.q_norm.weight", None),
        ("model.layers.3.self_attn.q_b_proj.weight", "layers.3.attn.wq_b.weight", 0),
        ("model.layers.3.self_attn.q_b_proj.weight_scale_inv", "layers.3.attn.wq_b.scale", 0),
        ("model.layers.3.self_attn.kv_a_proj_with_mqa.weight", "layers.3.attn.wkv_a.weight", None),
        ("model.layers.3.self_attn.kv_a_layernorm.weight", "layers.3.attn.kv_norm.weight", None),
        ("model.layers.3.self_attn.kv_b_proj.weight", "layers.3.attn.wkv_b.weight", 0),
        ("model.layers.3.self_attn.o_proj.weight", "layers.3.attn.wo.weight", 1),
        ("model.layers.3.self_attn.o_proj.weight_scale_inv", "layers.3.attn.wo.scale", 1),
        ("model.layers.3.self_attn.indexer.wq_b.weight", "layers.3.attn.indexer.wq_b.weight", None),
        ("model.layers.3.self_attn.indexer.wk.weight_scale_inv", "layers.3.attn.indexer.wk.scale", None),
        ("model.layers.3.self_attn.indexer.k_norm.bias", "layers.3.attn.indexer.k_norm.bias", None),
        ("model.layers.3.self_attn.indexer.weights_proj.weight", "layers.3.attn.indexer.weights_proj.weight", None),
        ("model.layers.0.mlp.gate_proj.weight", "layers.0.ffn.w1.weight", 0),
        ("model.layers.0.mlp.down_proj.weight", "layers.0.ffn.w2.weight", 1),
        ("model.layers.0.mlp.up_proj.weight", "layers.0.ffn.w3.weight", 0),
        ("model.layers.3.mlp.gate.weight", "layers.3.ffn.gate.weight", None),
        ("model.layers.3.mlp.gate.e_score_correction_bias", "layers.3.ffn.gate.bias", None),
        ("model.layers.3.mlp.shared_experts.down_proj.weight", "layers.3.ffn.shared_experts.w2.weight", 1),
        ("model.layers.3.mlp.experts.17.up_proj.weight", "layers.3.ffn.experts.17.w3.weight", None),
    ],
)
def test_rename_follows_the_table(hf, kv, dim):
    name, got_dim, expert = rename(hf)
    assert (name, got_dim) == (kv, dim)
    assert expert == (17 if ".experts.17." in hf else None)
    assert to_hf_name(kv) == hf


def test_mapping_covers_every_converted_name():
    hf_config = {"num_hidden_layers": 2, "first_k_dense_replace": 1, "n_routed_experts": 4,
                 "q_lora_rank": 8, "n_shared_experts": 1}  # fmt: skip
    names = expected_names(hf_config)
    assert len(names) == 3 + 2 * 14 + 3 + (2 + 3 * 4 + 3)
    for name in names:
        assert rename(to_hf_name(name))[0] == name
    assert {v[0] for v in MAPPING.values()} >= {"wq_b", "wkv_b", "wo", "w1", "w2", "w3", "head"}


# ------------------------------------------------------------------ MP=1 and MP=2
def test_mp1_is_a_lossless_rename():
    hf = _hf_tensors(hf_checkpoint("exact"))
    out = load_file(str(converted("exact", 1) / "model0-mp1.safetensors"))
    n_layers = CONFIGS["exact"]["n_layers"]
    assert not [k for k in out if k.startswith(f"layers.{n_layers}.")]  # MTP skipped
    kept = {k for k in hf if not k.startswith(f"model.layers.{n_layers}.")}
    assert {to_hf_name(k) for k in out} == kept
    for name, t in out.items():
        assert t.dtype == hf[to_hf_name(name)].dtype
        assert torch.equal(t, hf[to_hf_name(name)]), name
    hf_cfg = json.loads((hf_checkpoint("exact") / "config.json").read_text())
    assert set(out) == expected_names(hf_cfg)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (converted("exact", 1) / f).read_bytes() == (hf_checkpoint("exact") / f).read_bytes()


@pytest.mark.parametrize("kind", ["exact", "fp8"])
def test_mp2_shards_reassemble_to_mp1(kind):
    full = load_file(str(converted(kind, 1) / "model0-mp1.safetensors"))
    parts = [load_file(str(converted(kind, 2) / f"model{r}-mp2.safetensors")) for r in range(2)]
    per_rank = CONFIGS[kind]["n_routed_experts"] // 2
    for name, t in full.items():
        _, dim, expert = rename(to_hf_name(name))
        if expert is not None:  # whole experts, on their owner rank only
            owner = expert // per_rank
            assert torch.equal(parts[owner][name], t) and name not in parts[1 - owner], name
        elif dim is None:  # replicated
            assert all(torch.equal(p[name], t) for p in parts), name
        else:
            assert parts[0][name].shape[dim] == t.shape[dim] // 2, name
            assert torch.equal(torch.cat([p[name] for p in parts], dim=dim), t), name


def test_fp8_checkpoint_keeps_scales_aligned_with_shards():
    hf = _hf_tensors(hf_checkpoint("fp8"))
    wq = hf["model.layers.0.self_attn.q_b_proj.weight"]
    assert wq.dtype == torch.float8_e4m3fn
    assert hf["model.layers.0.self_attn.q_b_proj.weight_scale_inv"].shape == (wq.shape[0] // 128, 1)
    assert hf["model.layers.0.self_attn.indexer.weights_proj.weight"].dtype == torch.bfloat16
    assert hf["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    full = load_file(str(converted("fp8", 1) / "model0-mp1.safetensors"))
    parts = [load_file(str(converted("fp8", 2) / f"model{r}-mp2.safetensors")) for r in range(2)]
    for name in ("layers.0.attn.wq_b", "layers.0.attn.wo", "layers.0.ffn.w2", "layers.1.ffn.shared_experts.w1"):
        dim = rename(to_hf_name(name + ".weight"))[1]
        whole = dequantize_fp8_blocks(full[name + ".weight"], full[name + ".scale"])
        pieces = [dequantize_fp8_blocks(p[name + ".weight"], p[name + ".scale"]) for p in parts]
        assert torch.equal(torch.cat(pieces, dim=dim), whole), name


def test_plan_reads_headers_only_and_lists_mtp():
    plan = plan_conversion(hf_checkpoint("fp8"), 4, 2)
    assert sorted(plan.skipped) == [
        "model.layers.2.eh_proj.weight", "model.layers.2.enorm.weight",
        "model.layers.2.shared_head.norm.weight",
    ]  # fmt: skip
    counts = [sum(1 for _ in plan.rank_tensors(r)) for r in range(2)]
    assert counts[0] == counts[1] and sum(counts) < 2 * len(plan.tensors)


# ----------------------------------------------------------------------------- errors
def _convert_error(tmp_path, src, n_experts=8, mp=2) -> str:
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        convert(src, out, n_experts, mp, progress=False)
    assert not list(out.glob("*.safetensors")) if out.exists() else True  # nothing written
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_error_missing_tensor_listed_in_index(tmp_path):
    ckpt = copy_checkpoint(hf_checkpoint("exact"), tmp_path / "hf")
    rewrite_hf(ckpt, drop=("model.layers.1.mlp.experts.5.up_proj.weight",), index_too=False)
    msg = _convert_error(tmp_path, ckpt)
    assert "missing tensor 'model.layers.1.mlp.experts.5.up_proj.weight'" in msg


def test_error_missing_tensor_absent_everywhere(tmp_path):
    ckpt = copy_checkpoint(hf_checkpoint("exact"), tmp_path / "hf")
    rewrite_hf(ckpt, drop=("model.layers.2.self_attn.indexer.k_norm.bias",))
    msg = _convert_error(tmp_path, ckpt)
    assert "missing tensor 'layers.2.attn.indexer.k_norm.bias'" in msg
    assert "model.layers.2.self_attn.indexer.k_norm.bias" in msg


def test_error_missing_fp8_scale(tmp_path):
    ckpt = copy_checkpoint(hf_checkpoint("fp8"), tmp_path / "hf")
    rewrite_hf(ckpt, drop=("model.layers.0.self_attn.kv_b_proj.weight_scale_inv",))
    msg = _convert_error(tmp_path, ckpt, n_experts=4)
    assert "missing tensor 'model.layers.0.self_attn.kv_b_proj.weight_scale_inv'" in msg


def test_error_unknown_key(tmp_path):
    ckpt = copy_checkpoint(hf_checkpoint("exact"), tmp_path / "hf")
    rewrite_hf(ckpt, add={"model.layers.0.self_attn.rotary_proj.weight": torch.zeros(4, 4)})
    msg = _convert_error(tmp_path, ckpt)
    assert "unknown key 'model.layers.0.self_attn.rotary_proj.weight'" in msg


def test_error_shape_not_divisible(tmp_path):
    ckpt = copy_checkpoint(hf_checkpoint("exact"), tmp_path / "hf")
    rewrite_hf(ckpt, add={"lm_head.weight": torch.zeros(510, 64)})
    msg = _convert_error(tmp_path, ckpt, mp=4)
    assert "'lm_head.weight' shape [510, 64]: dim 0 (510) is not divisible by --model-parallel 4" in msg


def test_error_fp8_shard_not_on_block_boundary(tmp_path):
    msg = _convert_error(tmp_path, hf_checkpoint("fp8"), n_experts=4, mp=4)
    assert "must be a multiple of 128" in msg


def test_error_experts_not_divisible():
    with pytest.raises(ConversionError, match=r"--n-experts \(8\) must be a positive multiple of --model-parallel \(3\)"):
        plan_conversion(hf_checkpoint("exact"), 8, 3)
    with pytest.raises(ConversionError, match="does not match .*n_routed_experts = 8"):
        plan_conversion(hf_checkpoint("exact"), 16, 2)


def test_cli_convert(tmp_path, capsys):
    out = tmp_path / "kv"
    rc = main(["convert-checkpoint", "--hf-ckpt-path", str(hf_checkpoint("exact")), "--save-path",
               str(out), "--n-experts", "8", "--model-parallel", "2"])  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model0-mp2.safetensors", "model1-mp2.safetensors"]
    for r in range(2):
        ref = load_file(str(converted("exact", 2) / f"model{r}-mp2.safetensors"))
        got = load_file(str(out / f"model{r}-mp2.safetensors"))
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    capsys.readouterr()
    rc = main(["convert-checkpoint", "--hf-ckpt-path", str(tmp_path / "nope"), "--save-path",
               str(out), "--n-experts", "8", "--model-parallel", "2"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a directory" in err[0]


def test_fp8_block_quantisation_matches_a_per_tile_loop():
    from kvtier.model.hf_reference import quantize_fp8_blocks

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * torch.linspace(0.01, 3, 200)
    q, s = quantize_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    for r in range(3):
        for c in range(2):
            tile = w[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128]
            scale = tile.abs().max() / 448.0
            assert torch.equal(s[r, c], scale)
            want = (tile / scale).to(torch.float8_e4m3fn)
            assert torch.equal(q[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128].float(), want.float())
    deq = dequantize_fp8_blocks(q, s)
    # e4m3 keeps 3 mantissa bits: error <= 2^-4 of the value, plus subnormals near zero
    assert ((deq - w).abs() <= w.abs() / 16 + s.max() * 2**-9).all()
