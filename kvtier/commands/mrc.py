"""``kvtier mrc``: the LRU miss-ratio curve at every capacity, from one stack-distance pass."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mrc",
        help="LRU miss-ratio curve for all capacities (stack distances) -> CSV [+ PNG]",
        description="Compute the LRU stack distance of every single-tier access (key = request, "
        "layer, block at the chosen block size, trace order) and write the miss ratio at every "
        "capacity from 0 to the working set. No torch.",
    )
    p.add_argument("trace_dir", metavar="TRACE_DIR",
                   help="trace directory (trace_steps.jsonl, shards, or trace_steps.parquet)")
    p.add_argument("--block-size", default=None,
                   help="block size(s) in tokens, comma-separated (default: the trace's own)")
    p.add_argument("--out", required=True, metavar="CSV",
                   help="output CSV: block_size, capacity_blocks, capacity_fraction, hits, "
                        "miss_ratio")
    p.add_argument("--points", type=int, default=0,
                   help="keep about this many log-spaced capacities per curve (0 = every "
                        "capacity; default: %(default)s)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw the curve(s) with matplotlib to this image")
    p.set_defaults(func=run)


def _select(ws: int, points: int):
    import numpy as np

    caps = np.arange(ws + 1, dtype=np.int64)
    if points <= 0 or points >= ws + 1:
        return caps
    pick = np.unique(np.concatenate([
        [0], np.round(np.geomspace(1, ws, points)).astype(np.int64), [ws]]))
    return pick


def run(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from kvtier.cli import CLIError
    from kvtier.sim.access import TraceReadError, read_access_stream, rebucket
    from kvtier.sim.cachesim import lru_mrc
    from kvtier.sim.sweep import parse_block_size, parse_list

    if args.points < 0:
        raise CLIError(f"--points: must be >= 0, got {args.points}")
    try:
        sizes = (parse_list(args.block_size, parse_block_size, "--block-size")
                 if args.block_size else None)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    try:
        stream = read_access_stream(args.trace_dir)
    except TraceReadError as exc:
        raise CLIError(str(exc)) from None
    sizes = sizes or [stream.block_size]
    cols: dict[str, list] = {k: [] for k in
                             ("block_size", "capacity_blocks", "capacity_fraction", "hits",
                              "miss_ratio")}
    curves = []
    for bsz in sizes:
        curve = lru_mrc(rebucket(stream, bsz).keys())
        ws = curve.hits.shape[0] - 1
        caps = _select(ws, args.points)
        mr = curve.miss_ratio[caps]
        cols["block_size"] += [bsz] * len(caps)
        cols["capacity_blocks"] += caps.tolist()
        cols["capacity_fraction"] += (caps / max(ws, 1)).tolist()
        cols["hits"] += curve.hits[caps].tolist()
        cols["miss_ratio"] += mr.tolist()
        curves.append((bsz, caps, mr, curve.accesses, ws))
        print(f"block_size={bsz}: {curve.accesses} accesses, working set {ws} blocks")
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
    for bsz, caps, mr, _, _ in curves:
        ax.plot(caps[1:], mr[1:], label=f"block {bsz} tokens")
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
