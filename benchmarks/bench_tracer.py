"""Tracer + writer throughput: top-k index arrays in, JSONL bytes on disk out.

Compares the tracer (``kvtier.trace.tracer.Tracer``, background writer) on its numba path (extra
``fast``) and on its pure-numpy path (``KVTIER_NO_NUMBA=1``) with a naive per-record
pure-Python implementation (sorted(set(...)), dict counting, json.dumps), all on the same
DSA-sized input (default K = 2048, 61 layers, 8K context, batch 4) and pinned to the same CPU
cores (default one). Prints a table and the speed-ups.

With ``--baseline-ref REF`` (a git ref of this repository, exported with ``git archive`` into
a temporary directory; nothing in the repository changes) or ``--baseline DIR`` (a checkout)
the same tracer runs are also made with that code, in alternating rounds, so one call gives
before/after on the same machine: each round runs both in fresh subprocesses (the package
imported from the checkout via PYTHONPATH), the best of ``--repeat`` rounds counts.

    .venv/bin/python benchmarks/bench_tracer.py [--steps 40] [--cores 1] [--baseline-ref HEAD~3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from baseline import add_baseline_args, baseline_code, rounds, run_code


def _tracer_api():
    """(Tracer, TraceSettings, step_numba) of whichever kvtier is imported: this layout
    (kvtier.trace.*) or the flat one before it (kvtier.tracer, kvtier.fastkern), so a
    baseline checkout of an older commit runs the same benchmark."""
    try:
        from kvtier.trace import step_numba
        from kvtier.trace.settings import TraceSettings
        from kvtier.trace.tracer import Tracer
    except ImportError:
        from kvtier import fastkern as step_numba
        from kvtier.settings import TraceSettings
        from kvtier.tracer import Tracer
    return Tracer, TraceSettings, step_numba


def make_pool(rng: np.random.Generator, n: int, rows: int, ctx: int, k: int) -> list[np.ndarray]:
    """``n`` distinct [rows, k] top-k arrays over positions < ctx (unique per row)."""
    pool = []
    for _ in range(n):
        keys = rng.random((rows, ctx), dtype=np.float32)
        pool.append(np.argpartition(keys, k - 1, axis=1)[:, :k].astype(np.int64))
    return pool


def naive_records(idx_rows: list[list[int]], step: int, bs: int, out) -> int:
    """The straightforward per-record implementation; returns bytes written."""
    written = 0
    end = step + 1
    for row in idx_rows:
        pos = sorted(set(row))
        offsets = sorted(end - 1 - p for p in pos)
        counts: dict[int, int] = {}
        for p in pos:
            counts[p // bs] = counts.get(p // bs, 0) + 1
        blocks = sorted(counts)
        per_block = sorted(counts.values())

        def pct(xs, q):
            h = (len(xs) - 1) * q / 100
            lo = int(h)
            hi = min(lo + 1, len(xs) - 1)
            return xs[lo] + (xs[hi] - xs[lo]) * (h - lo)

        tier = {"hit_blocks": [], "bytes_read": 0, "read_ops": 0, "latency_us": None, "batch_size": 0}
        rec = {
            "event": "dsa_topk", "run_name": "bench", "dataset": "synthetic", "rank": 0,
            "world_size": 1, "request_id": 0, "layer_id": 0, "step_idx": step,
            "seq_len_current": end, "unique_token_pos_count": len(pos), "offset_min": offsets[0],
            "offset_p50": pct(offsets, 50), "offset_max": offsets[-1], "block_size_tokens": bs,
            "selected_block_ids": blocks, "unique_blocks": len(blocks),
            "tokens_per_touched_block": {"mean": sum(per_block) / len(per_block),
                                         "p50": pct(per_block, 50), "p95": pct(per_block, 95)},
            "kv_fetch": {"hbm": {"hit_blocks": blocks, "bytes_read": len(blocks) * bs * 1284,
                                 "read_ops": 1, "latency_us": 1000.0, "batch_size": len(blocks)},
                         "local_pool": tier, "remote_pool": tier},
            "prefix": {"prefix_cache_hit": False, "prefix_cached_blocks": 0, "prefix_key": None,
                       "intersection_ratio": 0.0, "intersection_blocks": []},
            "selected_token_pos": pos, "scores_stats": None,
        }
        line = json.dumps(rec) + "\n"
        out.write(line)
        written += len(line)
    return written


def run_fast(pool, args, out_dir: Path) -> tuple[int, float, int]:
    Tracer, TraceSettings, _ = _tracer_api()
    settings = TraceSettings(kv_block_size=args.block_size)
    prompt_len = args.context - args.steps
    prompts = [[1] * prompt_len for _ in range(args.batch)]
    t0 = time.perf_counter()
    tracer = Tracer(settings, out_dir, run_name="bench", dataset="synthetic",
                    kv_bytes_per_token=1284, force=True)
    tracer.begin_batch(list(range(args.batch)), prompts)  # ints: older tracers str() them
    scores = None
    if args.scores:  # indexer scores per selected position, as the model passes them
        rng = np.random.default_rng(1)
        scores = [rng.standard_normal(rows.shape).astype(np.float32) for rows in pool]
    for s in range(args.steps):
        tracer.start_step(prompt_len + s)
        for layer in range(args.layers):
            i = (s * args.layers + layer) % len(pool)
            tracer.on_topk(layer, pool[i], None if scores is None else scores[i])
        tracer.end_step(1e-3)
    tracer.end_batch()
    summary = tracer.close()
    dt = time.perf_counter() - t0
    assert summary is not None
    size = sum(p.stat().st_size for p in out_dir.glob("trace_steps*.jsonl"))
    return summary.records, dt, size


def run_naive(pool, args, out_dir: Path, n_records: int) -> tuple[int, float, int]:
    prompt_len = args.context - args.steps
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    done = size = 0
    with open(out_dir / "naive.jsonl", "w") as fh:
        s = 0
        while done < n_records:
            rows = pool[s % len(pool)].tolist()
            size += naive_records(rows, prompt_len + s, args.block_size, fh)
            done += len(rows)
            s += 1
    return done, time.perf_counter() - t0, size


def _pin(cores: int) -> None:
    if cores > 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])


def worker(args) -> None:
    """One round in this process: each tracer path once; prints JSON rows."""
    _pin(args.cores)
    _, _, step_numba = _tracer_api()
    pool = make_pool(np.random.default_rng(0), 16, args.batch, args.context - args.steps, args.topk)
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-bench-"))
    paths = [("numba" if step_numba.load() is not None else "numpy (no numba)", "")]
    if not args.skip_numpy and step_numba.load() is not None:
        paths.append(("numpy", "1"))
    rows = []
    try:
        for name, flag in paths:
            os.environ["KVTIER_NO_NUMBA"] = flag
            if name == "numba":  # the JIT (numba's on-disk cache) is paid outside the timing
                run_fast(pool, argparse.Namespace(**{**vars(args), "steps": 1}), scratch / "warm")
            n, dt, size = run_fast(pool, args, scratch / name)
            rows.append([name, n, dt, size])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(rows))


def _round(code: Path, argv: list[str]) -> list:
    out = run_code(code, [str(Path(__file__).resolve()), "--worker", *argv],
                   drop_env=("KVTIER_NO_NUMBA",)).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="decode steps traced (default 40)")
    ap.add_argument("--batch", type=int, default=4, help="requests per step (default 4)")
    ap.add_argument("--layers", type=int, default=61, help="layers per step (default 61)")
    ap.add_argument("--topk", type=int, default=2048, help="indexer top-k (default 2048)")
    ap.add_argument("--context", type=int, default=8192, help="context length (default 8192)")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size (default 16)")
    ap.add_argument("--naive-records", type=int, default=600,
                    help="records for the naive baseline (default 600)")
    ap.add_argument("--cores", type=int, default=1,
                    help="pin the process (and its writer thread) to this many CPUs (default 1; 0 = no pinning)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of the tracer runs; the best counts (default 3)")
    ap.add_argument("--scores", action="store_true",
                    help="pass indexer scores with every top-k, as the model does (records get "
                         "scores_stats; the naive baseline stays without)")
    ap.add_argument("--skip-numpy", action="store_true",
                    help="do not also time the pure-numpy path (KVTIER_NO_NUMBA=1)")
    add_baseline_args(ap, "the tracer runs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    argv = [f"--steps={args.steps}", f"--batch={args.batch}", f"--layers={args.layers}",
            f"--topk={args.topk}", f"--context={args.context}", f"--block-size={args.block_size}",
            f"--cores={args.cores}"] + (["--skip-numpy"] if args.skip_numpy else []) \
        + (["--scores"] if args.scores else [])
    best: dict[tuple[str, str], list] = {}
    with baseline_code(args) as codes:
        for order in rounds(codes, args.repeat):
            for tag, code in order:
                for name, n, dt, size in _round(code, argv):
                    key = (tag, name)
                    if key not in best or dt < best[key][1]:
                        best[key] = [n, dt, size]
    base = len(codes) > 1
    _pin(args.cores)
    rng = np.random.default_rng(0)
    pool = make_pool(rng, 16, args.batch, args.context - args.steps, args.topk)
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-bench-"))
    try:
        naive = run_naive(pool, args, scratch / "naive", args.naive_records)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import numba

        nb = f", numba {numba.__version__}"
    except ImportError:
        nb = ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"pinned to {cpus}; python {platform.python_version()}, numpy {np.__version__}{nb}")
    print(f"input: K={args.topk}, {args.layers} layers, batch {args.batch}, context {args.context}, "
          f"block {args.block_size}, {args.steps} steps"
          f"{', with indexer scores' if args.scores else ''}; best of {args.repeat} rounds")
    print(f"{'implementation':<44}{'records':>9}{'seconds':>9}{'records/s':>11}{'bytes/rec':>11}{'MB/s':>8}")
    rows = [(f"{tag}: Tracer, {name}", *v) for (tag, name), v in best.items()]
    rows.append(("naive per-record Python", *naive))
    for name, n, dt, size in rows:
        print(f"{name:<44}{n:>9}{dt:>9.2f}{n / dt:>11.0f}{size / n:>11.0f}{size / dt / 1e6:>8.1f}")
    naive_rate = naive[0] / naive[1]
    for (tag, name), (n, dt, _) in best.items():
        if tag == "this checkout":
            line = f"{name}: {n / dt / naive_rate:.1f}x naive"
            other = best.get((codes[-1][0], name)) if base else None
            if other is not None:
                line += f", {(n / dt) / (other[0] / other[1]):.2f}x {codes[-1][0]}"
            print(line)


if __name__ == "__main__":
    main()
