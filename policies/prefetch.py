"""Prefetch policies: guess the next (step, layer)'s selection and move it to HBM early.

DSA's selections are similar across consecutive steps of a layer and across adjacent layers
of a step (kv_tiers.md §6: IndexCache, HISA, InfiniGen), so the two predictors copy one of
them. ``plan`` runs after every (step, layer) of the batch; the backend moves the returned
keys into HBM in the background while the layer computes.
"""

from __future__ import annotations

import numpy as np

from kvtier.policies.base import _BLOCK_BITS, _LAYER_MASK, AccessContext, PrefetchPolicy

_LAYER_FIELD = np.int64(_LAYER_MASK << _BLOCK_BITS)


def with_layer(keys: np.ndarray, layer: int) -> np.ndarray:
    """The same (request, block) keys in another layer."""
    return (np.asarray(keys, dtype=np.int64) & ~_LAYER_FIELD) | np.int64(layer << _BLOCK_BITS)


class NoPrefetch(PrefetchPolicy):
    name = "none"

    def plan(self, ctx: AccessContext, selected_keys: np.ndarray) -> np.ndarray:
        return np.empty(0, dtype=np.int64)


class _LayerTracker(PrefetchPolicy):
    """Knows the number of layers (``bind``, from the backend) or learns it from the layer ids
    it sees; after the last layer comes the next step's layer 0."""

    def __init__(self) -> None:
        self.n_layers = 0

    def bind(self, n_layers: int) -> None:
        self.n_layers = int(n_layers)

    def _next_layer(self, layer: int) -> int:
        self.n_layers = max(self.n_layers, layer + 1)
        return layer + 1 if layer + 1 < self.n_layers else 0


class PrevStepSameLayer(_LayerTracker):
    """Before (t, l+1), fetch what layer l+1 selected at the previous step t-1."""

    name = "prev_step_same_layer"

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[int, np.ndarray] = {}

    def plan(self, ctx: AccessContext, selected_keys: np.ndarray) -> np.ndarray:
        nxt = self._next_layer(ctx.layer_id)
        self.last[ctx.layer_id] = np.asarray(selected_keys, dtype=np.int64)
        return self.last.get(nxt, np.empty(0, dtype=np.int64)) if nxt != ctx.layer_id else \
            np.empty(0, dtype=np.int64)


class ThisStepPrevLayer(_LayerTracker):
    """Before (t, l+1), fetch the blocks layer l selected at this step, in layer l+1."""

    name = "this_step_prev_layer"

    def plan(self, ctx: AccessContext, selected_keys: np.ndarray) -> np.ndarray:
        nxt = self._next_layer(ctx.layer_id)
        if nxt <= ctx.layer_id:  # the next access is the next step's first layer
            return np.empty(0, dtype=np.int64)
        return with_layer(selected_keys, nxt)


POLICIES: dict[str, type[PrefetchPolicy]] = {
    NoPrefetch.name: NoPrefetch,
    PrevStepSameLayer.name: PrevStepSameLayer,
    ThisStepPrevLayer.name: ThisStepPrevLayer,
}
