"""``kvtier analyze`` throughput: records/s per block size, against the per-record pure-Python
reference (tests/analysis_ref.py) in the same run.

Generates (once, cached under --work) a DSA-shaped trace of 64 requests x 64 decode steps x 61
layers = 249,856 records with K = 2048 selected positions each (contexts 6-10K tokens, a
sticky selection per (request, layer): the sink, the newest token, a recent window and
scattered history, ~8 % replaced per step), as

- ``trace/trace_steps.arrow``: an uncompressed Arrow IPC file read through memory mapping,
  standing in for the columnar twin of the format work (plugged into
  ``kvtier.analysis.source``'s twin seam);
- ``trace/trace_steps.parquet``: kvtier's Parquet form (zstd, delta-packed lists).

Then times ``analyze`` on the whole trace (1 and 4 block sizes, from the twin and from
Parquet), pinned to one core, median of --repeat runs; times the reference on the first
--ref-records records and checks that the fast path gives the same numbers there. Prints a
table with the ratio.

    .venv/bin/python benchmarks/bench_analyze.py [--work /tmp/kvtier-bench] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LAYERS, REQUESTS, STEPS, K, BS = 61, 64, 64, 2048, 16
KVB = 656


def _schema() -> pa.Schema:
    i64, f64 = pa.int64(), pa.float64()
    tier = pa.struct([("hit_blocks", pa.list_(i64)), ("bytes_read", i64), ("read_ops", i64),
                      ("latency_us", f64), ("batch_size", i64)])
    return pa.schema([
        ("request_id", i64), ("layer_id", i64), ("step_idx", i64), ("seq_len_current", i64),
        ("block_size_tokens", i64), ("selected_token_pos", pa.list_(i64)),
        ("prefix", pa.struct([("prefix_cache_hit", pa.bool_()), ("prefix_cached_blocks", i64),
                              ("intersection_ratio", f64),
                              ("intersection_blocks", pa.list_(i64))])),
        ("kv_fetch", pa.struct([("hbm", tier), ("local_pool", tier), ("remote_pool", tier)])),
    ])


def generate(work: Path, requests: int, steps: int, layers: int, k: int, seed: int = 0) -> Path:
    """Write the trace (twin stand-in and Parquet) unless it is already there."""
    import pyarrow.parquet as pq

    done = work / "done.json"
    shape = {"requests": requests, "steps": steps, "layers": layers, "k": k, "seed": seed}
    if done.is_file() and json.loads(done.read_text()) == shape:
        return work
    rng = np.random.default_rng(seed)
    prompts = rng.integers(6144, 10240, requests)
    sel = {}
    (work / "trace").mkdir(parents=True, exist_ok=True)
    meta = {"schema_version": 1, "run_name": "bench_analyze", "dataset": "synthetic",
            "config": {"trace": {"kv_block_size": BS, "prefix_key_tokens": 256},
                       "kv_bytes_per_token": KVB, "backend": "hbm"},
            "format": "parquet", "shards": []}
    (work / "trace" / "trace_meta.json").write_text(json.dumps(meta))
    schema = _schema()
    ipc = pa.ipc.new_file(str(work / "trace" / "trace_steps.arrow"), schema)
    pqw = pq.ParquetWriter(str(work / "trace" / "trace_steps.parquet"), schema,
                           compression="zstd", use_dictionary=False,
                           column_encoding={"selected_token_pos": "DELTA_BINARY_PACKED"})
    empty_tier = {"hit_blocks": [], "bytes_read": 0, "read_ops": 0, "latency_us": None,
                  "batch_size": 0}
    for t in range(steps):
        rows = {n: [] for n in schema.names}
        wall = float(rng.integers(20_000, 40_000))
        for lv in range(layers):
            for r in range(requests):
                seq = int(prompts[r]) + t + 1
                cur = sel.get((r, lv))
                if cur is None:  # sink, recent window, scattered history
                    fixed = np.concatenate([np.arange(4), np.arange(seq - 64, seq)])
                    rest = rng.choice(seq - 64, k - 68, replace=False) + 4
                    cur = np.unique(np.concatenate([fixed, rest]))[:k]
                else:
                    cur = cur[rng.random(cur.shape[0]) > 0.08]
                    need = k - cur.shape[0] + 8
                    recent = rng.integers(max(0, seq - 512), seq, need // 2)
                    far = rng.integers(0, seq, need - need // 2)
                    cur = np.unique(np.concatenate([cur, recent, far, [seq - 1]]))
                    if cur.shape[0] > k:
                        drop = rng.choice(cur.shape[0] - 1, cur.shape[0] - k, replace=False)
                        cur = np.delete(cur, drop)
                sel[(r, lv)] = cur
                blocks = np.unique(cur // BS)
                cached = 16 if r % 2 and r > 1 else 0
                rows["request_id"].append(r)
                rows["layer_id"].append(lv)
                rows["step_idx"].append(seq - 1)
                rows["seq_len_current"].append(seq)
                rows["block_size_tokens"].append(BS)
                rows["selected_token_pos"].append(cur)
                inter = blocks[blocks < 16]
                rows["prefix"].append({"prefix_cache_hit": cached > 0,
                                       "prefix_cached_blocks": cached,
                                       "intersection_ratio": inter.shape[0] / blocks.shape[0],
                                       "intersection_blocks": inter})
                rows["kv_fetch"].append({
                    "hbm": {"hit_blocks": blocks, "bytes_read": blocks.shape[0] * BS * KVB,
                            "read_ops": 1, "latency_us": wall, "batch_size": requests},
                    "local_pool": empty_tier, "remote_pool": empty_tier})
        batch = pa.RecordBatch.from_pydict(rows, schema=schema)
        ipc.write_batch(batch)
        pqw.write_batch(batch, row_group_size=2048)
        print(f"\rgenerating: step {t + 1}/{steps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ipc.close()
    pqw.close()
    done.write_text(json.dumps(shape))
    return work


def twin_seam(work: Path):
    """A ``read_columns(trace, columns)`` over the memory-mapped IPC file (zero copy)."""
    from kvtier.analysis.source import _complete, _flatten

    def read_columns(trace, columns):
        src = pa.memory_map(str(Path(trace) / "trace_steps.arrow"))
        table = pa.ipc.open_file(src).read_all()
        return _complete(_flatten(table), columns)

    return read_columns


def time_analyze(trace: Path, block_sizes, repeat: int, twin=None, shared=1 << 18):
    from kvtier.analysis import source
    from kvtier.analysis.analyze import AnalysisSettings, analyze

    saved = source._twin_reader
    if twin is not None:
        source._twin_reader = lambda: twin
    try:
        times, res = [], None
        for _ in range(repeat):
            t0 = time.perf_counter()
            res = analyze(trace, AnalysisSettings(block_sizes=tuple(block_sizes),
                                                  shared_samples=shared))
            times.append(time.perf_counter() - t0)
    finally:
        source._twin_reader = saved
    return statistics.median(times), res


def prefix_trace(work: Path, n: int) -> Path:
    """The first ``n`` records as their own Parquet trace (for the reference)."""
    import pyarrow.parquet as pq

    out = work / f"prefix{n}"
    if not (out / "trace_steps.parquet").is_file():
        out.mkdir(parents=True, exist_ok=True)
        src = pa.memory_map(str(work / "trace" / "trace_steps.arrow"))
        table = pa.ipc.open_file(src).read_all().slice(0, n)
        pq.write_table(table, out / "trace_steps.parquet")
        (out / "trace_meta.json").write_text((work / "trace" / "trace_meta.json").read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/kvtier-bench-analyze",
                    help="where the generated trace is cached (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs, median (default 3)")
    ap.add_argument("--ref-records", type=int, default=400,
                    help="records the reference is timed on (default %(default)s)")
    ap.add_argument("--cores", type=int, default=1, help="CPU cores to pin to (default 1)")
    ap.add_argument("--steps", type=int, default=STEPS, help="decode steps (default 64)")
    ap.add_argument("--skip-parquet", action="store_true", help="do not time the Parquet read")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))
    work = generate(Path(args.work), REQUESTS, args.steps, LAYERS, K)
    from analysis_ref import reference_analysis
    from test_analysis import assert_same

    from kvtier.analysis.analyze import AnalysisSettings, analyze
    from kvtier.analysis.kernels import kernels
    from kvtier.sim.tiers.config import load_tier_config

    n_rec = REQUESTS * args.steps * LAYERS
    twin = twin_seam(work)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"pinned to {args.cores}; Python {platform.python_version()}, numpy {np.__version__}, "
          f"kernels: {kernels().name}; load average {os.getloadavg()[0]:.2f}")
    print(f"trace: {n_rec:,} records, K = {K}, block size {BS}")
    analyze(prefix_trace(work, 2000), AnalysisSettings())  # JIT warm-up (cached on disk)
    rows = []
    for label, sizes in (("1 block size (16)", [16]), ("4 block sizes (16,32,64,128)",
                                                        [16, 32, 64, 128])):
        t, res = time_analyze(work / "trace", sizes, args.repeat, twin=twin)
        assert res["records_analyzed"] == n_rec
        rows.append((f"fast, twin stand-in, {label}", t, n_rec * len(sizes) / t))
        if not args.skip_parquet and len(sizes) == 1:
            tp, _ = time_analyze(work / "trace", sizes, 1)
            rows.append((f"fast, trace_steps.parquet, {label}", tp, n_rec * len(sizes) / tp))
    # the reference on a prefix, checked equal to the fast path there
    ptrace = prefix_trace(work, args.ref_records)
    s = AnalysisSettings(block_sizes=(16,), shared_samples=0).check()
    t0 = time.perf_counter()
    ref = reference_analysis(ptrace, s, load_tier_config(s.tiers), KVB, shared=False)
    t_ref = time.perf_counter() - t0
    fast = analyze(ptrace, s)
    for r in fast["results"]:
        r.pop("shared_cache")
    assert_same(fast, ref)
    rows.append((f"reference (pure Python), first {args.ref_records} records, 1 block size",
                 t_ref, args.ref_records / t_ref))
    base = rows[-1][2]
    print(f"{'run':<62} {'seconds':>9} {'records/s per bs':>17} {'vs reference':>13}")
    for name, t, rate in rows:
        print(f"{name:<62} {t:>9.2f} {rate:>17,.0f} {rate / base:>12.0f}x")
    print("fast path equals the reference on the first "
          f"{args.ref_records} records (all sections but the shared-cache curves)")


if __name__ == "__main__":
    main()
