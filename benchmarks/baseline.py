"""Another commit's code beside this checkout's, for before/after in one benchmark run.

A benchmark that compares against a baseline times both codes on the same machine in
alternating rounds (this checkout first in even rounds, the baseline first in odd ones), each
in fresh subprocesses that import kvtier from their own tree through PYTHONPATH. The baseline
is a git ref of this repository exported with ``git archive`` into a temporary directory
(nothing in the repository changes), or a folder that already holds a checkout (a machine
without git, such as the device host).

    from baseline import add_baseline_args, baseline_code, rounds, run_code

    add_baseline_args(parser)
    with baseline_code(args) as codes:          # [("this checkout", ROOT), ("baseline REF", DIR)]
        for order in rounds(codes, args.repeat):
            for tag, code in order:
                out = run_code(code, [script, "--worker", ...]).stdout
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

#: this checkout's root (the benchmarks' parent)
ROOT = Path(__file__).resolve().parents[1]
THIS = "this checkout"


def add_baseline_args(ap: argparse.ArgumentParser, what: str = "the same runs") -> None:
    """``--baseline-ref REF`` and ``--baseline DIR`` (one or the other)."""
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--baseline-ref", default=None, metavar="REF",
                   help=f"also time {what} with the code of this git ref (exported with git "
                        "archive into a temporary directory), alternating rounds with this "
                        "checkout's")
    g.add_argument("--baseline", default=None, metavar="DIR",
                   help=f"also time {what} with the code in DIR (a checkout or an exported "
                        "tree), instead of --baseline-ref")


def export(ref: str) -> Path:
    """``git archive REF`` of this repository, unpacked into a new temporary directory."""
    dest = Path(tempfile.mkdtemp(prefix="kvtier-baseline-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        err = getattr(exc, "stderr", b"") or b""
        raise SystemExit(f"--baseline-ref {ref}: cannot export it: "
                         f"{err.decode(errors='replace').strip() or exc}") from None
    return dest


@contextmanager
def baseline_code(args: argparse.Namespace) -> Iterator[list[tuple[str, Path]]]:
    """``[(label, code root)]``: this checkout, then the baseline if ``args`` names one
    (``--baseline-ref`` exported for the duration of the block, ``--baseline`` as given)."""
    codes = [(THIS, ROOT)]
    ref, folder = getattr(args, "baseline_ref", None), getattr(args, "baseline", None)
    if folder:
        if not (Path(folder) / "kvtier").is_dir():
            raise SystemExit(f"--baseline {folder}: no kvtier package there")
        codes.append((f"baseline {folder}", Path(folder)))
        yield codes
        return
    if not ref:
        yield codes
        return
    dest = export(ref)
    try:
        codes.append((f"baseline {ref}", dest))
        yield codes
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def rounds(codes: Sequence[tuple[str, Path]], repeat: int) -> Iterator[list[tuple[str, Path]]]:
    """``repeat`` rounds over ``codes``, the order reversed every other round (so neither
    code always runs first, on a warmer or quieter machine)."""
    for r in range(repeat):
        yield list(codes) if r % 2 == 0 else list(codes)[::-1]


def run_code(code: Path, argv: list[str], *, env: dict | None = None,
             drop_env: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """``python ARGV`` with kvtier imported from ``code`` (PYTHONPATH, working directory);
    ``env`` adds variables, ``drop_env`` removes some. Raises on a non-zero exit, with the
    subprocess's stderr."""
    full = {**os.environ, **(env or {}), "PYTHONPATH": str(code)}
    for name in drop_env:
        full.pop(name, None)
    proc = subprocess.run([sys.executable, *argv], env=full, cwd=str(code),
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{code}: {' '.join(argv[:3])} ... exited {proc.returncode}:\n"
                         f"{proc.stderr.strip()}")
    return proc
