"""``kvtier mrc``: the LRU miss-ratio curve at every capacity, from one stack-distance pass;
a bounded, knee-including set of them in the CSV."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mrc",
        help="LRU miss-ratio curve at every capacity (one stack-distance pass) -> CSV [+ PNG]",
        description="Compute the LRU stack distance of every single-tier access (key = request, "
        "layer, block at the chosen block size, trace order), which gives the LRU miss ratio "
        "at every capacity from 0 to the working set at once. The CSV has a bounded set of "
        "them by default (log-spaced capacities, plus the knee and the capacity below it): "
        "a 61-layer trace has millions of capacities; --all-capacities writes every one. "
        "The knee is where more capacity starts to pay less than on average (the point of "
        "the normalised hit curve furthest above its chord). No torch.",
    )
    p.add_argument("trace_dir", metavar="TRACE_DIR",
                   help="trace directory (trace_steps.jsonl, shards, or trace_steps.parquet)")
    p.add_argument("--block-sizes", default=None,
                   help="comma-separated block sizes in tokens, one curve each (default: the "
                        "trace's own)")
    p.add_argument("--block-size", default=None, dest="block_size_deprecated",
                   help="deprecated spelling of --block-sizes (the name kvtier sweep uses)")
    p.add_argument("--out", required=True, metavar="CSV",
                   help="output CSV: block_size, capacity_blocks, capacity_fraction, hits, "
                        "miss_ratio, knee (true on the knee's row)")
    p.add_argument("--points", type=int, default=64,
                   help="log-spaced capacities per curve, besides 0, the knee and the capacity "
                        "below it (default: %(default)s)")
    p.add_argument("--all-capacities", action="store_true",
                   help="write every capacity from 0 to the working set instead")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw the curve(s) with matplotlib to this image (every capacity, "
                        "knees marked)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from kvtier.cli import CLIError
    from kvtier.sim.access import TraceReadError, read_access_stream, rebucket
    from kvtier.sim.cachesim import lru_mrc
    from kvtier.sim.sweep import parse_block_size, parse_list

    if args.points < 2:
        raise CLIError(f"--points: must be >= 2, got {args.points} (--all-capacities writes "
                       "every capacity)")
    spec, flag = args.block_sizes, "--block-sizes"
    if args.block_size_deprecated is not None:
        if spec is not None:
            raise CLIError("--block-size is the deprecated spelling of --block-sizes: use "
                           "--block-sizes only")
        print("kvtier mrc: note: --block-size is deprecated: use --block-sizes (as kvtier "
              "sweep does)", file=sys.stderr)
        spec, flag = args.block_size_deprecated, "--block-size"
    try:
        sizes = parse_list(spec, parse_block_size, flag) if spec else None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    try:
        stream = read_access_stream(args.trace_dir)
    except TraceReadError as exc:
        raise CLIError(str(exc)) from None
    sizes = sizes or [stream.block_size]
    cols: dict[str, list] = {k: [] for k in
                             ("block_size", "capacity_blocks", "capacity_fraction", "hits",
                              "miss_ratio", "knee")}
    curves = []
    for bsz in sizes:
        curve = lru_mrc(rebucket(stream, bsz).keys())
        ws = curve.working_set
        knee = curve.knee()
        caps = (np.arange(ws + 1, dtype=np.int64) if args.all_capacities
                else curve.sample(args.points))
        mr = curve.miss_ratio
        cols["block_size"] += [bsz] * len(caps)
        cols["capacity_blocks"] += caps.tolist()
        cols["capacity_fraction"] += (caps / max(ws, 1)).tolist()
        cols["hits"] += curve.hits[caps].tolist()
        cols["miss_ratio"] += mr[caps].tolist()
        cols["knee"] += (caps == knee).tolist() if knee is not None else [False] * len(caps)
        curves.append((bsz, mr, knee))
        where = ("no knee: no block is read twice" if knee is None else
                 f"knee at {knee} blocks ({knee / ws:.1%} of the working set), miss ratio {mr[knee]:.3f}")
        print(f"block_size={bsz}: {curve.accesses} accesses, working set {ws} blocks; {where}; "
              f"{len(caps)} of {ws + 1} capacities written"
              + ("" if args.all_capacities else " (--all-capacities for every one)"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(pa.table(cols), out)
    print(f"-> {out}")
    if args.plot:
        _plot(curves, Path(args.plot), args.trace_dir)
        print(f"-> {args.plot}")
    return 0


def _plot(curves, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for bsz, mr, knee in curves:
        (line,) = ax.plot(range(1, len(mr)), mr[1:], label=f"block {bsz} tokens")
        if knee:
            ax.plot([knee], [mr[knee]], "o", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("capacity (blocks)")
    ax.set_ylabel("LRU miss ratio")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"LRU miss-ratio curve: {Path(title).name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
