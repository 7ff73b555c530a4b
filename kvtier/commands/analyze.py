"""``kvtier analyze``: every locality metric of a trace, as one JSON file (docs/ANALYSIS.md)."""

from __future__ import annotations

import argparse


def add_analysis_args(p: argparse.ArgumentParser) -> None:
    """The analysis flags, shared by ``analyze`` and ``report`` (names and defaults as the seed
    note's analysis tooling defines them, plus kvtier's additions)."""
    g = p.add_argument_group("analysis")
    g.add_argument("--block-sizes", default=None, metavar="B,B,...",
                   help="block sizes in tokens to re-bucket selected_token_pos at, e.g. "
                        "16,32,64,128 (default: the trace's own block_size_tokens)")
    g.add_argument("--key-mode", choices=("request_layer", "request"), default="request_layer",
                   help="what one stream is for the temporal metrics: one (request, layer) "
                        "pair, or one request with its layers interleaved in file order "
                        "(default: %(default)s)")
    g.add_argument("--step-union", action="store_true",
                   help="analyse one virtual record per (request, step) holding the union of "
                        "its layers' selections (streams are then requests)")
    g.add_argument("--ws-windows", default="1,4,16,64", metavar="W,W,...",
                   help="working-set windows in decode steps (default: %(default)s)")
    g.add_argument("--recent-token-windows", default="256,1024,4096", metavar="N,N,...",
                   help="recent_token_ratio windows in tokens from the newest token "
                        "(default: %(default)s)")
    g.add_argument("--recent-block-windows", default="4,16,64", metavar="W,W,...",
                   help="recent_block_ratio windows in blocks from the newest block "
                        "(default: %(default)s)")
    g.add_argument("--reuse-cap-steps", type=int, default=2048, metavar="N",
                   help="reuse distances above N steps are counted at N (default: %(default)s)")
    g.add_argument("--lru-caps", default="128,256,512,1024", metavar="C,C,...",
                   help="per-stream LRU capacities in blocks (cache_sim; default: %(default)s)")
    g.add_argument("--max-steps-per-stream", type=int, default=0, metavar="N",
                   help="analyse only the first N decode steps of every stream (0 = all; "
                        "default: %(default)s)")
    g.add_argument("--shared-samples", type=int, default=1 << 18, metavar="N",
                   help="shared-cache curves: keep at most N sampled accesses (spatial "
                        "sampling, SHARDS); 0 = every access, exact (default: %(default)s)")
    g.add_argument("--tiers", default="memfabric", metavar="PRESET|FILE",
                   help="tier config whose pools price the sub-block what-if (a preset name "
                        "or .toml/.json file; default: %(default)s)")
    g.add_argument("--kv-bytes-per-token", type=int, default=None, metavar="B",
                   help="KV bytes per token and layer for bytes and fetch times (default: the "
                        "trace's trace_meta.json, else the tier config's)")
    g.add_argument("--sweep", action="append", default=[], metavar="TABLE",
                   help="a kvtier sweep table (CSV or Parquet) to include as a policy x "
                        "capacity table (repeatable)")


def settings_from_args(args: argparse.Namespace):
    """``AnalysisSettings`` from the flags; raises ``CLIError`` naming the bad flag."""
    from kvtier.analysis.analyze import AnalysisError, AnalysisSettings
    from kvtier.cli import CLIError
    from kvtier.sim.sweep import parse_list

    def ints(text: str, flag: str) -> tuple[int, ...]:
        def one(x: str) -> int:
            try:
                return int(x)
            except ValueError:
                raise ValueError(f"{x!r} is not an integer") from None

        try:
            return tuple(parse_list(text, one, flag))
        except ValueError as exc:
            raise CLIError(str(exc)) from None

    try:
        return AnalysisSettings(
            block_sizes=ints(args.block_sizes, "--block-sizes") if args.block_sizes else None,
            key_mode=args.key_mode, step_union=args.step_union,
            ws_windows=ints(args.ws_windows, "--ws-windows"),
            recent_token_windows=ints(args.recent_token_windows, "--recent-token-windows"),
            recent_block_windows=ints(args.recent_block_windows, "--recent-block-windows"),
            reuse_cap_steps=args.reuse_cap_steps, lru_caps=ints(args.lru_caps, "--lru-caps"),
            max_steps_per_stream=args.max_steps_per_stream,
            shared_samples=args.shared_samples, tiers=args.tiers,
            kv_bytes_per_token=args.kv_bytes_per_token, sweeps=tuple(args.sweep)).check()
    except AnalysisError as exc:
        raise CLIError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="locality metrics of a trace (per block size) -> analysis.json",
        description="One streaming pass over TRACE_DIR (JSONL, shards or Parquet; bounded "
        "memory): re-buckets selected_token_pos at every block size and writes record_stats, "
        "temporal_locality, working_set and cache_sim (as the seed note's analysis tooling "
        "defines them), read amplification 1..512 with the sub-block what-if, cross-layer IoU, "
        "shared-cache LRU and OPT miss-ratio curves, prefix overlap over decode steps, per-tier "
        "fetch statistics and sweep tables. docs/ANALYSIS.md defines every number. No torch.",
    )
    p.add_argument("trace_dir", metavar="TRACE_DIR", help="trace directory or trace file")
    p.add_argument("--out", default=None, metavar="JSON",
                   help="output file (default: TRACE_DIR/analysis.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_analysis_args(p)
    p.set_defaults(func=run)


def default_out(trace_dir: str):
    from pathlib import Path

    p = Path(trace_dir)
    return (p if p.is_dir() else p.parent) / "analysis.json"


def summary_lines(res: dict) -> list[str]:
    """A few lines of what the analysis found."""
    out = [f"{res['records_analyzed']:,} of {res['records_read']:,} records analysed "
           f"({res['requests']} requests, {res['layers']} layers) in {res['seconds']:.1f} s"]
    sk = {k: v for k, v in res["skipped"].items() if v}
    if sk:
        out.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sk.items()))
    for r in res["results"]:
        rs, tl = r["record_stats"], r["temporal_locality"]
        iou = r["cross_layer_overlap"]["iou"]
        out.append(
            f"block {r['block_size_tokens']:>4}: unique blocks {rs['unique_blocks']['mean']:.1f}"
            f"/record, {rs['tokens_per_block_mean']['mean']:.2f} tokens/block, read amp "
            f"{r['read_amplification']['ratio']:.2f}x, step Jaccard "
            f"{tl['step_jaccard']['mean']:.3f}, layer IoU {iou['mean']:.3f}")
    return out


def run(args: argparse.Namespace) -> int:
    from kvtier.analysis.analyze import AnalysisError, analyze, write_analysis
    from kvtier.cli import CLIError

    settings = settings_from_args(args)
    out = args.out or default_out(args.trace_dir)
    try:
        res = analyze(args.trace_dir, settings, progress=not args.no_progress)
    except AnalysisError as exc:
        raise CLIError(str(exc)) from None
    try:
        write_analysis(out, res)
    except OSError as exc:
        raise CLIError(f"{out}: {exc.strerror or exc}") from None
    for line in summary_lines(res):
        print(line)
    print(f"-> {out}")
    return 0
