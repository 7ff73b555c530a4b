"""``kvtier convert``: JSONL <-> Parquet trace directories, losslessly."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a trace between JSONL and the compact Parquet format",
                       description="Convert a trace directory (or file) to the other format: JSONL -> "
                                   "Parquet or Parquet -> JSONL. Records are preserved exactly; "
                                   "trace_meta.json and summary.json are carried over.")
    p.add_argument("input", help="trace directory, or a trace_steps*.jsonl / .parquet file")
    p.add_argument("output", help="output trace directory")
    p.add_argument("--to", choices=("jsonl", "parquet"), default=None,
                   help="output format (default: the other one)")
    p.add_argument("--force", action="store_true", help="overwrite an existing trace in OUTPUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.cli import CLIError
    from kvtier.trace.convert import convert_trace
    from kvtier.trace.reader import TraceError

    try:
        fmt, n = convert_trace(args.input, args.output, to=args.to, force=args.force, progress=True)
    except (TraceError, FileExistsError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"{exc.filename or args.output}: {exc.strerror or exc}") from None
    print(f"wrote {args.output} ({fmt}, {n} records)")
    return 0
