"""``kvtier report``: PNG figures and one self-contained HTML page for one or more traces."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from kvtier.commands.analyze import add_analysis_args

    p = sub.add_parser(
        "report",
        help="figures (PNG) and one offline HTML page for one or more traces",
        description="Analyse every TRACE (a trace directory, or an analysis.json written by "
        "kvtier analyze, which is reused as is) and write OUT/index.html (figures inlined, no "
        "network needed) plus one PNG per figure and OUT/<label>.analysis.json. Several traces "
        "are drawn side by side. The analysis flags apply to the traces analysed here.",
    )
    p.add_argument("traces", nargs="+", metavar="TRACE",
                   help="trace directories (or analysis.json files), one or more")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--label", action="append", default=[], metavar="NAME",
                   help="a name per TRACE, in order (default: the directory names)")
    p.add_argument("--title", default="kvtier trace report", help="page title")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_analysis_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from kvtier.analysis.analyze import AnalysisError, analyze, write_analysis
    from kvtier.analysis.report import unique_labels, write_report
    from kvtier.cli import CLIError
    from kvtier.commands.analyze import settings_from_args, summary_lines

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("matplotlib is not installed: pip install 'kvtier[plot]'") from None
    if args.label and len(args.label) != len(args.traces):
        raise CLIError(f"--label given {len(args.label)} times for {len(args.traces)} traces")
    settings = settings_from_args(args)
    labels = args.label or unique_labels(args.traces)
    out = Path(args.out)
    traces = []
    for label, path in zip(labels, args.traces, strict=True):
        p = Path(path)
        if p.is_file() and p.suffix == ".json":
            try:
                res = json.loads(p.read_text())
            except (OSError, ValueError) as exc:
                raise CLIError(f"{p}: not a readable analysis.json: {exc}") from None
            if not isinstance(res, dict) or "kvtier_analysis" not in res:
                raise CLIError(f"{p}: not an analysis written by kvtier analyze")
        else:
            try:
                res = analyze(p, settings, progress=not args.no_progress)
            except AnalysisError as exc:
                raise CLIError(str(exc)) from None
            print(f"{label}: " + "; ".join(summary_lines(res)[:1]))
        traces.append((label, res))
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        write_analysis(out / f"{safe}.analysis.json", res)
    page = write_report(traces, out, args.title)
    print(f"-> {page}")
    return 0
