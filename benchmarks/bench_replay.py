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

``--end-to-end`` times what a user runs: a trace written by the real tracer (``kvtier
sanity`` with DSA-sized selections) replayed with ``kvtier replay TRACE --backend sim`` (the
defaults: memfabric preset, LRU), twice in a row, each in a fresh process (the first replay
of a JSONL trace parses it, the second reads its columnar twin): the ``replay()`` call and
the whole process (interpreter, imports, replay). With ``--baseline-ref REF`` (exported with
``git archive``; the repository is not changed) or ``--baseline DIR`` the same is done with
that code in alternating rounds, each side on a trace its own ``kvtier sanity`` wrote with the
same settings (same selections, each in its own record format).

    python benchmarks/bench_replay.py [--requests 8 --layers 8 --steps 24 --topk 2048 ...]
    python benchmarks/bench_replay.py --end-to-end --baseline-ref 3cae934 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import simpy
from baseline import add_baseline_args, baseline_code, rounds, run_code

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


def replay_worker(trace: str, out: str, hbm_blocks: int | None) -> None:
    """One ``replay()`` call of whichever kvtier is imported; prints JSON."""
    t0 = time.perf_counter()
    try:
        from kvtier.sim.replay import ReplaySettings, replay
    except ImportError:  # the flat layout before kvtier.sim
        from kvtier.replay import ReplaySettings, replay
    t1 = time.perf_counter()
    res = replay(trace, out, ReplaySettings(hbm_blocks=hbm_blocks), force=True)
    t2 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "replay_s": t2 - t1, "accesses": res.accesses,
                      "records": res.records,
                      "hbm_hits": (res.summary or {}).get("tiers", {}).get("hbm", {}).get("hit_blocks")}))


def _run(code: Path, argv: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    out = run_code(code, argv).stdout
    return time.perf_counter() - t, out


def end_to_end(args) -> None:
    with baseline_code(args) as codes:
        _end_to_end(args, codes)


def _end_to_end(args, codes: list[tuple[str, Path]]) -> None:
    base = len(codes) > 1
    index = {tag: i for i, (tag, _) in enumerate(codes)}
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-e2e-"))
    sanity = ["-m", "kvtier", "sanity", "--requests", str(args.requests), "--batch-size",
              str(args.e2e_batch), "--layers", str(args.layers), "--prompt-len", str(args.prompt_len),
              "--new-tokens", str(args.steps), "--topk", str(args.topk), "--kv-block-size",
              str(args.block_size)]
    hbm = [] if args.hbm_blocks is None else ["--hbm-blocks", str(args.hbm_blocks)]
    best: dict[tuple[str, str], tuple] = {}
    info = {}
    try:
        for i, (_tag, code) in enumerate(codes):
            _run(code, [*sanity, "--out", str(scratch / f"trace{i}")])
        for order in rounds(codes, args.repeat):
            for tag, code in order:
                i = index[tag]
                trace = scratch / f"trace{i}"
                for f in trace.glob(".trace_steps*.columns.arrow"):
                    f.unlink()  # run 1 parses the trace, run 2 reads what run 1 left
                for run in ("first", "second"):
                    wall, out = _run(code, [str(Path(__file__).resolve()), "--replay-worker",
                                            str(trace), str(scratch / f"out{i}"), *hbm])
                    res = json.loads(out.strip().splitlines()[-1])
                    info[tag] = res
                    key = (tag, run)
                    if key not in best or res["replay_s"] < best[key][0]:
                        best[key] = (res["replay_s"], wall)
                    best[(tag, run + "_wall")] = min(best.get((tag, run + "_wall"), (9e9,)),
                                                     (wall,))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    acc = {tag: v["accesses"] for tag, v in info.items()}
    hits = {tag: v["hbm_hits"] for tag, v in info.items()}
    if len(set(acc.values())) > 1 or len(set(hits.values())) > 1:
        raise SystemExit(f"the two codes disagree: accesses {acc}, HBM hits {hits}")
    n_acc = next(iter(acc.values()))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}; kvtier sanity --requests {args.requests} --batch-size "
          f"{args.e2e_batch} --layers {args.layers} --prompt-len {args.prompt_len} --new-tokens "
          f"{args.steps} --topk {args.topk}: {next(iter(info.values()))['records']} records, "
          f"{n_acc} block accesses; kvtier replay --backend sim {' '.join(hbm)}; best of {args.repeat}")
    print(f"| {'code':<28} | {'replay':>6} | {'replay() s':>10} | {'M acc/s':>7} | {'process s':>9} | {'M acc/s':>7} |")
    print(f"|{'-' * 30}|{'-' * 8}|{'-' * 12}|{'-' * 9}|{'-' * 11}|{'-' * 9}|")
    for tag, _ in codes:
        for run in ("first", "second"):
            t, _w = best[(tag, run)]
            wall = best[(tag, run + "_wall")][0]
            print(f"| {tag:<28} | {run:>6} | {t:>10.2f} | {n_acc / t / 1e6:>7.2f} | {wall:>9.2f} | "
                  f"{n_acc / wall / 1e6:>7.2f} |")
    if base:
        for run in ("first", "second"):
            print(f"{run} replay, this checkout vs {codes[1][0]}: "
                  f"{best[(codes[1][0], run)][0] / best[(codes[0][0], run)][0]:.2f}x faster (replay() call), "
                  f"{best[(codes[1][0], run + '_wall')][0] / best[(codes[0][0], run + '_wall')][0]:.2f}x (process)")


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
    ap.add_argument("--end-to-end", action="store_true",
                    help="time kvtier replay --backend sim twice on a kvtier sanity trace, in "
                         "fresh processes (see the module doc); uses --requests, --layers, "
                         "--steps (new tokens), --prompt-len, --topk, --block-size")
    ap.add_argument("--e2e-batch", type=int, default=4, help="--end-to-end: sanity batch size")
    ap.add_argument("--hbm-blocks", type=int, default=None,
                    help="--end-to-end: replay with this HBM capacity (default: the preset's)")
    add_baseline_args(ap, "--end-to-end's replays")
    ap.add_argument("--replay-worker", nargs=2, metavar=("TRACE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.replay_worker:
        replay_worker(*args.replay_worker, args.hbm_blocks)
        return
    if args.end_to_end:
        end_to_end(args)
        return

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
