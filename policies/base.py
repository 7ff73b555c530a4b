"""Policy interfaces: one small class per decision a tiered KV store makes.

- ``EvictionPolicy``: which resident block leaves a full tier (one instance per tier).
- ``PlacementPolicy``: which tier a new block lands in, and how many replicas.
- ``PrefetchPolicy``: which blocks to move up before they are needed (sees layer l before l+1,
  step t before t+1).
- ``MigrationPolicy``: promote/demote between decode steps.

Blocks are identified by one int key (``block_key``) so hot loops stay cheap; ``split_key``
recovers (request index, layer, block id). Nothing here imports torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# key layout: | request index (31 bits) | layer (8 bits) | block id (24 bits) |
_BLOCK_BITS = 24
_LAYER_BITS = 8
_BLOCK_MASK = (1 << _BLOCK_BITS) - 1
_LAYER_MASK = (1 << _LAYER_BITS) - 1
MAX_BLOCK_ID = _BLOCK_MASK
MAX_LAYER = _LAYER_MASK


def block_key(request_idx: int, layer_id: int, block_id: int) -> int:
    """Pack (request index, layer, block id) into one non-negative int key."""
    return (request_idx << (_LAYER_BITS + _BLOCK_BITS)) | (layer_id << _BLOCK_BITS) | block_id


def block_keys(request_idx: int, layer_id: int, block_ids: np.ndarray) -> np.ndarray:
    """Vectorised ``block_key`` for many blocks of one (request, layer)."""
    base = (request_idx << (_LAYER_BITS + _BLOCK_BITS)) | (layer_id << _BLOCK_BITS)
    return np.asarray(block_ids, dtype=np.int64) | np.int64(base)


def split_key(key: int) -> tuple[int, int, int]:
    """Inverse of ``block_key``: (request index, layer, block id)."""
    return (
        key >> (_LAYER_BITS + _BLOCK_BITS),
        (key >> _BLOCK_BITS) & _LAYER_MASK,
        key & _BLOCK_MASK,
    )


@dataclass(slots=True)
class AccessContext:
    """Where the decode is when a policy is asked: lets distance- and DSA-aware policies see
    the current position of the request and the indexer's choice at this (step, layer)."""

    step_idx: int = 0
    layer_id: int = 0
    request_idx: int = 0
    seq_len: int = 0
    block_size: int = 16


class EvictionPolicy(ABC):
    """The resident set of one tier holding at most ``capacity`` blocks.

    Subclasses implement ``__contains__``, ``__len__``, ``touch``, ``insert`` and ``remove``.
    ``access`` (hit -> touch, miss -> insert) is the hot path; fast policies may override
    ``access_many``. ``insert`` returns the victims it evicted so a tiered store can demote them.
    """

    name: str = "base"

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.ctx = AccessContext()

    @abstractmethod
    def __contains__(self, key: int) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def touch(self, key: int) -> None:
        """A resident key was read."""

    @abstractmethod
    def insert(self, key: int) -> list[int]:
        """Make ``key`` resident; return the keys evicted to make room (possibly ``[key]``
        itself when the policy declines to admit it, e.g. capacity 0)."""

    @abstractmethod
    def remove(self, key: int) -> bool:
        """Drop ``key`` if resident (request released, block migrated); return whether it was."""

    def access(self, key: int) -> bool:
        if key in self:
            self.touch(key)
            return True
        self.insert(key)
        return False

    def access_many(self, keys: Iterable[int]) -> int:
        """Access keys in order; return the number of hits."""
        hits = 0
        for key in keys:
            hits += self.access(key)
        return hits

    def set_future(self, keys: np.ndarray) -> None:
        """Offline policies (Belady/OPT) receive the whole future key stream here, in the
        order it will be accessed. Online policies ignore it."""

    def keys(self) -> Iterable[int]:
        raise NotImplementedError


class PlacementPolicy(ABC):
    """Where a block goes when it is first written (prompt KV at admit, decoded tokens)."""

    name: str = "base"

    @abstractmethod
    def place(self, key: int, tiers: Sequence[str], free_blocks: dict[str, int]) -> list[str]:
        """Tiers that receive a copy of ``key`` (first = primary); ``free_blocks`` is the
        free capacity per tier right now."""


class PrefetchPolicy(ABC):
    """Moves blocks toward HBM ahead of use. Called after every (step, layer) with what was
    just selected; returns keys to bring into HBM before the next (step, layer)."""

    name: str = "none"

    @abstractmethod
    def plan(self, ctx: AccessContext, selected_keys: np.ndarray) -> np.ndarray:
        """Keys to prefetch into HBM; may be empty."""


class MigrationPolicy(ABC):
    """Promotes/demotes blocks between decode steps (background movement)."""

    name: str = "none"

    @abstractmethod
    def between_steps(self, step_idx: int, residency: dict[str, EvictionPolicy]) -> list[tuple[int, str, str]]:
        """Moves as (key, src tier, dst tier)."""
