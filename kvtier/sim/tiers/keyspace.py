"""Request ids -> block keys, with cross-request sharing of prompt-prefix blocks.

Requests are numbered in admission order (the same order ``kvtier.sim.access`` numbers them by
first appearance). Block ``i`` of a prompt whose ``prefix_hashes[:i+1]`` all match blocks an
earlier request registered is read under that request's key, so shared prefix KV is stored and
cached once. The aliasing is fixed at admit (first registrant owns a hash), which keeps the key
stream a pure function of the admission order: offline policies can be given it in advance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvtier.policies.base import _BLOCK_BITS, _LAYER_BITS, MAX_REQUEST_IDX

_REQ_SHIFT = _LAYER_BITS + _BLOCK_BITS


class KeySpace:
    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.owner_of_hash: dict[int, int] = {}
        #: per request: owner request index of each shared prefix block (empty if none)
        self.alias: list[np.ndarray] = []
        #: per request: prompt block ids whose hashes this request registered (kept on release)
        self.owned: list[np.ndarray] = []

    def admit(self, request_id: str, prefix_hashes: Sequence[int] = ()) -> tuple[int, int]:
        """Number the request; return (index, blocks shared with earlier requests)."""
        if request_id in self.index:
            raise ValueError(f"request {request_id!r} admitted twice")
        idx = len(self.alias)
        if idx > MAX_REQUEST_IDX:
            raise ValueError(f"more than {MAX_REQUEST_IDX + 1} requests")
        self.index[request_id] = idx
        owners: list[int] = []
        for h in prefix_hashes:
            o = self.owner_of_hash.get(int(h))
            if o is None:
                break
            owners.append(o)
        shared = len(owners)
        owned = []
        for i, h in enumerate(list(prefix_hashes)[shared:], start=shared):
            if self.owner_of_hash.setdefault(int(h), idx) == idx:
                owned.append(i)
        self.alias.append(np.asarray(owners, dtype=np.int64))
        self.owned.append(np.asarray(owned, dtype=np.int64))
        return idx, shared

    def shared_blocks(self, idx: int) -> int:
        return int(self.alias[idx].shape[0])

    def keys(self, idx: int, layer: int, blocks: np.ndarray) -> np.ndarray:
        """Keys of ``blocks`` of request ``idx`` in ``layer``; shared prefix blocks map to
        their owner's keys."""
        blocks = np.asarray(blocks, dtype=np.int64)
        base = np.int64((idx << _REQ_SHIFT) | (layer << _BLOCK_BITS))
        alias = self.alias[idx]
        if alias.shape[0] == 0:
            return blocks | base
        shared = blocks < alias.shape[0]
        owner = alias[np.minimum(blocks, alias.shape[0] - 1)]
        owner_keys = (owner << _REQ_SHIFT) | np.int64(layer << _BLOCK_BITS) | blocks
        return np.where(shared, owner_keys, blocks | base)
