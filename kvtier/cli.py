"""``kvtier`` command line: one subcommand per job.

Each subcommand lives in its own module under ``kvtier.commands`` exposing
``register(subparsers)``; that module imports nothing heavy at import time (torch,
transformers, datasets are imported inside the command), so ``kvtier --help``,
``validate`` and ``replay`` stay fast and torch-free.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

#: subcommand module names under kvtier.commands, in --help order
COMMANDS = (
    "synth",
    "sanity",
    "validate",
    "summarize",
    "convert",
    "replay",
    "sweep",
    "mrc",
    "analyze",
    "report",
    "convert_checkpoint",
    "generate",
    "run",
    "demo",
)


class CLIError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier",
        description="Trace DeepSeek Sparse Attention top-k selections and emulate tiered KV pools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        modname = f"kvtier.commands.{name}"
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:  # a subcommand still under construction
            if exc.name == modname:
                continue
            raise
        module.register(sub)
    return parser


#: exit status when stdout is closed early (``kvtier ... | head``): 128 + SIGPIPE, as a
#: shell reports a tool that a broken pipe ended
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # also on argparse's exit after --help: a closed pipe shows up here
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again on the way out.
        import os

        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (tests)
            pass
        return EXIT_BROKEN_PIPE


def _one_line_warnings(command: str):
    """``warnings.showwarning`` for a command: a reader's ``SkippedLinesWarning`` (lines of a
    trace that are not records were skipped) as one ``kvtier CMD: warning: ...`` line on
    stderr, once per text; other warnings as Python shows them."""
    shown: set[str] = set()
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__name__ != "SkippedLinesWarning":
            return default(message, category, filename, lineno, file, line)
        text = str(message)
        if text not in shown:
            shown.add(text)
            print(f"kvtier {command}: warning: {text}", file=sys.stderr)

    return show


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command)
            return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"kvtier {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvtier {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run through the imported module so commands raise the same CLIError class we catch
    from kvtier.cli import main as _main

    sys.exit(_main())
