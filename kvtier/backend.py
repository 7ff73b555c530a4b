"""The KVBackend interface: what fetching one (decode step, layer) of DSA selections costs.

A backend sees the same calls from a live model run (through the tracer) and from an offline
replay of a recorded trace, so policies can be compared without a GPU. It answers with one
``KVFetch`` per request row: exactly the ``kv_fetch`` field of a trace record. Each tier's
``hit_blocks`` lists the block ids that tier served, and the three lists partition the row's
``block_ids``; ``batch_size`` is the number of blocks in that tier's batch_get
(``len(hit_blocks)``). ``hit_blocks`` may be a numpy array (a view of ``block_ids``, or the
very array ``access.block_ids[i]`` when one tier served the whole row, which the tracer
writes without a copy).

Requests are identified by the integer ``request_id`` of the trace (0, 1, 2, ... in
admission order, assigned by the runner). Lifecycle per request: ``admit`` (prompt length and
prefix block hashes) -> any number of ``fetch`` calls interleaved with ``append`` (decoded
tokens written to the KV cache) -> ``release``. ``summary`` is called once at the end and
returns the backend's section of ``summary.json`` (or ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from kvtier.schema import KVFetch, TierFetch, empty_tier


@dataclass(frozen=True, slots=True)
class LayerAccess:
    """One (decode step, layer) of a batch: what the indexer selected, row by row.

    ``request_ids[i]`` is row i's integer request id; ``token_pos[i]`` and ``block_ids[i]``
    are sorted unique int arrays for row i; ``block_ids[i] == unique(token_pos[i] // block_size)``.
    ``step_wall_us`` is the measured wall time of the decode forward when known (live run
    or a recorded HBM latency), else ``None``.
    """

    step_idx: int
    layer_id: int
    request_ids: Sequence[int]
    token_pos: Sequence[np.ndarray]
    block_ids: Sequence[np.ndarray]
    block_size: int
    step_wall_us: float | None = None


@runtime_checkable
class KVBackend(Protocol):
    """Per-tier cost of DSA's sparse KV reads."""

    name: str

    def admit(self, request_id: int, prompt_len: int, prefix_hashes: Sequence[int] = ()) -> None:
        """A request enters: its prompt KV (``prompt_len`` tokens) now exists somewhere."""

    def append(self, request_id: int, n_tokens: int = 1) -> None:
        """``n_tokens`` decoded tokens were appended to the request's KV."""

    def fetch(self, access: LayerAccess) -> list[KVFetch]:
        """Serve one (step, layer) of selections; one ``KVFetch`` per row of ``access``."""

    def release(self, request_id: int) -> None:
        """The request finished; its KV may be dropped or kept for prefix reuse."""

    def summary(self) -> dict | None:
        """The backend's section of ``summary.json`` (per-tier totals), or ``None``."""


class HBMOnlyBackend:
    """All KV lives in HBM: every selected block is an HBM hit.

    ``hbm.hit_blocks`` = the row's ``block_ids`` (the same array), ``batch_size`` = their
    number, bytes = blocks x block_size x kv_bytes_per_token (whole blocks are read), one
    read op, latency = the measured step wall time; the pool tiers stay empty.
    """

    name = "hbm"

    def __init__(self, kv_bytes_per_token: int) -> None:
        if kv_bytes_per_token <= 0:
            raise ValueError(f"kv_bytes_per_token must be > 0, got {kv_bytes_per_token}")
        self.kv_bytes_per_token = kv_bytes_per_token

    def admit(self, request_id: int, prompt_len: int, prefix_hashes: Sequence[int] = ()) -> None:
        pass

    def append(self, request_id: int, n_tokens: int = 1) -> None:
        pass

    def release(self, request_id: int) -> None:
        pass

    def fetch(self, access: LayerAccess) -> list[KVFetch]:
        block_bytes = access.block_size * self.kv_bytes_per_token
        lat = access.step_wall_us
        out = []
        for blocks in access.block_ids:
            n = len(blocks)
            hbm = TierFetch(hit_blocks=blocks, bytes_read=n * block_bytes, read_ops=1,
                            latency_us=lat, batch_size=n)
            out.append(KVFetch(hbm=hbm, local_pool=empty_tier(), remote_pool=empty_tier()))
        return out

    def summary(self) -> dict | None:
        return None
