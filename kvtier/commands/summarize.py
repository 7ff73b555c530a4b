"""``kvtier summarize``: recompute summary.json from a trace directory alone."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summarize", help="recompute summary.json from the trace records and trace_meta.json",
                       description="Recompute the summary of a trace directory from its records and "
                                   "trace_meta.json. Writes DIR/summary.json if absent; if present, "
                                   "reports whether it matches (rewrite with --force). Sections no record "
                                   "holds (serving, skipped, tiers, stall, fetch_vs_recompute) are kept "
                                   "from the existing summary.json. Lines that are not records "
                                   "(the half-written last line of a killed run) are skipped "
                                   "with one warning; kvtier validate lists them.")
    p.add_argument("trace", help="trace directory (JSONL or Parquet)")
    p.add_argument("--out", default=None, help="write the summary to this file instead of DIR/summary.json")
    p.add_argument("--stdout", action="store_true", help="print the summary instead of writing a file")
    p.add_argument("--force", action="store_true", help="overwrite an existing summary file that differs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import msgspec

    from kvtier.cli import CLIError
    from kvtier.schema import SUMMARY_FILE, Summary
    from kvtier.trace.reader import SkippedLines, TraceError, find_trace, nothing_kept, warn_skipped
    from kvtier.trace.summary import recompute_summary
    from kvtier.trace.validate import old_form
    from kvtier.trace.writer import write_json_atomic

    root = Path(args.trace)
    existing_path = root / SUMMARY_FILE
    existing = None
    try:  # a trace of the earlier format: say so (and how to upgrade) before anything else
        old = old_form(find_trace(root), root)
    except TraceError as exc:
        raise CLIError(str(exc)) from None
    if old is not None:
        raise CLIError(old)
    if existing_path.is_file():
        try:
            existing = msgspec.json.decode(existing_path.read_bytes(), type=Summary)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            if not args.force and not args.stdout and args.out is None:
                raise CLIError(f"{existing_path}: unreadable ({exc}); use --force to replace it") from None
    log = SkippedLines()
    try:
        summary = recompute_summary(root, keep_from=existing, skipped=log)
    except TraceError as exc:
        raise CLIError(str(exc)) from None
    if log and not summary.records:
        raise CLIError(str(nothing_kept(log, root)))
    warn_skipped(log, root, summary.records)  # a killed run's half line: one warning
    if args.stdout:
        print(msgspec.json.format(msgspec.json.encode(summary), indent=2).decode())
        return 0
    out = Path(args.out) if args.out else existing_path
    if out.exists():
        try:
            same = msgspec.json.decode(out.read_bytes(), type=Summary) == summary
        except (msgspec.ValidationError, msgspec.DecodeError, OSError):
            same = False
        if same:
            print(f"{out}: up to date ({summary.records} records)")
            return 0
        if not args.force:
            raise CLIError(f"{out} exists and differs from the recomputed summary; use --force to overwrite")
    try:
        write_json_atomic(out, summary)
    except OSError as exc:
        raise CLIError(f"{out}: {exc.strerror or exc}") from None
    print(f"wrote {out} ({summary.records} records, {summary.requests} requests)")
    return 0
