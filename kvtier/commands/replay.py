"""``kvtier replay``: re-run a recorded trace through a KV backend and policies (no torch)."""

from __future__ import annotations

import argparse

from kvtier.commands import positive_int


def _hbm_blocks(text: str) -> int | str:
    """argparse type of --hbm-blocks: checked at start; plain block counts as ints."""
    from kvtier.sim.capacity import parse_capacity

    try:
        parse_capacity(text, bare="blocks")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return int(text) if text.strip().isdigit() else text.strip()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="re-run a trace's selections through the HBM-only or tiered (simpy) backend",
        description="Replay TRACE_DIR (JSONL, shards or Parquet) through a KV backend: every "
        "run of records with one (step, layer) is one fetch, requests are admitted at their "
        "first record and released after their last. Writes OUT_DIR/trace_steps.jsonl (the "
        "same records with kv_fetch replaced), trace_meta.json and summary.json (per-tier "
        "totals, stall per step and layer, fetch vs recompute). No torch.",
    )
    p.add_argument("trace_dir", metavar="TRACE_DIR", help="recorded trace directory or file")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output trace directory")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR if it exists and is not empty")
    p.add_argument("--backend", choices=("hbm", "sim"), default="sim",
                   help="hbm: every block an HBM hit (the seed semantics); sim: the simpy tier "
                        "emulator (default: %(default)s)")
    p.add_argument("--tiers", default="memfabric", metavar="PRESET|FILE",
                   help="tier config: a preset name (memfabric, mooncake) or a .toml/.json "
                        "file (default: %(default)s)")
    p.add_argument("--policy", default="lru",
                   help="HBM eviction policy: a built-in name (lru, fifo, lfu, arc, s3fifo, "
                        "belady, distance, dsa_aware), module:Class or file.py:Class, "
                        "optionally :k=v,... (default: %(default)s)")
    p.add_argument("--pool-policy", default="lru",
                   help="eviction policy of the local and remote pools (default: %(default)s)")
    p.add_argument("--placement", default="local_first",
                   help="placement policy: local_first or free_ratio_first, with "
                        ":replicas=N,demote=false (default: %(default)s)")
    p.add_argument("--prefetch", default="none",
                   help="prefetch policy: none, prev_step_same_layer, this_step_prev_layer "
                        "(default: %(default)s)")
    p.add_argument("--migration", default="none",
                   help="migration policy: none or promote_hot[:hot=2,cold_steps=8,"
                        "max_moves=4096] (default: %(default)s)")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="re-bucket the recorded token positions to this block size in tokens "
                        "(default: the trace's)")
    p.add_argument("--hbm-blocks", type=_hbm_blocks, default=None, metavar="N|P%",
                   help="HBM capacity, overriding the tier config's hbm.capacity_bytes: blocks "
                        "(4096, 4k, 30blocks; a bare number is blocks) or a share of the "
                        "working set at the replay block size (25%%, 0.25); the summary gives "
                        "it as a share of the working set either way")
    p.add_argument("--fetch-granularity", type=positive_int, default=None,
                   help="read only the touched sub-blocks of this many tokens (divides the "
                        "block size; default: whole blocks)")
    p.add_argument("--write-policy", choices=("write_through", "write_back"), default=None,
                   help="how decoded tokens reach the pools (default: the tier config's)")
    p.add_argument("--on-release", choices=("drop", "keep"), default=None,
                   help="what a finished request's blocks do (default: the tier config's)")
    p.add_argument("--kv-bytes-per-token", type=positive_int, default=None,
                   help="KV bytes per token and layer (default: the tier config's, 656 = DSA "
                        "fp8_ds_mla)")
    p.add_argument("--model-config", default=None, metavar="JSON",
                   help="model config for recompute FLOPs: any --config file of kvtier run "
                        "(the reference's ModelArgs json, e.g. model/configs/config_tiny.json; "
                        "an unknown field is an error) (default: DeepSeek-V3.2-Exp 671B dims)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.cli import CLIError
    from kvtier.sim.replay import ReplayError, ReplaySettings, replay

    settings = ReplaySettings(
        backend=args.backend, tiers=args.tiers, policy=args.policy, pool_policy=args.pool_policy,
        placement=args.placement, prefetch=args.prefetch, migration=args.migration,
        block_size=args.block_size, fetch_granularity=args.fetch_granularity,
        write_policy=args.write_policy, hbm_blocks=args.hbm_blocks, on_release=args.on_release,
        model_config=args.model_config, kv_bytes_per_token=args.kv_bytes_per_token)
    try:
        res = replay(args.trace_dir, args.out, settings, force=args.force,
                     progress=not args.no_progress)
    except (ReplayError, KeyError, ValueError) as exc:
        raise CLIError(str(exc).strip("'\"")) from None
    rate = res.accesses / res.seconds if res.seconds > 0 and res.accesses else 0.0
    print(f"{res.records} records, {res.accesses} block accesses in {res.seconds:.2f} s "
          f"({rate:,.0f}/s) -> {res.out_dir}")
    if res.summary and "stall" in res.summary:
        tiers = res.summary["tiers"]
        hits = ", ".join(f"{n} {tiers[n]['hit_blocks']}" for n in tiers if n != "_totals")
        print(f"hit blocks: {hits}; stall {res.summary['stall']['total_us']:.1f} us")
        _report_hbm(tiers["hbm"], res.working_set)
    return 0


def _report_hbm(hbm: dict, working_set: int) -> None:
    """HBM's capacity as a share of the working set, and a warning when it holds all of it."""
    import sys

    cap = hbm["capacity_blocks"]
    if not working_set:
        return
    share = cap / working_set
    # 25.0% of the working set, or 2,227x the working set
    ratio = f"{share:.1%} of" if share < 10 else f"{share:,.0f}x"
    print(f"HBM {cap:,} blocks = {ratio} the working set ({working_set:,} blocks)")
    if cap >= working_set:
        print(f"kvtier replay: warning: HBM holds {ratio} the working set: nothing is "
              "ever evicted from it, so its misses are just first reads (accesses minus the "
              "working set) and the eviction policy plays no part; give it less, e.g. "
              "--hbm-blocks 25%", file=sys.stderr)
