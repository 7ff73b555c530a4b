"""``kvtier analyze`` throughput: records/s per block size, against the per-record pure-Python
reference (tests/analysis_ref.py) in the same run.

The trace (written once, cached under --work): the real tracer driven by the torch-free fake
indexer of ``kvtier sanity`` at DSA shape: 64 requests decoded together x 64 decode steps x 61
layers = 249,856 records, K = 2048 selected positions each out of 8,193-8,256 (prompt 8,192,
128 shared prefix tokens), 16-token blocks; ~5 GB of JSONL. Its columnar twin
(``kvtier.trace.columnar``) is built by a first ``read_columns`` (timed: that is the JSON parse
every later command skips); ``analyze`` then reads the twin.

Timed: ``analyze`` of the whole trace with 1 and with 4 block sizes, pinned to one core, median
of --repeat runs, each in a fresh process (wall and CPU time of the call; the machine is
shared, so the load average is printed). With ``--baseline-ref REF`` the same runs are made
with that commit's code in alternating rounds, on hard links of the same record files (so each
code keeps a twin in its own format); its twin is built first if it has none;
the reference on the first --ref-records records (records parsed before the clock starts, so
both sides are timed on the metrics alone), checked equal to the fast path on those records
(every section except the shared-cache curves, whose reference LRU stack is quadratic).

    .venv/bin/python benchmarks/bench_analyze.py [--work /tmp/kvtier-bench-analyze] [--repeat 3]
        [--baseline-ref REF]
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
from baseline import ROOT, add_baseline_args, baseline_code, rounds, run_code

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
                spent["twin read"] = spent.get("twin read", 0) + time.process_time() - c0
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


def worker(trace: str, what: str, warm: str) -> None:
    """One timed job of whichever kvtier is imported (this checkout's or a baseline's); prints
    JSON. ``what``: ``twin`` (a first read_columns, if the trace has no twin yet) or block
    sizes such as ``16,32`` (one analyze, after a JIT warm-up on the small trace ``warm``)."""
    from kvtier.trace.columnar import column_cache_path, read_columns

    out: dict = {"load": os.getloadavg()[0]}
    if what == "twin":
        out["built"] = column_cache_path(trace) is None
        if out["built"]:
            out["wall"], out["cpu"], table = timed(lambda: read_columns(trace), 1)
            out["records"] = table.num_rows
        twin = column_cache_path(trace)
        out["twin_bytes"] = twin.stat().st_size if twin is not None else None
    else:
        from kvtier.analysis.analyze import AnalysisSettings, analyze

        sizes = tuple(int(x) for x in what.split(","))
        analyze(warm, AnalysisSettings(block_sizes=sizes))  # numba's on-disk cache, loaded
        out["wall"], out["cpu"], res = timed(
            lambda: analyze(trace, AnalysisSettings(block_sizes=sizes)), 1)
        out["records"] = res["records_analyzed"]
        out["kernels"] = res["kernels"]
        out["skipped"] = sum(res["skipped"].values())
    print(json.dumps(out))


def linked_copy(src: Path, dst: Path) -> Path:
    """``dst`` holding hard links to ``src``'s files (not its twin): the same record files
    (size, mtime) with a twin of its own, for a baseline whose twin format differs."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(".") and not (dst / f.name).exists():
            os.link(f, dst / f.name)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/kvtier-bench-analyze",
                    help="where the generated trace is cached (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed runs (rounds, with a baseline), median (default 3)")
    ap.add_argument("--ref-records", type=int, default=400,
                    help="records the reference is timed on (default %(default)s)")
    ap.add_argument("--steps", type=int, default=SHAPE["new_tokens"],
                    help="decode steps (default %(default)s: 249,856 records)")
    ap.add_argument("--cores", type=int, default=1, help="CPU cores to pin to (default 1)")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip the CPU-by-part runs of this checkout")
    add_baseline_args(ap, "the analyze runs (and the twin build)")
    ap.add_argument("--worker", nargs=3, metavar=("TRACE", "WHAT", "WARM"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    cores = sorted(os.sched_getaffinity(0))[:args.cores] if hasattr(os, "sched_getaffinity") \
        else []
    if cores and os.environ.get("KVTIER_BENCH_PINNED") != "1" and shutil.which("taskset"):
        # pin the whole process (threads already started by imports included) by re-running
        # under taskset: sched_setaffinity from here would pin this thread only; the workers
        # inherit the affinity
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

    work = Path(args.work)
    trace = generate(work, args.steps)
    ptrace = first_lines(trace, work / f"first{args.ref_records}", args.ref_records)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"pinned to {args.cores}; Python {platform.python_version()}, numpy {np.__version__}, "
          f"kernels: {kernels().name}")
    script = str(Path(__file__).resolve())
    rows = []
    n_rec = None
    runs: dict[tuple[str, str], list[dict]] = {}
    with baseline_code(args) as codes:
        where = {}
        for i, (tag, code) in enumerate(codes):
            t, pt = (trace, ptrace) if i == 0 else (
                linked_copy(trace, work / f"trace-baseline{i}"),
                linked_copy(ptrace, work / f"first{args.ref_records}-baseline{i}"))
            where[tag] = (str(t), str(pt))
            got = json.loads(run_code(code, [script, "--worker", str(t), "twin", str(pt)])
                             .stdout.strip().splitlines()[-1])
            if got["built"]:
                rows.append((f"{tag}: first read_columns (JSON parse, writes the twin)",
                             got["wall"], got["cpu"], got["records"], 1))
            print(f"{tag}: twin {got['twin_bytes'] / 1e9:.2f} GB", flush=True)
        for order in rounds(codes, args.repeat):
            for tag, code in order:
                for what in ("16", "16,32,64,128"):
                    out = run_code(code, [script, "--worker", *where[tag][:1], what,
                                          where[tag][1]]).stdout
                    res = json.loads(out.strip().splitlines()[-1])
                    assert res["skipped"] == 0, res
                    runs.setdefault((tag, what), []).append(res)
        for tag, _ in codes:
            for what, label in (("16", "1 block size (16)"),
                                ("16,32,64,128", "4 block sizes (16,32,64,128)")):
                rs = runs[(tag, what)]
                n_rec = rs[0]["records"]
                loads = f"{min(r['load'] for r in rs):.1f}-{max(r['load'] for r in rs):.1f}"
                rows.append((f"{tag}: analyze from the twin, {label}; load {loads}",
                             statistics.median(r["wall"] for r in rs),
                             statistics.median(r["cpu"] for r in rs), n_rec,
                             len(what.split(","))))
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
    print(f"trace: {n_rec:,} records, K = {SHAPE['topk']}, 16-token blocks recorded; medians of "
          f"{args.repeat} {'alternating rounds' if len(codes) > 1 else 'runs'}, each a fresh "
          "process")
    print(f"{'run':<80} {'wall s':>7} {'CPU s':>7} {'rec/s per bs':>13} {'(wall)':>9} "
          f"{'vs ref':>7}")
    for name, w, c, n, k in rows:
        rate = n * k / c
        print(f"{name:<80} {w:>7.2f} {c:>7.2f} {rate:>13,.0f} {n * k / w:>9,.0f} "
              f"{rate / base:>6.0f}x")
    print("rec/s per block size = records x block sizes / CPU seconds (wall in brackets); the "
          "ratio is on CPU time")
    if len(codes) > 1:
        for what in ("16", "16,32,64,128"):
            mine = statistics.median(r["cpu"] for r in runs[(codes[0][0], what)])
            other = statistics.median(r["cpu"] for r in runs[(codes[1][0], what)])
            print(f"block sizes {what}: this checkout {other / mine:.2f}x {codes[1][0]} (CPU)")
    print(f"fast path equals the reference on the first {args.ref_records} records (every "
          "section but the shared-cache curves)")
    if not args.no_breakdown:
        for sizes in ((16,), (16, 32, 64, 128)):
            parts = breakdown(trace, sizes)
            print(f"CPU seconds by part, block sizes {sizes}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
