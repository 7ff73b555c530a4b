"""Point D: which prompt-prefix blocks a request could share with earlier requests.

Like vLLM's and Mooncake's prefix caches, a block of ``block_size`` prompt tokens is keyed by a
*chained* hash: hash(parent block's hash, this block's token ids), so equal keys mean equal
whole prefixes, not just equal blocks. Only full blocks within the first ``max_tokens`` prompt
tokens count. Hashes are blake2b (8-byte digest) over packed little-endian int32/int64 data:
stable across processes and machines, unlike Python's salted ``hash``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_ROOT = b"kvtier-prefix-v1"


def chained_block_hashes(tokens: Sequence[int] | np.ndarray, block_size: int, max_tokens: int) -> list[int]:
    """Chained 64-bit hashes of the full blocks within the first ``max_tokens`` tokens."""
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    arr = np.asarray(tokens, dtype=np.int64)
    n_blocks = min(len(arr), max(max_tokens, 0)) // block_size
    out: list[int] = []
    parent = hashlib.blake2b(_ROOT, digest_size=8).digest()
    for b in range(n_blocks):
        h = hashlib.blake2b(parent, digest_size=8)
        h.update(arr[b * block_size : (b + 1) * block_size].astype("<i8").tobytes())
        parent = h.digest()
        out.append(int.from_bytes(parent, "little"))
    return out


def prefix_key(hashes: Sequence[int]) -> str | None:
    """Hex of the last full block's chained hash (16 hex digits), or None without a full block."""
    if not hashes:
        return None
    return f"{hashes[-1]:016x}"


@dataclass(frozen=True, slots=True)
class PrefixState:
    """What point D knows about one request when it is admitted."""

    hashes: tuple[int, ...]
    key: str | None
    cached_blocks: int

    @property
    def n_prefix_blocks(self) -> int:
        """Prefix blocks of the request: block ids ``0 .. n - 1``."""
        return len(self.hashes)

    @property
    def cache_hit(self) -> bool:
        return self.cached_blocks > 0


class PrefixAnalyzer:
    """Remembers every prefix block hash seen in the run (an unbounded prefix cache)."""

    def __init__(self, block_size: int, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"prefix key tokens must be >= 0, got {max_tokens}")
        self.block_size = block_size
        self.max_tokens = max_tokens
        self._seen: set[int] = set()

    def admit(self, tokens: Sequence[int] | np.ndarray) -> PrefixState:
        """Analyse a new request's prompt against earlier ones, then remember its blocks."""
        hashes = chained_block_hashes(tokens, self.block_size, self.max_tokens)
        cached = 0
        for h in hashes:  # chained: the first unseen block ends the shared prefix
            if h not in self._seen:
                break
            cached += 1
        self._seen.update(hashes)
        return PrefixState(hashes=tuple(hashes), key=prefix_key(hashes), cached_blocks=cached)
