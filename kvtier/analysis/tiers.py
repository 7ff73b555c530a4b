"""Point C as recorded: per-tier hits, bytes, ops and latency percentiles; and sweep tables.

For a replayed trace (``kvtier replay --backend sim``) the records' ``kv_fetch`` holds what the
tier emulator served; for an HBM-only trace every block is an HBM hit and ``latency_us`` is the
step wall time. In the design note's schema ``hit_blocks`` is a list of block ids and
``batch_size`` its length (the count used here, so the lists are never decoded); traces of
kvtier's earlier form carry the count in ``hit_blocks`` itself. Latency percentiles are over the records a tier
served (non-null ``latency_us``), with numpy's linear percentiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvtier.analysis.chunk import TIER_FIELDS, Chunk, float_column, int_column
from kvtier.analysis.source import TIERS
from kvtier.analysis.stats import percentiles


class TierBreakdown:
    def __init__(self) -> None:
        self.sums = {t: {f: 0 for f in TIER_FIELDS if f != "latency_us"} for t in TIERS}
        self.served = {t: 0 for t in TIERS}
        self.latency: dict[str, list[np.ndarray]] = {t: [] for t in TIERS}
        self.records = 0

    def add(self, c: Chunk) -> None:
        import pyarrow as pa

        self.records += c.n
        tab = c.table

        def total(name: str) -> int:  # nulls count 0, as in a sum that skips them
            return int(int_column(tab, name).sum())

        for t in TIERS:
            sums = self.sums[t]
            hb = tab.column(f"kv_fetch.{t}.hit_blocks")
            bsz = f"kv_fetch.{t}.batch_size"
            # a count in older traces; in the design note's schema len(hit_blocks) = batch_size
            hits = int_column(tab, f"kv_fetch.{t}.hit_blocks"
                              if pa.types.is_integer(hb.type) and hb.null_count < len(hb)
                              else bsz)
            sums["hit_blocks"] += int(hits.sum())
            self.served[t] += int((hits > 0).sum())
            sums["bytes_read"] += total(f"kv_fetch.{t}.bytes_read")
            sums["read_ops"] += total(f"kv_fetch.{t}.read_ops")
            sums["batch_size"] += total(bsz)
            lat = float_column(tab, f"kv_fetch.{t}.latency_us")
            lat = lat[~np.isnan(lat)]
            if lat.shape[0]:
                self.latency[t].append(lat)

    def result(self, backend: str | None) -> dict:
        total_hits = sum(self.sums[t]["hit_blocks"] for t in TIERS)
        out: dict = {"backend": backend, "records": self.records,
                     "replayed": bool(backend and backend != "hbm")}
        for t in TIERS:
            s = self.sums[t]
            lat = np.concatenate(self.latency[t]) if self.latency[t] else np.zeros(0)
            out[t] = {
                "hit_blocks": s["hit_blocks"],
                "hit_share": s["hit_blocks"] / total_hits if total_hits else 0.0,
                "bytes_read": s["bytes_read"],
                "read_ops": s["read_ops"],
                "records_served": self.served[t],
                "batch_size_mean": s["batch_size"] / self.records if self.records else 0.0,
                "latency_us": percentiles(lat),
            }
        return out


def sweep_table(path: str | Path) -> dict:
    """A ``kvtier sweep`` table (CSV or Parquet) as policy x capacity hit ratios per block
    size. Raises ``ValueError`` naming the file and the missing columns."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    p = Path(path)
    try:
        table = pq.read_table(p) if p.suffix == ".parquet" else pacsv.read_csv(p)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{p}: not a readable sweep table: {exc}") from None
    need = ["block_size", "policy", "capacity_spec", "capacity_blocks", "hit_ratio"]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise ValueError(f"{p}: not a kvtier sweep table (missing column(s) {missing})")
    rows = table.select(need).to_pylist()
    by_bs: dict[str, dict] = {}
    for r in rows:
        d = by_bs.setdefault(str(r["block_size"]), {"capacities": [], "capacity_blocks": [],
                                                     "policies": {}})
        if r["capacity_spec"] not in d["capacities"]:
            d["capacities"].append(r["capacity_spec"])
            d["capacity_blocks"].append(r["capacity_blocks"])
    for r in rows:
        d = by_bs[str(r["block_size"])]
        pol = d["policies"].setdefault(r["policy"], [None] * len(d["capacities"]))
        pol[d["capacities"].index(r["capacity_spec"])] = r["hit_ratio"]
    return {"source": str(p), "block_sizes": by_bs}
