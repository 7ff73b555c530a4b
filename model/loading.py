"""Load a converted shard into a built ``Transformer``, and build a ready model like generate.py.

Every tensor the model expects (its ``state_dict``: parameters and persistent buffers) is
checked against the shard's safetensors header before anything is copied: present, same shape,
same dtype (or a lossless upcast such as the bf16 ``head``/norms/``weights_proj`` of the
release into kvtier's fp32 parameters). The first bad tensor is named in one line; a shard with
tensors the model does not have (a config or MP mismatch) is rejected as well.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kvtier.model.args import ModelArgs
    from kvtier.model.model import Transformer

#: the reference generate.py's seed
DEFAULT_SEED = 33377335

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
#: checkpoint dtype -> model dtypes it may be loaded into without losing information
_UPCASTS = {"bfloat16": ("float32",), "float16": ("float32",)}


class CheckpointError(ValueError):
    """A shard that does not fit the model; the message names the file and the tensor."""


def shard_path(ckpt_dir: str | Path, rank: int, world_size: int) -> Path:
    """``{ckpt_dir}/model{rank}-mp{world_size}.safetensors`` (what ``convert`` writes)."""
    return Path(ckpt_dir) / f"model{rank}-mp{world_size}.safetensors"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_shard(model: Transformer, path: str | Path) -> None:
    """Raise CheckpointError for the first tensor of ``path`` that does not fit ``model``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: shard not found (convert with --model-parallel matching WORLD_SIZE)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in header:
            raise CheckpointError(
                f"{path.name}: missing tensor {name!r} {list(tensor.shape)} "
                f"{_dtype_name(tensor.dtype)}; {_missing_hint(name, model.args, header)}"
            )
        shape, st_dtype = header[name]
        if shape != tuple(tensor.shape):
            raise CheckpointError(
                f"{path.name}: tensor {name!r} has shape {list(shape)}, the model expects "
                f"{list(tensor.shape)} (config or model-parallel size mismatch?)"
            )
        got, want = _ST_DTYPES.get(st_dtype, st_dtype), _dtype_name(tensor.dtype)
        if got != want and want not in _UPCASTS.get(got, ()):
            raise CheckpointError(
                f"{path.name}: tensor {name!r} has dtype {got}, the model expects {want} "
                "(does the config's 'dtype' match the checkpoint?)"
            )
    extra = [k for k in header if k not in expected]
    if extra:
        raise CheckpointError(
            f"{path.name}: unexpected tensor {extra[0]!r} not in the model"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + "; config or model-parallel size mismatch?"
        )


def _missing_hint(name: str, args: ModelArgs, header: dict) -> str:
    """What to do about a tensor the model needs and the shard lacks."""
    if name.endswith(".ffn.gate.bias"):
        return (
            f"this model has a router bias (gate_bias={args.gate_bias}, dim={args.dim}; the "
            "reference creates one only when dim == 7168): set \"gate_bias\": false in the "
            "config to run without it, or use a checkpoint that has it"
        )
    if name.endswith(".scale") and name[: -len("scale")] + "weight" in header:
        return (
            f"the config's dtype is {args.dtype!r} (fp8 weights with block scales), but this "
            "weight has no scale: set \"dtype\" to the checkpoint's (\"bf16\")"
        )
    return (
        "the shard does not fit the config: check that --config is the one the checkpoint "
        "was converted for (n_layers, n_dense_layers, n_routed_experts, ...) and the "
        "model-parallel size, or re-write the shard (kvtier convert-checkpoint) if it was cut short"
    )


def checkpoint_has_gate_bias(path: str | Path, args: ModelArgs) -> bool:
    """Whether the shard at ``path`` carries a router bias on its first MoE layer."""
    from safetensors import safe_open

    if args.n_dense_layers >= args.n_layers:
        return False
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f"layers.{args.n_dense_layers}.ffn.gate.bias" in set(f.keys())


def load_shard(model: Transformer, path: str | Path) -> None:
    """Check ``path`` against ``model`` (``check_shard``), then copy every tensor in."""
    import torch
    from safetensors import safe_open

    check_shard(model, path)
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad(), safe_open(str(path), framework="pt", device="cpu") as f:
        for name, target in targets.items():
            target.data.copy_(f.get_tensor(name))


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, else from the torchrun env, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def default_dtype_for(args: ModelArgs) -> torch.dtype:
    """torch default dtype a config runs under: fp32 for ``dtype="fp32"``, else bf16 (generate.py)."""
    import torch

    return torch.float32 if args.dtype == "fp32" else torch.bfloat16


def build_model(
    config_path: str | Path | ModelArgs,
    ckpt_path: str | Path | None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = DEFAULT_SEED,
    threads: int | None = None,
    **overrides,
) -> Transformer:
    """Build a ``Transformer`` as the reference generate.py does and load this rank's shard.

    Sets the default dtype (``dtype`` or the config's), the seed and optionally the thread count,
    builds under ``torch.device(device)`` and loads ``model{rank}-mp{world}.safetensors`` from
    ``ckpt_path`` (``None`` leaves the weights uninitialised, for callers that fill them).
    ``overrides`` replace config fields (e.g. ``max_seq_len``, ``indexer_exact``).
    """
    import torch

    from kvtier.model.args import ModelArgs
    from kvtier.model.model import Transformer

    if isinstance(config_path, ModelArgs):
        args = ModelArgs.from_dict({**config_path.to_dict(), **overrides}, source="<ModelArgs>")
    else:
        args = ModelArgs.from_json(config_path, **overrides)
    torch.set_default_dtype(dtype or default_dtype_for(args))
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rank, world = dist_rank_world()
    if ckpt_path is not None:  # fail on a missing shard before allocating the model
        path = shard_path(ckpt_path, rank, world)
        if not path.is_file():
            found = sorted(p.name for p in Path(ckpt_path).glob("model*-mp*.safetensors"))
            raise CheckpointError(
                f"{path}: shard for rank {rank} of {world} not found"
                + (f" (found {', '.join(found)})" if found else "")
            )
        if args.gate_bias is None and not args.has_gate_bias:
            # the reference's rule says no bias (dim != 7168); a checkpoint that carries one
            # (every HF-converted checkpoint has e_score_correction_bias) turns it on
            try:
                found_bias = checkpoint_has_gate_bias(path, args)
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
            if found_bias:
                args = ModelArgs.from_dict({**args.to_dict(), "gate_bias": True}, source=str(path))
    with torch.device(device):
        model = Transformer(args)
    if ckpt_path is not None:
        load_shard(model, shard_path(ckpt_path, rank, world))
    model.eval()
    return model
