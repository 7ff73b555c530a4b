"""Constants and helpers shared by both kernel sets."""

from __future__ import annotations

import numpy as np

#: power-of-two block sizes for read amplification: 2**0 ... 2**(AMP_LEVELS - 1) = 1 ... 512
#: (the numba kernel unrolls exactly ten counters)
AMP_LEVELS = 10


def clogc_table(bs: int) -> np.ndarray:
    """``c * ln(c)`` for c = 0 ... bs (0 for c = 0): the per-block entropy terms."""
    c = np.arange(bs + 1, dtype=np.float64)
    out = np.zeros(bs + 1)
    out[1:] = c[1:] * np.log(c[1:])
    return out


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (a bijection of uint64 with good avalanche), vectorised."""
    z = np.asarray(x).astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
