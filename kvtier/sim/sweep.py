"""Single-tier sweeps: policies x capacities x block sizes over one trace, in parallel.

Each grid cell re-buckets the recorded token positions to its block size, builds the
single-tier key stream and runs one eviction policy at one capacity (``kvtier.sim.cachesim``).
Cells run in a ``ProcessPoolExecutor``; workers get the decoded access stream by fork (or
re-read the trace under spawn) and cache the key stream per block size.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from kvtier.sim.access import AccessStream, BlockStream, read_access_stream, rebucket
from kvtier.sim.cachesim import simulate
from kvtier.sim.capacity import CapacitySpec, working_set_blocks
from kvtier.sim.tiers.specs import eviction_factory
from kvtier.trace.reader import SkippedLines

COLUMNS = (
    "block_size", "policy", "capacity_spec", "capacity_blocks", "working_set", "accesses",
    "hits", "misses", "hit_ratio", "miss_ratio", "jobs", "cpu_seconds", "accesses_per_cpu_s",
)


def parse_list(text: str, item: Callable[[str], object], flag: str) -> list:
    """Comma-separated list for a CLI flag; raises ``ValueError`` naming the flag."""
    parts = [p for p in (x.strip() for x in text.split(",")) if p]
    if not parts:
        raise ValueError(f"{flag}: empty list")
    out = []
    for p in parts:
        try:
            out.append(item(p))
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None
    return out


def split_policies(text: str) -> list[str]:
    """Split ``--policies``: commas separate policies, except inside a policy's ``:k=v,k=v``
    arguments (a part with ``=`` and no ``:`` continues the previous spec)."""
    out: list[str] = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        if out and "=" in part and ":" not in part and "=" in out[-1]:
            out[-1] += "," + part
        else:
            out.append(part)
    if not out:
        raise ValueError("--policies: empty list")
    return out


def parse_block_size(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"block size {text!r} is not an integer") from None
    if v <= 0:
        raise ValueError(f"block size {v} must be > 0")
    return v


# --------------------------------------------------------------------------------------------
# worker side

_STREAM: AccessStream | None = None
_TRACE: str | None = None
_BLOCKS: dict[int, tuple[BlockStream, int]] = {}


def _init_worker(trace: str) -> None:
    global _TRACE
    _TRACE = trace


def _block_stream(block_size: int) -> tuple[BlockStream, int]:
    global _STREAM
    if _STREAM is None:
        assert _TRACE is not None
        _STREAM = read_access_stream(_TRACE, SkippedLines())  # the parent warned once
    hit = _BLOCKS.get(block_size)
    if hit is None:
        bs = rebucket(_STREAM, block_size)
        hit = _BLOCKS[block_size] = (bs, working_set_blocks(bs))
    return hit


def run_cell(block_size: int, policy: str, cap: CapacitySpec) -> dict:
    """One grid cell -> one table row."""
    bs, ws = _block_stream(block_size)
    capacity = cap.resolve(ws)
    res = simulate(eviction_factory(policy)(capacity), bs)
    return {
        "block_size": block_size, "policy": policy, "capacity_spec": cap.text,
        "capacity_blocks": capacity, "working_set": ws, "accesses": res.accesses,
        "hits": res.hits, "misses": res.misses, "hit_ratio": res.hit_ratio,
        "miss_ratio": 1.0 - res.hit_ratio if res.accesses else 0.0,
        # CPU time of this worker, not wall time: workers waiting for a core under --jobs do
        # not inflate it (shared caches and memory bandwidth still can)
        "cpu_seconds": res.cpu_seconds, "accesses_per_cpu_s": res.accesses_per_cpu_s,
    }


# --------------------------------------------------------------------------------------------
# driver


@dataclass(slots=True)
class SweepOutcome:
    rows: list[dict]
    errors: list[str]


def run_sweep(trace: str | Path, policies: Sequence[str], capacities: Sequence[CapacitySpec],
              block_sizes: Sequence[int], jobs: int = 1, progress: bool = False) -> SweepOutcome:
    """Run the grid; rows come back in grid order (block size, policy, capacity).
    A failing cell is reported in ``errors`` and the other cells still complete."""
    global _STREAM, _TRACE
    for p in policies:
        eviction_factory(p)  # fail at start on an unknown policy or bad arguments
    _STREAM = read_access_stream(trace)  # fail at start on a bad trace; inherited on fork
    _TRACE = str(trace)
    _BLOCKS.clear()
    cells = [(b, p, c) for b in block_sizes for p in policies for c in capacities]
    rows: dict[int, dict] = {}
    errors: list[str] = []
    bar = _progress(len(cells), progress)
    jobs = max(1, min(int(jobs), len(cells), os.cpu_count() or 1))
    if jobs == 1:
        for i, cell in enumerate(cells):
            try:
                rows[i] = run_cell(*cell)
            except Exception as exc:  # noqa: BLE001 - reported per cell, others continue
                errors.append(f"block_size={cell[0]} policy={cell[1]} capacity={cell[2].text}: "
                              f"{type(exc).__name__}: {exc}")
            bar.update(1)
    else:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(str(trace),)) as ex:
            futs = {ex.submit(run_cell, *cell): i for i, cell in enumerate(cells)}
            for fut in as_completed(futs):
                i = futs[fut]
                cell = cells[i]
                try:
                    rows[i] = fut.result()
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"block_size={cell[0]} policy={cell[1]} "
                                  f"capacity={cell[2].text}: {type(exc).__name__}: {exc}")
                bar.update(1)
    bar.close()
    for row in rows.values():
        row["jobs"] = jobs
    return SweepOutcome([rows[i] for i in sorted(rows)], errors)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="sweep", unit="cell")


def write_table(rows: list[dict], csv_path: str | Path, parquet_path: str | Path | None) -> None:
    """Write the rows as CSV and (optionally) Parquet with the fixed column order."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    cols = {c: [r[c] for r in rows] for c in COLUMNS}
    types = {"block_size": pa.int64(), "policy": pa.string(), "capacity_spec": pa.string(),
             "capacity_blocks": pa.int64(), "working_set": pa.int64(), "accesses": pa.int64(),
             "hits": pa.int64(), "misses": pa.int64(), "hit_ratio": pa.float64(),
             "miss_ratio": pa.float64(), "jobs": pa.int64(), "cpu_seconds": pa.float64(),
             "accesses_per_cpu_s": pa.float64()}
    table = pa.table({c: pa.array(cols[c], type=types[c]) for c in COLUMNS})
    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, csv_path)
    if parquet_path is not None:
        pq.write_table(table, parquet_path)
