"""The notebook API: ``t = kvtier.open_trace(path)``.

    import kvtier
    t = kvtier.open_trace("outputs/demo_x/hbm")
    t.records()                # pyarrow.Table, dotted column names (prefix.*, kv_fetch.*)
    t.to_pandas(); t.to_polars()
    s = t.access_stream()      # kvtier.sim.access.AccessStream (numpy columns)
    a = t.analyze(block_sizes=(16, 64))          # the analysis.json dict
    r = t.replay(backend="sim", policy="lru", hbm_blocks=4096)   # a Trace of the replay
    t.report("report/", r)     # figures + HTML for this trace and others

No torch. pandas and polars are optional (``pip install 'kvtier[frames]'``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kvtier.analysis.analyze import AnalysisSettings, analyze
from kvtier.analysis.chunk import ALL_COLUMNS
from kvtier.analysis.source import iter_columns
from kvtier.trace.reader import find_trace


class Trace:
    """A trace directory (JSONL, shards or Parquet) opened for analysis."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files = find_trace(self.path)  # raises TraceError naming the problem

    def __repr__(self) -> str:
        return (f"Trace({str(self.path)!r}, format={self.files.format!r}, "
                f"files={len(self.files.files)})")

    @property
    def meta(self) -> dict:
        """``trace_meta.json`` as a dict ({} if absent)."""
        if self.files.meta is None:
            return {}
        import msgspec

        return msgspec.to_builtins(self.files.meta)

    @property
    def summary(self) -> dict | None:
        """``summary.json`` as a dict, or None."""
        p = self.files.root / "summary.json"
        return json.loads(p.read_bytes()) if p.is_file() else None

    def records(self, columns: Sequence[str] | None = None):
        """The records as one ``pyarrow.Table`` with flattened dotted column names (default:
        every column the analysis reads). Loads the whole trace: pick ``columns`` on big
        traces. Lines that do not parse are skipped, as ``analyze`` skips them."""
        import pyarrow as pa

        cols = list(columns) if columns is not None else list(ALL_COLUMNS)
        parts = list(iter_columns(self.files, cols))
        if not parts:
            from kvtier.analysis.source import COLUMN_TYPES

            return pa.table({c: pa.array([], type=COLUMN_TYPES.get(c, pa.null())) for c in cols})
        return pa.concat_tables(parts, promote_options="permissive")

    def to_pandas(self, columns: Sequence[str] | None = None):
        """The records as a pandas DataFrame (list columns as arrays)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise ImportError("Trace.to_pandas needs pandas: pip install 'kvtier[frames]' "
                              "(or pip install pandas)") from None
        return self.records(columns).to_pandas()

    def to_polars(self, columns: Sequence[str] | None = None):
        """The records as a polars DataFrame."""
        try:
            import polars as pl
        except ImportError:
            raise ImportError("Trace.to_polars needs polars: pip install 'kvtier[frames]' "
                              "(or pip install polars)") from None
        return pl.from_arrow(self.records(columns))

    def access_stream(self):
        """``kvtier.sim.access.read_access_stream``: per-record numpy columns and all selected
        positions in one array (what policies and replays consume)."""
        from kvtier.sim.access import read_access_stream

        return read_access_stream(self.path)

    def analyze(self, settings: AnalysisSettings | None = None, *, progress: bool = False,
                **kw) -> dict:
        """``kvtier analyze`` as a dict; keyword arguments are ``AnalysisSettings`` fields
        (``block_sizes=(16, 64)``, ``key_mode="request"``, ``lru_caps=(256,)``, ...)."""
        return analyze(self.path, settings or AnalysisSettings(**kw), progress=progress)

    def replay(self, backend: str = "sim", policy: str = "lru", out: str | Path | None = None,
               *, force: bool = False, progress: bool = False, **kw) -> Trace:
        """``kvtier replay`` into ``out`` (default: a new temporary directory); other keyword
        arguments are ``kvtier.sim.replay.ReplaySettings`` fields (``tiers``, ``hbm_blocks``,
        ``prefetch``, ...). Returns the replayed trace."""
        from kvtier.sim.replay import ReplaySettings, replay

        out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="kvtier-replay-"))
        replay(self.path, out, ReplaySettings(backend=backend, policy=policy, **kw),
               force=force, progress=progress)
        return Trace(out)

    def report(self, out: str | Path, *others: Trace | str | Path,
               labels: Sequence[str] | None = None, settings: AnalysisSettings | None = None,
               title: str = "kvtier trace report") -> Path:
        """Figures and ``out/index.html`` for this trace and ``others`` side by side."""
        from kvtier.analysis.report import unique_labels, write_report

        traces = [self] + [o if isinstance(o, Trace) else Trace(o) for o in others]
        names = list(labels) if labels is not None else unique_labels([str(t.path)
                                                                      for t in traces])
        return write_report([(n, t.analyze(settings)) for n, t in zip(names, traces,
                                                                        strict=True)],
                            out, title)


def open_trace(path: str | Path) -> Trace:
    """Open a trace directory (or one trace file) for the notebook API."""
    return Trace(path)
