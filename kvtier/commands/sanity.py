"""``kvtier sanity``: write a synthetic trace (no torch, no model) and validate it."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from kvtier.trace.settings import add_trace_args

    p = sub.add_parser(
        "sanity",
        help="check the tracer end to end without torch: a fake indexer's trace, validated",
        description="Drive the real tracer (points A-D, the writer, requests.jsonl, "
        "summary.json) with a fake indexer, without torch or a model, then validate the trace "
        "it wrote. Its trace is for checking the trace path and the readers (validate, "
        "summarize, convert, replay's plumbing), not for comparing policies: beyond the sink "
        "and a distance decay the fake indexer's selections are drawn afresh every step, so "
        "each step reads nearly every block of a request, what one step reads says nothing "
        "about the next, and LRU or FIFO hit ratios jump from 0 to all at one capacity (the "
        "size of that loop). For a trace with temporal locality use kvtier synth.")
    p.add_argument("--out", default="runs/sanity", help="trace directory to write (default runs/sanity)")
    p.add_argument("--force", action="store_true", help="overwrite an existing trace in --out")
    p.add_argument("--requests", type=int, default=4, help="number of synthetic requests (default 4)")
    p.add_argument("--batch-size", type=int, default=2, help="requests decoded together (default 2)")
    p.add_argument("--layers", type=int, default=4, help="layers per decode step (default 4)")
    p.add_argument("--prompt-len", type=int, default=300, help="prompt tokens per request (default 300)")
    p.add_argument("--shared-prefix", type=int, default=128,
                   help="leading prompt tokens shared by all requests (default 128)")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps per request (default 16)")
    p.add_argument("--topk", type=int, default=64, help="indexer top-k (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_trace_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.cli import CLIError
    from kvtier.commands import check_written_trace
    from kvtier.trace.sanity import SanityConfig, run_sanity
    from kvtier.trace.settings import TraceSettings

    try:
        settings = TraceSettings.from_args(args)
        cfg = SanityConfig(requests=args.requests, batch_size=args.batch_size, layers=args.layers,
                           prompt_len=args.prompt_len, shared_prefix=args.shared_prefix,
                           new_tokens=args.new_tokens, topk=args.topk, seed=args.seed)
        cfg.check()
        summary = run_sanity(args.out, cfg, settings, force=args.force, progress=True)
    except (ValueError, FileExistsError) as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"{args.out}: {exc}") from None
    check_written_trace(args.out)
    print(f"wrote {args.out}: {summary.records} records, {summary.requests} requests; validate: ok")
    return 0
