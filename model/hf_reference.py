"""Tiny random DeepSeek-V3.2 checkpoints in the real Hugging Face layout, and the config mapping.

Used by the tests (convert, load, TP, the cross-check with transformers'
``DeepseekV32ForCausalLM``) and handy for trying the pipeline without the 671B weights.
The written directory looks like the release: sharded ``*.safetensors`` with
``model.safetensors.index.json``, one key per routed expert, optionally fp8 e4m3 weights with
128x128 ``weight_scale_inv`` block scales, an extra MTP layer ``model.layers.{n_layers}``, a
``config.json`` and the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kvtier.model.args import ModelArgs

BLOCK = 128
FP8_MAX = 448.0

#: release linears stored in fp8 (module names, §9); everything else stays bf16/fp32
_FP8_MODULES = (
    "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj", "wq_b", "wk",
)  # fmt: skip


def rope_parameters(args: ModelArgs) -> dict[str, Any]:
    """HF ``rope_parameters`` that reproduce the reference's RoPE for ``args`` (§4, §13).

    The reference applies YaRN only when ``max_seq_len > original_seq_len``; HF applies it
    whenever ``rope_type == "yarn"``, so the type follows the reference's rule. Both mscale keys
    equal 1.0, so HF leaves cos/sin unscaled and multiplies the softmax scale by m^2 like the
    reference does.
    """
    if not args.yarn:
        return {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    return {
        "rope_type": "yarn",
        "rope_theta": float(args.rope_theta),
        "factor": float(args.rope_factor),
        "original_max_position_embeddings": int(args.original_seq_len),
        "beta_fast": float(args.beta_fast),
        "beta_slow": float(args.beta_slow),
        "mscale": float(args.mscale),
        "mscale_all_dim": float(args.mscale),
    }


def hf_config_dict(args: ModelArgs) -> dict[str, Any]:
    """ModelArgs -> ``DeepseekV32Config`` keyword arguments (§13)."""
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "first_k_dense_replace": args.n_dense_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "n_shared_experts": args.n_shared_experts,
        "n_routed_experts": args.n_routed_experts,
        "num_experts": args.n_routed_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "routed_scaling_factor": args.route_scale,
        "norm_topk_prob": True,
        "q_lora_rank": args.q_lora_rank,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "index_n_heads": args.index_n_heads,
        "index_head_dim": args.index_head_dim,
        "index_topk": args.index_topk,
        "max_position_embeddings": args.max_seq_len,
        "rope_parameters": rope_parameters(args),
        "rms_norm_eps": 1e-6,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
    }


def args_dict_from_hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """HF ``config.json`` -> a demo-format config dict (the inverse of ``hf_config_dict``).

    ``max_seq_len`` / ``max_batch_size`` are runtime choices, not in HF configs: set them.
    """
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    out = {
        "vocab_size": cfg["vocab_size"],
        "dim": cfg["hidden_size"],
        "inter_dim": cfg["intermediate_size"],
        "moe_inter_dim": cfg["moe_intermediate_size"],
        "n_layers": cfg["num_hidden_layers"],
        "n_dense_layers": cfg["first_k_dense_replace"],
        "n_heads": cfg["num_attention_heads"],
        "n_routed_experts": cfg["n_routed_experts"],
        "n_shared_experts": cfg["n_shared_experts"],
        "n_activated_experts": cfg["num_experts_per_tok"],
        "n_expert_groups": cfg["n_group"],
        "n_limited_groups": cfg["topk_group"],
        "route_scale": cfg["routed_scaling_factor"],
        "score_func": "sigmoid",
        "q_lora_rank": cfg["q_lora_rank"],
        "kv_lora_rank": cfg["kv_lora_rank"],
        "qk_nope_head_dim": cfg["qk_nope_head_dim"],
        "qk_rope_head_dim": cfg["qk_rope_head_dim"],
        "v_head_dim": cfg["v_head_dim"],
        "index_n_heads": cfg["index_n_heads"],
        "index_head_dim": cfg["index_head_dim"],
        "index_topk": cfg["index_topk"],
        "rope_theta": float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
    }
    if rope.get("rope_type", rope.get("type")) == "yarn":
        out |= {
            "rope_factor": float(rope["factor"]),
            "original_seq_len": int(rope["original_max_position_embeddings"]),
            "beta_fast": int(rope.get("beta_fast", 32)),
            "beta_slow": int(rope.get("beta_slow", 1)),
            "mscale": float(rope.get("mscale", 1.0)),
        }
    quant = cfg.get("quantization_config") or {}
    if quant.get("quant_method") == "fp8":
        out["dtype"] = "fp8"
        out["scale_fmt"] = quant.get("scale_fmt")
    else:
        out["dtype"] = "bf16"
    return out


def quantize_fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight -> (e4m3 weight, fp32 ``weight_scale_inv``[ceil(out/128), ceil(in/128)]).

    One multiplier per 128x128 tile, amax/448 as in the release (dequant = w8 * scale).
    """
    import torch
    import torch.nn.functional as F

    out_f, in_f = weight.shape
    rows, cols = -(-out_f // BLOCK), -(-in_f // BLOCK)
    w = F.pad(weight.float(), (0, cols * BLOCK - in_f, 0, rows * BLOCK - out_f))
    tiles = w.view(rows, BLOCK, cols, BLOCK)
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(rows * BLOCK, cols * BLOCK)[:out_f, :in_f].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def dequantize_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``w8[r, c] * scale[r // 128, c // 128]`` (the inverse of ``quantize_fp8_blocks``)."""
    out_f, in_f = weight.shape
    full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:out_f, :in_f]
    return weight.float() * full


def is_fp8_weight(hf_name: str) -> bool:
    """Whether the release stores ``hf_name`` in fp8 with block scales."""
    parts = hf_name.split(".")
    return parts[-1] == "weight" and len(parts) > 1 and parts[-2] in _FP8_MODULES


def build_hf_model(args: ModelArgs, seed: int = 0, std: float | None = None):
    """A random fp32 ``DeepseekV32ForCausalLM`` for ``args``.

    HF's init (std 0.02, unit norms, zero router bias) gives near-zero logits and many index
    score ties; ``std`` (default ``dim**-0.5``) and randomised norms, LayerNorm bias and router
    bias make every code path matter and the top-k selections unambiguous.
    """
    import torch
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    config = DeepseekV32Config(**hf_config_dict(args))
    gen = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            model = DeepseekV32ForCausalLM(config)
        finally:
            torch.set_default_dtype(prev)
    std = args.dim**-0.5 if std is None else std
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("k_norm.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 3:  # fused experts [E, out, in]
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # linears [out, in]
                scale = std if p.shape[-1] == args.dim else p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    model.eval()
    return model


def write_hf_checkpoint(
    out_dir: str | Path,
    args: ModelArgs,
    seed: int = 0,
    dtype: str = "bf16",
    fp8: bool = False,
    mtp: bool = True,
    n_files: int = 3,
    tokenizer: bool = True,
    model=None,
) -> Path:
    """Write a random checkpoint in the release layout; return ``out_dir``.

    ``dtype`` ("bf16" or "fp32") is the storage dtype of non-fp8 tensors (the router bias is
    always fp32); ``fp8`` stores the release's linears as e4m3 + ``weight_scale_inv``.
    ``model`` reuses an existing HF model (from ``build_hf_model``) for the weights.
    """
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(args, seed) if model is None else model
    store = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tensors: dict[str, torch.Tensor] = {}
    for name, t in hf_state_dict(model).items():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = t.float().contiguous()
        elif fp8 and is_fp8_weight(name):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(t)
        else:
            tensors[name] = t.to(store).contiguous()
    if mtp:  # the release's MTP layer: must be skipped by the converter
        gen = torch.Generator().manual_seed(seed + 1)
        p = f"model.layers.{args.n_layers}."
        tensors[p + "eh_proj.weight"] = torch.randn(args.dim, 2 * args.dim, generator=gen).to(store)
        tensors[p + "enorm.weight"] = torch.ones(args.dim, dtype=store)
        tensors[p + "shared_head.norm.weight"] = torch.ones(args.dim, dtype=store)
    names = sorted(tensors)
    n_files = max(1, min(n_files, len(names)))
    weight_map = {}
    for i in range(n_files):
        fname = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        chunk = names[i::n_files]
        save_file({k: tensors[k] for k in chunk}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(chunk, fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = model.config.to_dict()
    config["architectures"] = ["DeepseekV32ForCausalLM"]
    if fp8:
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [BLOCK, BLOCK],
        }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer:
        from kvtier.model.tokenizer import TOKENIZER_FILES, bundled_tokenizer_dir

        src = bundled_tokenizer_dir()
        for f in TOKENIZER_FILES:
            shutil.copyfile(src / f, out_dir / f)
    return out_dir


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under release names: fused experts split into per-expert keys."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            half = t.shape[1] // 2
            for j in range(t.shape[0]):
                out[f"{prefix}{j}.gate_proj.weight"] = t[j, :half]
                out[f"{prefix}{j}.up_proj.weight"] = t[j, half:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for j in range(t.shape[0]):
                out[f"{prefix}{j}.down_proj.weight"] = t[j]
        else:
            out[name] = t
    return out
