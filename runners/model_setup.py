"""Build what a live run needs: the model (checkpoint or seeded random weights), its
tokenizer and the KV backend. torch is imported inside the functions only.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.runners.provenance import RANDOM_WEIGHTS_WARNING

#: builtin config used when no checkpoint is given / when one is
DEFAULT_CONFIG_NO_CKPT = "demo"
DEFAULT_CONFIG_CKPT = "671B_v3.2"


@dataclass(slots=True)
class ModelBundle:
    model: Any  # kvtier.model.model.Transformer
    args: Any  # kvtier.model.args.ModelArgs
    tokenizer: Any  # kvtier.model.tokenizer.Tokenizer
    config_path: Path
    random_weights: bool
    device: str
    rank: int = 0
    world_size: int = 1


def resolve_config(config: str | os.PathLike | None, ckpt_path: str | None) -> Path:
    """A config json path, or a builtin name (``demo``, ``tiny``, ``671B_v3.2``)."""
    from kvtier.model.args import CONFIG_DIR, ConfigError

    if config is None:
        config = DEFAULT_CONFIG_CKPT if ckpt_path else DEFAULT_CONFIG_NO_CKPT
    path = Path(config)
    if path.is_file():
        return path
    builtin = CONFIG_DIR / f"config_{config}.json"
    if builtin.is_file():
        return builtin
    known = sorted(p.stem.removeprefix("config_") for p in CONFIG_DIR.glob("config_*.json"))
    raise ConfigError(f"--config: {config} is neither a file nor a builtin config ({', '.join(known)})")


def kv_bytes_per_token(args: Any) -> int:
    """KV bytes per token per layer of the model's reference caches (1284 B for 671B)."""
    from kvtier.trace.tracer import kv_bytes_per_token as _formula

    return _formula(args.kv_lora_rank, args.qk_rope_head_dim, args.index_head_dim)


def init_distributed() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; starts the process group if > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            if local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                    "start at most one process per GPU (torchrun --nproc-per-node)")
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
    return rank, world


def load_model(
    config: str | os.PathLike | None,
    ckpt_path: str | None,
    *,
    device: str | None = None,
    seed: int = 0,
    max_batch_size: int | None = None,
    max_seq_len: int | None = None,
    quiet: bool = False,
) -> ModelBundle:
    """The model on ``device`` (cuda when available) with real or seeded random weights.

    Without ``ckpt_path`` the weights are seeded random and a loud warning is printed; the
    run records ``random_weights: true`` in run_meta.json.
    """
    import torch

    from kvtier.model.args import ModelArgs
    from kvtier.model.loading import build_model
    from kvtier.model.random_init import init_random_
    from kvtier.model.tokenizer import Tokenizer

    rank, world = init_distributed()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config_path = resolve_config(config, ckpt_path)
    args = ModelArgs.from_json(config_path)
    overrides: dict[str, Any] = {}
    if max_seq_len is not None:
        overrides["max_seq_len"] = max_seq_len
    if max_batch_size is not None and max_batch_size > args.max_batch_size:
        overrides["max_batch_size"] = max_batch_size
    model = build_model(config_path, ckpt_path, device, seed=seed, **overrides)
    args = model.args
    if not ckpt_path:
        init_random_(model, seed=seed)
        if not quiet and rank == 0:
            print(f"WARNING: {RANDOM_WEIGHTS_WARNING} (config {config_path.name})", file=sys.stderr)
    model.eval()
    tokenizer = Tokenizer(ckpt_path)
    return ModelBundle(model, args, tokenizer, config_path, not ckpt_path, device, rank, world)

