"""``kvtier validate``: check a trace directory (JSONL or Parquet) without torch."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a trace against the schema; name file, line and field of bad records",
                       description="Validate every record of a trace directory (or one .jsonl/.parquet "
                                   "file): schema, then the record's own arithmetic (sorted unique ids, "
                                   "counts, offsets, block ids). Exit status 1 if anything is wrong.")
    p.add_argument("trace", help="trace directory, or a trace_steps*.jsonl / .parquet file")
    p.add_argument("--max-errors", type=int, default=50,
                   help="print at most this many problems (all are counted; default 50)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.cli import CLIError
    from kvtier.trace.validate import validate_trace

    if args.max_errors < 0:
        raise CLIError(f"--max-errors must be >= 0, got {args.max_errors}")
    rep = validate_trace(args.trace, max_messages=args.max_errors)
    for msg in rep.messages:
        print(msg)
    if rep.errors > len(rep.messages):
        print(f"... and {rep.errors - len(rep.messages)} more")
    status = "ok" if rep.ok else f"{rep.errors} error(s)"
    print(f"{args.trace}: {rep.records} valid records in {len(rep.files)} file(s): {status}")
    return 0 if rep.ok else 1
