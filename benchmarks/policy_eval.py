"""Which eviction policy wins on DSA-like streams: the hit-ratio table in docs/POLICIES.md.

Builds two synthetic traces with ``kvtier.sim.synth`` (staggered arrivals and a concurrent
batch), runs the single-tier sweep (``kvtier.sim.sweep.run_sweep``, the code behind
``kvtier sweep``) and prints a Markdown table per block size; the best online policy per row
is bold.

    python benchmarks/policy_eval.py --out runs/policy_eval --jobs 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvtier.sim.capacity import parse_capacity
from kvtier.sim.sweep import run_sweep, write_table
from kvtier.sim.synth import SynthConfig, synth_stream, write_trace

POLICIES = ["lru", "fifo", "lfu", "arc", "s3fifo", "distance", "dsa_aware", "belady"]
BASE = dict(requests=8, layers=8, steps=24, prompt_len=8192, prompt_jitter=2048, topk=2048,
            window=128, sink=4, topics=48, topic_width=96, block_size=16, seed=1)
TRACES = {
    "staggered": SynthConfig(**BASE, stagger=4),
    "concurrent": SynthConfig(**{**BASE, "requests": 4}, stagger=0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/policy_eval", help="directory for traces and tables")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes for the sweeps")
    ap.add_argument("--capacities", default="2%,5%,10%,25%,50%",
                    help="capacities (fractions of the working set or blocks)")
    ap.add_argument("--block-sizes", default="16,64", help="block sizes in tokens")
    args = ap.parse_args()
    out = Path(args.out)
    caps = [parse_capacity(c) for c in args.capacities.split(",")]
    sizes = [int(b) for b in args.block_sizes.split(",")]
    results = {}
    for name, cfg in TRACES.items():
        tdir = out / name
        if not (tdir / "trace_steps.jsonl").exists():
            write_trace(synth_stream(cfg), tdir)
        res = run_sweep(tdir, POLICIES, caps, sizes, jobs=args.jobs, progress=True)
        if res.errors:
            raise SystemExit("\n".join(res.errors))
        write_table(res.rows, out / f"{name}.csv", out / f"{name}.parquet")
        results[name] = res.rows
    for bsz in sizes:
        print(f"\nblock size {bsz} tokens, hit ratio %:\n")
        print("| trace | capacity (blocks of working set) | " + " | ".join(POLICIES) + " |")
        print("|---|---:|" + "---:|" * len(POLICIES))
        for name, rows in results.items():
            for cap in caps:
                sel = {r["policy"]: r for r in rows
                       if r["block_size"] == bsz and r["capacity_spec"] == cap.text}
                best = max(sel[p]["hit_ratio"] for p in POLICIES if p != "belady")
                cells = []
                for p in POLICIES:
                    s = f"{100 * sel[p]['hit_ratio']:.1f}"
                    bold = p != "belady" and best > 0 and sel[p]["hit_ratio"] == best
                    cells.append(f"**{s}**" if bold else s)
                r0 = sel[POLICIES[0]]
                print(f"| {name} | {cap.text} ({r0['capacity_blocks']:,} of "
                      f"{r0['working_set']:,}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
