"""Fetch versus recompute: is it cheaper to read a prefix's KV from the remote pool or to run
the prefill again?

Recompute time = prefill FLOPs / (gpu_tflops x mfu). Prefill FLOPs come from the model dims
(docs/TIERS.md writes the formula out): per-token projections of MLA and the indexer, the dense
or MoE FFN (active experts only), plus the context-dependent parts: sparse MLA over
``min(p+1, index_topk)`` keys and the indexer over all ``p+1`` keys for the token at position p.
Fetch time = the remote tier's cost model for the prefix's blocks in every layer, unloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np

from kvtier.sim.tiers.config import ConfigError, RecomputeSpec, TierConfig, TierSpec
from kvtier.sim.tiers.cost import batch_time_us, read_ops


class ModelDims(msgspec.Struct, kw_only=True):
    """The dims FLOPs depend on; defaults are DeepSeek-V3.2-Exp 671B (dsa_model.md §2).
    Field names follow the reference ``config_*.json`` so those files load directly."""

    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_layers: int = 61
    n_dense_layers: int = 3
    n_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048


#: the other fields of a model config (the reference ``ModelArgs``'s and kvtier's own, as
#: ``kvtier.model.args.ModelArgs`` has them; tests/test_recompute.py pins the two lists
#: together): accepted and unused here. Listed, not imported: the simulator stays torch-free.
OTHER_CONFIG_FIELDS = frozenset({
    "max_batch_size", "max_seq_len", "dtype", "scale_fmt", "n_expert_groups",
    "n_limited_groups", "score_func", "route_scale", "original_seq_len", "rope_theta",
    "rope_factor", "beta_fast", "beta_slow", "mscale", "v1", "indexer_exact", "gate_bias"})


def load_model_dims(path: str | Path | None) -> ModelDims:
    """Model dims from a reference-format config JSON (every ``--config`` file of ``kvtier
    run`` loads; fields FLOPs do not depend on are accepted and unused), or the 671B
    defaults when ``path`` is None. An unknown field (a typo would silently keep the 671B
    default) or a wrong type raises ``ConfigError`` naming it."""
    if path is None:
        return ModelDims()
    p = Path(path)
    try:
        data = json.loads(p.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: cannot read model dims: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a JSON object of model config fields, got "
                          f"{type(data).__name__}")
    if "hidden_size" in data and "dim" not in data:
        raise ConfigError(f"{p}: this is a Hugging Face config.json (field 'hidden_size'); "
                          "--model-config takes the reference's ModelArgs json (dim, "
                          "n_layers, ...), e.g. model/configs/config_671B_v3.2.json")
    known = set(ModelDims.__struct_fields__) | OTHER_CONFIG_FIELDS
    for key in data:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{p}: unknown field {key!r}{hint} (a model config holds the "
                              "reference ModelArgs fields)")
    try:
        return msgspec.convert({k: v for k, v in data.items() if k in ModelDims.__struct_fields__},
                               ModelDims)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def per_token_flops(m: ModelDims) -> float:
    """FLOPs per token that do not depend on the context length (all layers)."""
    h = m.n_heads
    mla = 2 * (
        m.dim * m.q_lora_rank
        + m.q_lora_rank * h * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        + m.dim * (m.kv_lora_rank + m.qk_rope_head_dim)
        + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
        + h * m.v_head_dim * m.dim
    )
    indexer = 2 * (
        m.q_lora_rank * m.index_n_heads * m.index_head_dim
        + m.dim * m.index_head_dim
        + m.dim * m.index_n_heads
    )
    dense = 2 * 3 * m.dim * m.inter_dim
    moe = 2 * 3 * m.dim * m.moe_inter_dim * (m.n_activated_experts + m.n_shared_experts)
    moe += 2 * m.dim * m.n_routed_experts  # router
    n_moe = m.n_layers - m.n_dense_layers
    return float(m.n_layers * (mla + indexer) + m.n_dense_layers * dense + n_moe * moe)


def prefill_flops(m: ModelDims, prefix_tokens: np.ndarray) -> np.ndarray:
    """Prefill FLOPs for each prefix length in ``prefix_tokens`` (vectorised, closed form)."""
    p = np.asarray(prefix_tokens, dtype=np.float64)
    k = float(m.index_topk)
    # sum_{i<P} min(i+1, K) and sum_{i<P} (i+1)
    attended = np.where(p <= k, p * (p + 1) / 2, k * (k + 1) / 2 + (p - k) * k)
    causal = p * (p + 1) / 2
    mla_per_key = 2 * m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    idx_per_key = 2 * m.index_n_heads * (m.index_head_dim + 1)
    ctx = m.n_layers * (mla_per_key * attended + idx_per_key * causal)
    head = np.where(p > 0, 2.0 * m.dim * m.vocab_size, 0.0)
    return per_token_flops(m) * p + ctx + head


def recompute_us(m: ModelDims, spec: RecomputeSpec, prefix_tokens: np.ndarray) -> np.ndarray:
    return prefill_flops(m, prefix_tokens) / (spec.gpu_tflops * 1e12 * spec.mfu) * 1e6


def fetch_us(tier: TierSpec, cfg: TierConfig, n_layers: int, prefix_tokens: np.ndarray,
             block_size: int) -> np.ndarray:
    """Unloaded time to read whole blocks covering each prefix, in every layer, from ``tier``."""
    p = np.asarray(prefix_tokens, dtype=np.int64)
    blocks = -(-p // block_size) * n_layers
    seg_bytes = block_size * cfg.kv_bytes_per_token
    ops = read_ops(tier, blocks, seg_bytes)
    return batch_time_us(tier, ops, blocks * seg_bytes, read=True)


def break_even_tokens(m: ModelDims, cfg: TierConfig, tier: TierSpec, block_size: int) -> int | None:
    """Shortest prefix (tokens) from which fetching is no slower than recomputing, searched up
    to ``recompute.max_prefix_tokens``; None if recompute stays cheaper over the whole range."""
    top = cfg.recompute.max_prefix_tokens
    for lo in range(1, top + 1, 65536):  # exact scan, in chunks: usually ends in the first
        grid = np.arange(lo, min(lo + 65536, top + 1), dtype=np.int64)
        ok = fetch_us(tier, cfg, m.n_layers, grid, block_size) <= recompute_us(m, cfg.recompute, grid)
        idx = np.flatnonzero(ok)
        if idx.size:
            return int(grid[idx[0]])
    return None


def fetch_vs_recompute(m: ModelDims, cfg: TierConfig, prompt_lens: dict[int, int],
                       block_size: int) -> dict | None:
    """The summary section: per request (keyed by its request id as a JSON object key) fetch
    and recompute time, and the break-even."""
    name = "remote_pool" if cfg.remote_pool is not None else "local_pool"
    tier = getattr(cfg, name)
    if tier is None:
        return None
    ids = list(prompt_lens)
    lens = np.array([prompt_lens[r] for r in ids], dtype=np.int64)
    f = fetch_us(tier, cfg, m.n_layers, lens, block_size)
    r = recompute_us(m, cfg.recompute, lens)
    return {
        "source_tier": name,
        "n_layers": m.n_layers,
        "gpu_tflops": cfg.recompute.gpu_tflops,
        "mfu": cfg.recompute.mfu,
        "per_token_flops": per_token_flops(m),
        "break_even_prefix_tokens": break_even_tokens(m, cfg, tier, block_size),
        "requests": len(ids),
        "fetch_faster": int(np.sum(f <= r)),
        "fetch_us_total": float(f.sum()),
        "recompute_us_total": float(r.sum()),
        "per_request": {
            str(rid): {"prefix_tokens": int(n), "fetch_us": float(a), "recompute_us": float(b)}
            for rid, n, a, b in zip(ids, lens, f, r, strict=True)
        },
    }
