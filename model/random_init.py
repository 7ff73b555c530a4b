"""Deterministic random weights for a ``Transformer``: tests, the demo and GPU checks run the
real architecture without a checkpoint.

Each tensor is drawn at its *global* (unsharded) shape from a generator seeded by the seed
and the parameter name, then the local TP shard is cut out, so MP=1 and MP=N ranks agree on
the full weights. fp8 weights are drawn in fp32 and block-quantised (128x128 scales) like the
DeepSeek checkpoints; the local shard is quantised on its own, which equals quantising the
global tensor only when shard sizes are multiples of 128 (bf16/fp32 shards always agree).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from . import kernels
from . import model as M


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def _shard(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Cut the local shard of a global tensor for the module's parallel style."""
    ws, rk = M.world_size, M.rank
    if ws == 1:
        return t
    if isinstance(module, (M.ColumnParallelLinear, M.ParallelEmbedding)):
        part = t.size(0) // ws
        return t.narrow(0, rk * part, part)
    if isinstance(module, M.RowParallelLinear):
        part = t.size(1) // ws
        return t.narrow(1, rk * part, part)
    return t


def _global_shape(module: nn.Module, local: torch.Size) -> tuple[int, int]:
    ws = M.world_size
    if isinstance(module, (M.ColumnParallelLinear, M.ParallelEmbedding)):
        return local[0] * ws, local[1]
    if isinstance(module, M.RowParallelLinear):
        return local[0], local[1] * ws
    return local[0], local[1]


@torch.no_grad()
def init_random_(
    model: nn.Module, seed: int = 0, embed_std: float = 1.0, norm_jitter: float = 0.05
) -> nn.Module:
    """Fill every parameter of ``model`` in place; returns the model.

    Linear weights ~ N(0, 1/in_features) keep activations O(1); norms get ``1 + jitter``;
    the gate bias and ``k_norm`` bias are small; the embedding is N(0, embed_std²).
    """
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        weight = params["weight"]
        dev = weight.device
        g = _generator(seed, name, dev)
        if isinstance(module, M.Linear) or isinstance(module, M.ParallelEmbedding):
            shape = _global_shape(module, weight.shape)
            std = embed_std if isinstance(module, M.ParallelEmbedding) else shape[1] ** -0.5
            full = torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * std
            local = _shard(full, module)
            if weight.dtype == kernels.FP8:
                q, s = kernels.quant_blocks(local)
                weight.copy_(q)
                module.scale.copy_(s)
            else:
                weight.copy_(local.to(weight.dtype))
        elif isinstance(module, (M.RMSNorm, M.LayerNorm)):
            weight.copy_(1 + norm_jitter * torch.randn(weight.shape, generator=g, device=dev))
            if isinstance(module, M.LayerNorm):
                module.bias.copy_(
                    norm_jitter * torch.randn(module.bias.shape, generator=g, device=dev)
                )
        elif isinstance(module, M.Gate):
            weight.copy_(
                torch.randn(weight.shape, generator=g, device=dev) * weight.size(1) ** -0.5
            )
            if module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g, device=dev))
        else:
            raise TypeError(
                f"init_random_: no rule for parameters of {name!r} ({type(module).__name__})"
            )
    return model
