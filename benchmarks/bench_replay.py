"""Tiered replay speed: block accesses/s through ``TieredBackend`` with LRU on one core.

The workload is a DSA-like synthetic access stream (``kvtier.sim.synth``) driven with replay's
lifecycle (admit, fetch per (step, layer), release). Baselines in the same run, on the same
batches:

- ``naive simpy``: what a direct emulator does, one simpy process per block access (LRU in an
  OrderedDict, the same cost formula per block, misses fetched from one pool link). Its HBM hit
  count must equal the emulator's (checked before printing).
- ``HBMOnlyBackend``: the seed backend, no emulation at all (an upper bound for the driver).

With ``--replay`` the stream is also written as a JSONL trace and ``kvtier replay`` is timed
end to end (both reads, fetches, the JSONL output and the summary).

    python benchmarks/bench_replay.py [--requests 8 --layers 8 --steps 24 --topk 2048 ...]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import simpy

from kvtier.backend import HBMOnlyBackend
from kvtier.sim.access import rebucket
from kvtier.sim.replay import ReplaySettings, drive_stream, iter_batches, replay
from kvtier.sim.synth import SynthConfig, synth_stream, write_trace
from kvtier.sim.tiers.backend import TieredBackend
from kvtier.sim.tiers.config import load_tier_config


def naive_simpy(stream, block_size: int, cap: int, cfg) -> int:
    """One simpy process per block access; LRU over the key stream; returns HBM hits."""
    env = simpy.Environment()
    link = simpy.Resource(env, capacity=1)
    spec = cfg.local_pool
    block_bytes = block_size * cfg.kv_bytes_per_token
    t_miss = spec.latency_us + spec.per_op_us + block_bytes / (spec.read_bw_gb_s * 1e3)
    t_hit = block_bytes / (cfg.hbm.read_bw_gb_s * 1e3)
    lru: OrderedDict[int, None] = OrderedDict()
    hits = 0

    def one(key: int):
        nonlocal hits
        if key in lru:
            lru.move_to_end(key)
            hits += 1
            yield env.timeout(t_hit)
            return
        lru[key] = None
        if len(lru) > cap:
            lru.popitem(last=False)
        with link.request() as req:
            yield req
            yield env.timeout(t_miss)

    keys = rebucket(stream, block_size).keys().tolist()
    pos = 0
    for _a, _b, access in iter_batches(stream, block_size):
        n = sum(len(b) for b in access.block_ids)
        procs = [env.process(one(k)) for k in keys[pos:pos + n]]
        pos += n
        env.run(until=simpy.AllOf(env, procs))
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=8, help="concurrent requests (batch rows)")
    ap.add_argument("--layers", type=int, default=8, help="layers per decode step")
    ap.add_argument("--steps", type=int, default=24, help="decode steps per request")
    ap.add_argument("--prompt-len", type=int, default=16384, help="prompt tokens per request")
    ap.add_argument("--topk", type=int, default=2048, help="DSA index_topk")
    ap.add_argument("--block-size", type=int, default=16, help="block size in tokens")
    ap.add_argument("--fractions", default="0.1,0.5,1.0",
                    help="HBM capacities as fractions of the working set (comma-separated)")
    ap.add_argument("--tiers", default="memfabric", help="tier preset or config file")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the best is reported")
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive simpy baseline")
    ap.add_argument("--replay", action="store_true",
                    help="also time kvtier replay end to end (JSONL read, fetch, JSONL write, "
                         "summary) on the same stream written as a trace")
    args = ap.parse_args()

    scfg = SynthConfig(requests=args.requests, layers=args.layers, steps=args.steps,
                       prompt_len=args.prompt_len, prompt_jitter=0, topk=args.topk,
                       block_size=args.block_size, stagger=0)
    stream = synth_stream(scfg)
    keys = rebucket(stream, args.block_size).keys()
    n_acc = int(keys.shape[0])
    working = int(np.unique(keys).shape[0])
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"{len(stream)} records, {n_acc} block accesses, working set {working} blocks, "
          f"block {args.block_size}, topk {args.topk}")

    def best(fn) -> tuple[float, object]:
        times, out = [], None
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    trace_dir = None
    if args.replay:
        trace_dir = Path(tempfile.mkdtemp()) / "trace"
        write_trace(stream, trace_dir)
    rows = []
    t_hbm, _ = best(lambda: drive_stream(HBMOnlyBackend(656), stream, args.block_size))
    rows.append(("HBMOnlyBackend (no emulation)", "-", n_acc / t_hbm, None))
    for frac in [float(x) for x in args.fractions.split(",")]:
        cap = max(1, int(working * frac))
        cfg = load_tier_config(args.tiers, {
            "block_size": args.block_size,
            "hbm": {"capacity_bytes": cap * args.block_size * 656}, "on_release": "keep"})

        def emu(cfg=cfg):
            b = TieredBackend(cfg, num_layers=args.layers)
            drive_stream(b, stream, args.block_size)
            return b

        t_emu, b = best(emu)
        hit = b.tiers["hbm"].hits / n_acc
        naive_rate = None
        if not args.skip_naive:
            t_naive, naive_hits = best(lambda cap=cap, cfg=cfg: naive_simpy(stream, args.block_size, cap, cfg))
            if naive_hits != b.tiers["hbm"].hits:
                raise SystemExit(f"hit mismatch at capacity {cap}: naive {naive_hits} vs "
                                 f"emulator {b.tiers['hbm'].hits}")
            naive_rate = n_acc / t_naive
            rows.append((f"naive simpy, cap {frac:g} WS", f"{hit:.3f}", naive_rate, None))
        rows.append((f"TieredBackend LRU, cap {frac:g} WS", f"{hit:.3f}", n_acc / t_emu,
                     (n_acc / t_emu) / naive_rate if naive_rate else None))
        if trace_dir is not None:
            settings = ReplaySettings(tiers=args.tiers, hbm_blocks=cap, on_release="keep")
            t_rep, res = best(lambda settings=settings: replay(
                trace_dir, trace_dir.parent / "out", settings, force=True))
            if res.summary["tiers"]["hbm"]["hit_blocks"] != b.tiers["hbm"].hits:
                raise SystemExit("kvtier replay and the emulator disagree on HBM hits")
            rows.append((f"kvtier replay end to end, {frac:g} WS", f"{hit:.3f}", n_acc / t_rep,
                         (n_acc / t_rep) / naive_rate if naive_rate else None))
    print(f"| {'backend':<34} | {'HBM hit':>7} | {'accesses/s':>12} | {'vs naive':>8} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 14}|{'-' * 10}|")
    for name, hit, rate, ratio in rows:
        r = f"{ratio:.1f}x" if ratio else ""
        print(f"| {name:<34} | {hit:>7} | {rate:>12,.0f} | {r:>8} |")


if __name__ == "__main__":
    main()
