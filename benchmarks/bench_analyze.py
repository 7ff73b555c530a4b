"""``kvtier analyze`` throughput: records/s per block size, against the per-record pure-Python
reference (tests/analysis_ref.py) in the same run.

The trace (written once, cached under --work): the real tracer driven by the torch-free fake
indexer of ``kvtier sanity`` at DSA shape: 64 requests decoded together x 64 decode steps x 61
layers = 249,856 records, K = 2048 selected positions each out of 8,193-8,256 (prompt 8,192,
128 shared prefix tokens), 16-token blocks; ~5 GB of JSONL. Its columnar twin
(``kvtier.trace.columnar``) is built by a first ``read_columns`` (timed: that is the JSON parse
every later command skips); ``analyze`` then reads the twin.

Timed: ``analyze`` of the whole trace with 1 and with 4 block sizes, pinned to one core, median
of --repeat runs (wall and CPU time; the machine is shared, so the load average is printed);
the reference on the first --ref-records records (records parsed before the clock starts, so
both sides are timed on the metrics alone), checked equal to the fast path on those records
(every section except the shared-cache curves, whose reference LRU stack is quadratic).

    .venv/bin/python benchmarks/bench_analyze.py [--work /tmp/kvtier-bench-analyze] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = {"requests": 64, "batch_size": 64, "layers": 61, "prompt_len": 8192,
         "shared_prefix": 128, "new_tokens": 64, "topk": 2048, "seed": 0}


def generate(work: Path, steps: int) -> Path:
    """The trace under ``work/trace`` (written unless it is there with this shape)."""
    from kvtier.trace.sanity import SanityConfig, run_sanity
    from kvtier.trace.settings import TraceSettings

    shape = dict(SHAPE, new_tokens=steps)
    trace = work / "trace"
    done = work / "shape.json"
    if done.is_file() and json.loads(done.read_text()) == shape and trace.is_dir():
        return trace
    t0 = time.perf_counter()
    run_sanity(trace, SanityConfig(**shape), TraceSettings(kv_block_size=16), force=True,
               progress=True)
    done.write_text(json.dumps(shape))
    print(f"wrote {trace} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return trace


def first_lines(trace: Path, out: Path, n: int) -> Path:
    """The first ``n`` records of ``trace`` as their own trace (for the reference)."""
    if not (out / "trace_steps.jsonl").is_file():
        out.mkdir(parents=True, exist_ok=True)
        with open(trace / "trace_steps.jsonl", "rb") as src, \
                open(out / "trace_steps.jsonl", "wb") as dst:
            for _, line in zip(range(n), src, strict=False):
                dst.write(line)
        (out / "trace_meta.json").write_bytes((trace / "trace_meta.json").read_bytes())
    return out


def breakdown(trace: Path, sizes) -> dict[str, float]:
    """CPU seconds by part of one ``analyze`` run: each kernel, the twin reader, the rest."""
    from kvtier.analysis import kernels, source
    from kvtier.analysis.analyze import AnalysisSettings, analyze

    spent: dict[str, float] = {}
    k = kernels.kernels()
    saved = {name: getattr(k, name) for name in ("records_pass", "stream_pass", "iou_pass",
                                                  "sample_keys", "opt_hits")}
    saved_iter = source._iter_twin

    def wrap(name, fn):
        def inner(*a, **kw):
            c0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.process_time() - c0
        return inner

    def twin(*a, **kw):
        it = saved_iter(*a, **kw)
        while True:
            c0 = time.process_time()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                spent["twin read (lz4 decompress)"] = (spent.get("twin read (lz4 decompress)", 0)
                                                       + time.process_time() - c0)
            yield item

    for name, fn in saved.items():
        setattr(k, name, wrap(name, fn))
    source._iter_twin = twin
    try:
        c0 = time.process_time()
        analyze(trace, AnalysisSettings(block_sizes=tuple(sizes)))
        total = time.process_time() - c0
    finally:
        for name, fn in saved.items():
            setattr(k, name, fn)
        source._iter_twin = saved_iter
    spent["everything else (Python, numpy, Arrow)"] = total - sum(spent.values())
    spent["total"] = total
    return spent


def timed(fn, repeat: int):
    walls, cpus, res = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/kvtier-bench-analyze",
                    help="where the generated trace is cached (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs, median (default 3)")
    ap.add_argument("--ref-records", type=int, default=400,
                    help="records the reference is timed on (default %(default)s)")
    ap.add_argument("--steps", type=int, default=SHAPE["new_tokens"],
                    help="decode steps (default %(default)s: 249,856 records)")
    ap.add_argument("--cores", type=int, default=1, help="CPU cores to pin to (default 1)")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))[:args.cores] if hasattr(os, "sched_getaffinity") \
        else []
    if cores and os.environ.get("KVTIER_BENCH_PINNED") != "1" and shutil.which("taskset"):
        # pin the whole process (threads already started by imports included) by re-running
        # under taskset: sched_setaffinity from here would pin this thread only
        os.environ["KVTIER_BENCH_PINNED"] = "1"
        cpus = ",".join(map(str, cores))
        os.execvp("taskset", ["taskset", "-c", cpus, sys.executable, *sys.argv])
    if cores:
        os.sched_setaffinity(0, set(cores))
    from analysis_ref import iter_raw_records, reference_from_records
    from test_analysis import assert_same

    from kvtier.analysis.analyze import AnalysisSettings, analyze
    from kvtier.analysis.kernels import kernels
    from kvtier.sim.tiers.config import load_tier_config
    from kvtier.trace.columnar import column_cache_path, read_columns

    work = Path(args.work)
    trace = generate(work, args.steps)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"pinned to {args.cores}; Python {platform.python_version()}, numpy {np.__version__}, "
          f"kernels: {kernels().name}")
    rows = []
    if column_cache_path(trace) is None:
        w, c, table = timed(lambda: read_columns(trace), 1)
        rows.append(("first read_columns (JSON parse, writes the twin)", w, c, table.num_rows, 1))
        del table
    n_rec = None
    ptrace = first_lines(trace, work / f"first{args.ref_records}", args.ref_records)
    analyze(ptrace, AnalysisSettings())  # JIT warm-up (numba caches on disk)
    for label, sizes in (("1 block size (16)", (16,)), ("4 block sizes (16,32,64,128)",
                                                        (16, 32, 64, 128))):
        la = os.getloadavg()[0]
        w, c, res = timed(lambda s=sizes: analyze(trace, AnalysisSettings(block_sizes=s)),
                          args.repeat)
        assert res["skipped"]["malformed_lines"] == 0 and res["kernels"] == kernels().name
        n_rec = res["records_analyzed"]
        rows.append((f"analyze from the twin, {label}; load {la:.1f}", w, c, n_rec, len(sizes)))
    s = AnalysisSettings(block_sizes=(16,), shared_samples=0).check()
    raw, bad, tf = iter_raw_records(ptrace)
    cfg = load_tier_config(s.tiers)
    kvb = (tf.meta.config or {}).get("kv_bytes_per_token") if tf.meta else None
    w, c, ref = timed(lambda: reference_from_records(
        [dict(r) for r in raw], bad, tf, s, cfg, kvb, shared=False), 1)
    rows.append((f"reference (pure Python), first {args.ref_records} records, 1 block size",
                 w, c, args.ref_records, 1))
    fast = analyze(ptrace, s)
    for r in fast["results"]:
        r.pop("shared_cache")
    assert_same(fast, ref)
    base = rows[-1][3] / rows[-1][2]  # the reference's records per CPU second
    print(f"trace: {n_rec:,} records, K = {SHAPE['topk']}, 16-token blocks recorded")
    print(f"{'run':<66} {'wall s':>7} {'CPU s':>7} {'rec/s per bs':>13} {'(wall)':>9} "
          f"{'vs ref':>7}")
    for name, w, c, n, k in rows:
        rate = n * k / c
        print(f"{name:<66} {w:>7.2f} {c:>7.2f} {rate:>13,.0f} {n * k / w:>9,.0f} "
              f"{rate / base:>6.0f}x")
    print("rec/s per block size = records x block sizes / CPU seconds (wall in brackets); the "
          "ratio is on CPU time")
    print(f"fast path equals the reference on the first {args.ref_records} records (every "
          "section but the shared-cache curves)")
    for sizes in ((16,), (16, 32, 64, 128)):
        parts = breakdown(trace, sizes)
        print(f"CPU seconds by part, block sizes {sizes}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
