"""``kvtier synth``: a synthetic DSA-like trace with temporal locality (no torch, no model)."""

from __future__ import annotations

import argparse

from kvtier.commands import nonneg_float, nonneg_int, positive_int


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic DSA-like trace with temporal locality, for comparing policies",
        description="Write a trace of DSA-like selections without torch or a model "
        "(kvtier.sim.synth): per request and layer an importance field of contiguous topic "
        "spans (shared across layers, plus per-layer noise) that persists while the request "
        "decodes, perturbed by fresh Gumbel noise every step, plus the attention-sink tokens "
        "and the recent window. Blocks are reused across steps as a real indexer's are, so "
        "eviction policies get graded hit ratios: use this trace (not kvtier sanity's) for "
        "kvtier sweep, mrc and replay. Requests decode concurrently, request r starting "
        "r x --stagger steps after request 0. The trace is validated after writing. "
        "Defaults are DSA scaled down (top-k / context = 1/8, as 2048 of 16K).",
    )
    p.add_argument("--out", default="runs/synth", metavar="DIR",
                   help="trace directory to write (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite an existing trace in --out")
    p.add_argument("--requests", type=positive_int, default=8,
                   help="number of requests (default: %(default)s)")
    p.add_argument("--layers", type=positive_int, default=4,
                   help="layers per decode step (default: %(default)s; DeepSeek-V3.2 has 61)")
    p.add_argument("--new-tokens", type=positive_int, default=32,
                   help="decode steps per request (default: %(default)s)")
    p.add_argument("--prompt-len", type=positive_int, default=4096,
                   help="mean prompt tokens per request; at least topk/2 + sink + window + 1 "
                        "(default: %(default)s)")
    p.add_argument("--prompt-jitter", type=nonneg_int, default=1024,
                   help="prompt lengths are uniform in prompt-len +- this (default: %(default)s)")
    p.add_argument("--topk", type=positive_int, default=512,
                   help="indexer top-k: positions selected per record (default: %(default)s; "
                        "DeepSeek-V3.2 uses 2048)")
    p.add_argument("--stagger", type=nonneg_int, default=4,
                   help="decode steps between the starts of consecutive requests; 0: all start "
                        "together (default: %(default)s)")
    g = p.add_argument_group("selection shape")
    g.add_argument("--sink", type=nonneg_int, default=4,
                   help="attention-sink tokens always selected (default: %(default)s)")
    g.add_argument("--window", type=nonneg_int, default=64,
                   help="most recent tokens always selected (default: %(default)s)")
    g.add_argument("--topics", type=nonneg_int, default=12,
                   help="contiguous important spans per request (default: %(default)s)")
    g.add_argument("--topic-width", type=_positive_float, default=48.0,
                   help="width of a span in tokens (Gaussian sigma) (default: %(default)s)")
    g.add_argument("--layer-noise", type=nonneg_float, default=1.0,
                   help="per-layer deviation from the shared field (default: %(default)s)")
    g.add_argument("--temperature", type=nonneg_float, default=0.6,
                   help="scale of the Gumbel noise redrawn every step: higher = selections "
                        "change more from step to step (default: %(default)s)")
    t = p.add_argument_group("trace")
    t.add_argument("--kv-block-size", type=positive_int, default=16, metavar="N",
                   help="tokens per KV block for block ids and fetch accounting "
                        "(default: %(default)s)")
    t.add_argument("--kv-bytes-per-token", type=positive_int, default=656, metavar="B",
                   help="KV bytes per token per layer for the HBM-only kv_fetch bytes "
                        "(default: %(default)s = DSA fp8_ds_mla)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from kvtier.cli import CLIError
    from kvtier.commands import check_written_trace
    from kvtier.sim.synth import SynthConfig, synth_stream, write_trace
    from kvtier.trace.writer import existing_trace_files

    cfg = SynthConfig(requests=args.requests, layers=args.layers, steps=args.new_tokens,
                      prompt_len=args.prompt_len, prompt_jitter=args.prompt_jitter,
                      topk=args.topk, sink=args.sink, window=args.window, topics=args.topics,
                      topic_width=args.topic_width, layer_noise=args.layer_noise,
                      temperature=args.temperature, stagger=args.stagger,
                      block_size=args.kv_block_size, seed=args.seed)
    try:
        cfg.check()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    old = existing_trace_files(Path(args.out))
    if old and not args.force:  # before the generation, not after it
        raise CLIError(f"{args.out} already holds a trace ({old[0].name}); use --force to "
                       "overwrite")
    progress = not args.no_progress
    stream = synth_stream(cfg, progress=progress)
    try:
        write_trace(stream, args.out, config={"synth": asdict(cfg)},
                    kv_bytes_per_token=args.kv_bytes_per_token, force=args.force,
                    progress=progress)
    except FileExistsError as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"{args.out}: {exc}") from None
    check_written_trace(args.out)
    print(f"wrote {args.out}: {len(stream)} records, {len(stream.request_ids)} requests, "
          f"{stream.n_tokens} selected positions; validate: ok")
    print(f"compare policies on it: kvtier sweep {args.out} --policies lru,fifo,arc,belady "
          f"--capacities 10%,25%,50% --out sweep.csv")
    return 0
