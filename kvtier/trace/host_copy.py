"""Getting the indexer's top-k off the device without making the forward wait.

A CUDA tensor is copied non-blocking into a pinned host buffer and a CUDA event is recorded
after the copy; whoever builds the step's records waits on that event, not the forward. Each
step in flight has its own set of pinned buffers (keyed by layer slot, indices or scores,
shape and dtype), recycled once its records are built. torch is never imported here unless a
CUDA tensor arrives (so torch is already imported): a torch tensor is recognised by its
type's module.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch)."""
    return type(x).__module__.startswith("torch")


def as_numpy(x: Any) -> np.ndarray:
    """A host array as numpy: CPU tensors by ``.numpy()`` (half floats widened to float32),
    anything else by ``np.asarray``."""
    if is_torch(x):
        x = x.detach()
        if x.dtype.is_floating_point and x.element_size() < 4:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


class PinnedCopies:
    """Pinned host buffers for the CUDA top-k of the current step, one set per step in flight.

    ``copy`` fills the current step's set; ``take`` hands that set to the step (which then
    owns it until it is built) and starts a new one; ``recycle`` returns a built step's set
    (from the builder thread) for a later step to reuse.
    """

    def __init__(self) -> None:
        self.current: dict[tuple, Any] = {}  # the set the current step copies into
        self._free: list[dict] = []
        self._lock = threading.Lock()

    def copy(self, slot: int, kind: str, x: Any) -> tuple[Any, Any]:
        """Issue a non-blocking copy of CUDA tensor ``x`` (layer ``slot``, ``kind`` "i" for
        indices or "s" for scores); returns (pinned host tensor, event recorded after it)."""
        import torch  # only reached with a CUDA tensor, so torch is already imported

        if not self.current:  # first copy of this step: take a free set of pinned buffers
            with self._lock:
                self.current = self._free.pop() if self._free else {}
            self.current["in_use"] = True
        key = (slot, kind, tuple(x.shape), x.dtype)
        buf = self.current.get(key)
        if buf is None:
            buf = torch.empty(tuple(x.shape), dtype=x.dtype, device="cpu", pin_memory=True)
            self.current[key] = buf
        buf.copy_(x.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buf, event

    def take(self) -> dict:
        """The current step's set (empty if it copied nothing); the next copy starts a new one."""
        taken, self.current = self.current, {}
        return taken

    def recycle(self, buffers: dict | None) -> None:
        """A set ``take`` gave out, whose step is built: free for reuse (any thread)."""
        if buffers:
            with self._lock:
                self._free.append(buffers)
