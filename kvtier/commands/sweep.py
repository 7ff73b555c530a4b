"""``kvtier sweep``: single-tier hit ratios over policies x capacities x block sizes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="single-tier hit-ratio grid: policies x capacities x block sizes -> CSV + Parquet",
        description="Re-bucket a trace's selected token positions to each block size, build the "
        "single-tier key stream (request, layer, block) in trace order and run every eviction "
        "policy at every capacity, in parallel over cores. Writes one table (CSV and Parquet). "
        "No torch.",
    )
    p.add_argument("trace_dir", metavar="TRACE_DIR",
                   help="trace directory (trace_steps.jsonl, shards, or trace_steps.parquet)")
    p.add_argument("--policies", default="lru,fifo,lfu,arc,s3fifo,belady",
                   help="comma-separated eviction policies: built-in names, module:Class, "
                        "file.py:Class or entry points, each optionally with :k=v,k=v "
                        "constructor arguments (default: %(default)s)")
    p.add_argument("--capacities", default="5%,10%,25%,50%",
                   help="comma-separated capacities: shares of the working set at each block "
                        "size (25%%, 0.25) or blocks (30blocks, 256, 1k = 1024); a bare number "
                        "up to 100 is refused as ambiguous (default: %(default)s)")
    p.add_argument("--block-sizes", default=None,
                   help="comma-separated block sizes in tokens (default: the trace's own)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes (default: %(default)s; capped at the core count); "
                        "per-cell times are each worker's CPU time (cpu_seconds), which "
                        "workers waiting for a core do not inflate, and the jobs column "
                        "records how many ran")
    p.add_argument("--out", required=True, metavar="CSV", help="output CSV table")
    p.add_argument("--parquet", default=None, metavar="PATH",
                   help="output Parquet table (default: --out with suffix .parquet)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.cli import CLIError
    from kvtier.sim.access import TraceReadError, read_access_stream
    from kvtier.sim.capacity import parse_capacity
    from kvtier.sim.sweep import (
        parse_block_size,
        parse_list,
        run_sweep,
        split_policies,
        write_table,
    )
    from kvtier.sim.tiers.specs import PolicySpecError, eviction_factory

    try:
        policies = split_policies(args.policies)
        caps = parse_list(args.capacities, parse_capacity, "--capacities")
        block_sizes = (parse_list(args.block_sizes, parse_block_size, "--block-sizes")
                       if args.block_sizes else None)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.jobs < 1:
        raise CLIError(f"--jobs: must be >= 1, got {args.jobs}")
    try:
        for pol in policies:
            eviction_factory(pol)
    except PolicySpecError as exc:
        raise CLIError(f"--policies: {exc}") from None
    out = Path(args.out)
    parquet = Path(args.parquet) if args.parquet else out.with_suffix(".parquet")
    try:
        if block_sizes is None:
            block_sizes = [read_access_stream(args.trace_dir).block_size]
        outcome = run_sweep(args.trace_dir, policies, caps, block_sizes, jobs=args.jobs,
                            progress=not args.no_progress)
    except TraceReadError as exc:
        raise CLIError(str(exc)) from None
    write_table(outcome.rows, out, parquet)
    print(f"{len(outcome.rows)} rows -> {out} and {parquet}")
    if outcome.errors:
        for e in outcome.errors:
            print(f"kvtier sweep: cell failed: {e}", file=sys.stderr)
        raise CLIError(f"{len(outcome.errors)} of {len(outcome.errors) + len(outcome.rows)} "
                       f"cells failed (completed rows were written)")
    return 0
