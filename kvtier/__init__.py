"""kvtier: DeepSeek Sparse Attention top-k traces and tiered KV-cache emulation.

Three wings over one seam: ``kvtier.trace`` (the record, the tracer, trace files),
``kvtier.sim`` (access streams, cache simulation, replay, the tier emulator) and
``kvtier.analysis`` (metrics and reports), with ``kvtier.backend`` (the ``KVBackend`` seam) and
``kvtier.schema`` (the record types) below them. The names most users import are re-exported
here and load on first use, so ``import kvtier`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "KVBackend": "kvtier.backend",
    "HBMOnlyBackend": "kvtier.backend",
    "LayerAccess": "kvtier.backend",
    "TopkRecord": "kvtier.schema",
    "Tracer": "kvtier.trace.tracer",
    "TraceSettings": "kvtier.trace.settings",
    "open_trace": "kvtier.analysis.api",
    "analyze": "kvtier.analysis.analyze",
    "AnalysisSettings": "kvtier.analysis.analyze",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
