"""Subcommands of the ``kvtier`` CLI; each module exposes ``register(subparsers)``.

Convention: ``register`` adds a parser with a help line for the command and for every flag,
and sets ``func=run`` where ``run(args) -> int``. Expected failures raise
``kvtier.cli.CLIError`` (one clear line, exit 2). Heavy imports go inside ``run``.
"""

import argparse


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (the error names the flag through argparse)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def nonneg_float(text: str) -> float:
    """argparse type: a float >= 0 (NaN refused)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def check_written_trace(out) -> None:
    """Validate a trace a command just wrote (``synth``, ``sanity``): print every problem and
    raise ``CLIError`` if it fails (a bug in the writer, never the user's input)."""
    from kvtier.cli import CLIError
    from kvtier.trace.validate import validate_trace

    rep = validate_trace(out)
    if not rep.ok:
        for msg in rep.messages:
            print(msg)
        raise CLIError(f"the synthetic trace in {out} failed validation ({rep.errors} errors)")
