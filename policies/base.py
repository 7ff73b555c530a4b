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
MAX_REQUEST_IDX = (1 << 31) - 1


def block_key(request_idx: int, layer_id: int, block_id: int) -> int:
    """Pack (request index, layer, block id) into one non-negative int key."""
    return (request_idx << (_LAYER_BITS + _BLOCK_BITS)) | (layer_id << _BLOCK_BITS) | block_id


def block_keys(request_idx: int, layer_id: int, block_ids: np.ndarray) -> np.ndarray:
    """Vectorised ``block_key`` for many blocks of one (request, layer)."""
    base = (request_idx << (_LAYER_BITS + _BLOCK_BITS)) | (layer_id << _BLOCK_BITS)
    return np.asarray(block_ids, dtype=np.int64) | np.int64(base)


def block_keys_columns(request_idx: np.ndarray, layer_id: np.ndarray, block_ids: np.ndarray
                       ) -> np.ndarray:
    """Vectorised ``block_key`` over aligned columns (one entry per access)."""
    req = np.asarray(request_idx, dtype=np.int64)
    if req.shape[0] and int(req.max()) > MAX_REQUEST_IDX:
        raise ValueError(f"request index {int(req.max())} exceeds {MAX_REQUEST_IDX}")
    return ((req << (_LAYER_BITS + _BLOCK_BITS))
            | (np.asarray(layer_id, dtype=np.int64) << _BLOCK_BITS)
            | np.asarray(block_ids, dtype=np.int64))


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

    Subclasses implement ``__contains__``, ``__len__``, ``touch``, ``insert``, ``remove`` and
    ``keys``. ``access`` (hit -> touch, miss -> insert) is the hot path; fast policies override
    ``access_many``. ``insert`` returns the victims it evicted so a tiered store can demote them.

    Context: a policy with ``needs_context = True`` reads ``self.ctx``; whoever drives it (the
    single-tier simulator, the tiered backend) calls ``begin_record`` before the accesses of each
    trace record (one decode step x request x layer). Others may skip that call.

    Offline policies (``offline = True``) get the exact future key stream through
    ``set_future`` before the first access; every ``touch``/``insert`` then consumes one position.
    """

    name: str = "base"
    #: reads ``self.ctx`` (set through ``begin_record``)
    needs_context: bool = False
    #: needs ``set_future`` with the whole key stream before the first access
    offline: bool = False

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

    def begin_record(self, step_idx: int, layer_id: int, request_idx: int, seq_len: int,
                     block_size: int) -> None:
        """The next accesses belong to this (decode step, layer, request); updates ``ctx``.
        Context-aware policies may override (call ``super()``) to react, e.g. to decay."""
        ctx = self.ctx
        ctx.step_idx = step_idx
        ctx.layer_id = layer_id
        ctx.request_idx = request_idx
        ctx.seq_len = seq_len
        ctx.block_size = block_size

    def access(self, key: int) -> bool:
        """Read ``key``: a hit refreshes it, a miss makes it resident. Returns hit."""
        if key in self:
            self.touch(key)
            return True
        self.insert(key)
        return False

    def access_many(self, keys: Iterable[int]) -> int:
        """Access keys in order; return the number of hits. Same result as calling ``access``
        per key; subclasses override with a tight loop."""
        hits = 0
        access = self.access
        for key in keys:
            hits += access(key)
        return hits

    def set_future(self, keys: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Offline policies (Belady/OPT) receive the whole future key stream here, in the
        order it will be accessed. Online policies ignore it."""

    @abstractmethod
    def keys(self) -> Iterable[int]:
        """The resident keys (any order)."""

    def release_request(self, request_idx: int) -> list[int]:
        """Drop every resident block of a finished request; return the dropped keys."""
        lo = request_idx << (_LAYER_BITS + _BLOCK_BITS)
        hi = (request_idx + 1) << (_LAYER_BITS + _BLOCK_BITS)
        gone = [k for k in list(self.keys()) if lo <= k < hi]
        for k in gone:
            self.remove(k)
        return gone


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
