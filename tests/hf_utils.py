"""Shared helpers for the checkpoint tests: tiny configs and session-cached HF-layout checkpoints.

Building an HF model imports transformers' DeepSeek-V3.2 classes (seconds on a shared CI
core), so every checkpoint is built once per test session and reused read-only; tests that
damage a checkpoint copy it first (``copy_checkpoint``).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import cache
from pathlib import Path

import torch

from kvtier.model.args import ModelArgs

# one intra-op thread: on the 2 shared CI cores, torch's default pool oversubscribes and tiny
# ops slow down 20x under load (a 20-token fp8 generate: 1.4 s vs 37 s measured)
torch.set_num_threads(1)

#: exact-mode fp32 config for the cross-check and the TP test: index_topk 8 < 24-40 tokens
EXACT = dict(
    max_batch_size=2, max_seq_len=64, dtype="fp32", vocab_size=512, dim=64, inter_dim=128,
    moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4, n_routed_experts=8,
    n_shared_experts=1, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
    score_func="sigmoid", route_scale=2.5, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=16, v_head_dim=16, index_n_heads=8, index_head_dim=32, index_topk=8,
    indexer_exact=True,
)  # fmt: skip

#: fp8 release-like config: every TP-sharded fp8 dim splits into whole 128-blocks at MP=2
FP8 = dict(
    max_batch_size=2, max_seq_len=64, dtype="fp8", scale_fmt="ue8m0", vocab_size=512, dim=256,
    inter_dim=256, moe_inter_dim=128, n_layers=2, n_dense_layers=1, n_heads=4,
    n_routed_experts=4, n_shared_experts=2, n_activated_experts=2, n_expert_groups=2,
    n_limited_groups=1, score_func="sigmoid", route_scale=2.5, q_lora_rank=128, kv_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, index_n_heads=4, index_head_dim=128,
    index_topk=8,
)  # fmt: skip

#: bf16 config with the real vocabulary, so chat prompts of the real tokenizer embed (CLI tests)
CLI = dict(
    max_batch_size=2, max_seq_len=64, dtype="bf16", vocab_size=129280, dim=32, inter_dim=64,
    moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=2, n_routed_experts=4,
    n_shared_experts=1, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
    score_func="sigmoid", route_scale=2.5, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16,
    qk_rope_head_dim=16, v_head_dim=16, index_n_heads=4, index_head_dim=32, index_topk=4,
    indexer_exact=True,
)  # fmt: skip

CONFIGS = {"exact": EXACT, "fp8": FP8, "cli": CLI}
#: storage dtype of the non-fp8 tensors of each checkpoint
STORE = {"exact": "fp32", "fp8": "bf16", "cli": "bf16"}

_ROOT = Path(tempfile.mkdtemp(prefix="kvtier-ckpt-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


def model_args(kind: str, **overrides) -> ModelArgs:
    return ModelArgs.from_dict({**CONFIGS[kind], **overrides})


@cache
def hf_model(kind: str, seed: int = 0):
    """The random fp32 HF ``DeepseekV32ForCausalLM`` behind checkpoint ``kind``."""
    from kvtier.model.hf_reference import build_hf_model

    return build_hf_model(model_args(kind), seed=seed)


@cache
def hf_checkpoint(kind: str) -> Path:
    """An HF release-layout checkpoint directory (3 files + index, MTP layer, tokenizer)."""
    from kvtier.model.hf_reference import write_hf_checkpoint

    out = _ROOT / f"hf-{kind}"
    return write_hf_checkpoint(
        out, model_args(kind), dtype=STORE[kind], fp8=kind == "fp8", model=hf_model(kind)
    )


@cache
def converted(kind: str, mp: int) -> Path:
    """``hf_checkpoint(kind)`` converted for ``mp`` ranks, plus the demo-format config.json."""
    from kvtier.model.convert import convert

    out = _ROOT / f"kv-{kind}-mp{mp}"
    convert(hf_checkpoint(kind), out, CONFIGS[kind]["n_routed_experts"], mp, progress=False)
    (out / "kvtier_config.json").write_text(json.dumps(CONFIGS[kind]))
    return out


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_hf(ckpt: Path, drop: tuple[str, ...] = (), add: dict | None = None, index_too: bool = True) -> None:
    """Edit an HF checkpoint copy in place: drop tensors, add or replace tensors (a new one goes
    to the first file). ``index_too=False`` keeps dropped tensors listed in the index json."""
    from safetensors.torch import load_file, save_file

    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    add = dict(add or {})
    home = {name: index["weight_map"].get(name, files[0]) for name in add}
    for fname in files:
        tensors = load_file(str(ckpt / fname))
        for name in drop:
            tensors.pop(name, None)
            if index_too:
                index["weight_map"].pop(name, None)
        tensors.update({k: v for k, v in add.items() if home[k] == fname})
        save_file(tensors, str(ckpt / fname), metadata={"format": "pt"})
    index["weight_map"].update(home)
    index_path.write_text(json.dumps(index))
