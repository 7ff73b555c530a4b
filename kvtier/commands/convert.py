"""``kvtier convert``: JSONL <-> Parquet trace directories, losslessly."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a trace between JSONL and the compact Parquet format",
                       description="Convert a trace directory (or file) to the other format: JSONL -> "
                                   "Parquet or Parquet -> JSONL. Records are preserved exactly; "
                                   "trace_meta.json, requests.jsonl and summary.json are carried "
                                   "over. With --upgrade, a trace of kvtier's earlier format "
                                   "(string request_id, block counts instead of block lists) is "
                                   "rewritten in the current one.")
    p.add_argument("input", help="trace directory, or a trace_steps*.jsonl / .parquet file")
    p.add_argument("output", help="output trace directory")
    p.add_argument("--to", choices=("jsonl", "parquet"), default=None,
                   help="output format (default: the other one; with --upgrade, the input's)")
    p.add_argument("--upgrade", action="store_true",
                   help="rewrite a trace of kvtier's earlier format (schema 1) in the design "
                        "note's: request ids become 0, 1, 2, ... by first appearance (the old "
                        "ids go to requests.jsonl as sample_id), block counts become block-id "
                        "lists (HBM-only traces; a tiered replay cannot be upgraded, replay the "
                        "upgraded HBM trace again)")
    p.add_argument("--force", action="store_true", help="overwrite an existing trace in OUTPUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.cli import CLIError
    from kvtier.trace.convert import convert_trace
    from kvtier.trace.reader import TraceError

    try:
        fmt, n = convert_trace(args.input, args.output, to=args.to, force=args.force,
                               progress=True, upgrade=args.upgrade)
    except (TraceError, FileExistsError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"{exc.filename or args.output}: {exc.strerror or exc}") from None
    print(f"wrote {args.output} ({fmt}, {n} records)")
    return 0
