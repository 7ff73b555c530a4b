"""The analysis hot loops, in two implementations with one set of signatures.

Every function below exists as plain numpy (always available) and as a numba kernel (extra
``fast``). ``kernels()`` returns the numba set when numba imports and ``KVTIER_NO_NUMBA`` is
unset, else the numpy set; ``tests/test_analysis_kernels.py`` pins both to the same outputs.

What numba buys (one core, K = 2048, 16-token blocks): the numpy path makes several passes over
every selected position and block (a shift, a comparison, a gather, a bincount ...) and runs
the per-stream state (reuse distance, working sets, LRU) one group of records at a time with
``np.add.at``; the kernels make one pass over the positions and one over the blocks of each
record, holding the record's working state in registers. See docs/BENCHMARKS.md.

Conventions: all index arrays are int64; a chunk of ``n`` records has ``offsets`` (n + 1) into
``pos`` (sorted, unique within each record, 0 <= pos < seq_len); block ids of a record are
``pos // bs``, ascending. State arrays are owned by the caller (``kvtier.analysis.locality``)
and updated in place.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from kvtier.analysis.kernels.common import AMP_LEVELS, clogc_table, splitmix64
from kvtier.analysis.kernels.numpy_impl import NUMPY, groups_by_rank

__all__ = ["AMP_LEVELS", "NUMPY", "clogc_table", "groups_by_rank", "kernels", "numba_disabled",
           "numba_kernels", "splitmix64"]

_numba_ns: SimpleNamespace | None = None
_numba_failed = False


def numba_disabled() -> bool:
    """True when ``KVTIER_NO_NUMBA`` is set to anything but '' or '0'."""
    return os.environ.get("KVTIER_NO_NUMBA", "") not in ("", "0")


def kernels() -> SimpleNamespace:
    """The kernel set in use: numba when available and enabled, else numpy."""
    k = numba_kernels()
    return k if k is not None else NUMPY


def numba_kernels() -> SimpleNamespace | None:
    global _numba_ns, _numba_failed
    if numba_disabled() or _numba_failed:
        return None
    if _numba_ns is None:
        try:
            from kvtier.analysis.kernels.numba_impl import NUMBA

            _numba_ns = NUMBA
        except ImportError:
            _numba_failed = True
            return None
    return _numba_ns
