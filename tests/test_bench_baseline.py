"""benchmarks/baseline.py: the one helper that puts another commit's code beside this
checkout's for before/after benchmark rounds."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import baseline  # noqa: E402


def test_one_copy_of_the_export_helper():
    """Every benchmark that runs a baseline goes through baseline.py: no other file exports a
    git ref or builds the PYTHONPATH subprocess itself."""
    for path in sorted(BENCH.glob("*.py")):
        if path.name == "baseline.py":
            continue
        text = path.read_text()
        assert '"archive"' not in text, f"{path.name} exports a git ref itself"
        assert '"PYTHONPATH"' not in text, f"{path.name} builds the baseline subprocess itself"
    users = [p.name for p in BENCH.glob("bench_*.py") if "from baseline import" in p.read_text()]
    assert {"bench_replay.py", "bench_tracer.py", "bench_analyze.py"} <= set(users)


def test_rounds_alternate():
    codes = [("a", Path("a")), ("b", Path("b"))]
    assert [[t for t, _ in r] for r in baseline.rounds(codes, 3)] == [["a", "b"], ["b", "a"],
                                                                       ["a", "b"]]
    assert [[t for t, _ in r] for r in baseline.rounds(codes[:1], 2)] == [["a"], ["a"]]


def test_flags_are_exclusive():
    ap = argparse.ArgumentParser()
    baseline.add_baseline_args(ap)
    assert ap.parse_args(["--baseline-ref", "HEAD"]).baseline_ref == "HEAD"
    with pytest.raises(SystemExit):
        ap.parse_args(["--baseline-ref", "HEAD", "--baseline", "x"])


def test_exported_ref_is_imported_by_the_subprocess_and_removed_after():
    if shutil.which("git") is None or subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    args = argparse.Namespace(baseline_ref="HEAD", baseline=None)
    with baseline.baseline_code(args) as codes:
        assert [t for t, _ in codes] == ["this checkout", "baseline HEAD"]
        code = codes[1][1]
        out = baseline.run_code(code, ["-c", "import kvtier; print(kvtier.__file__)"]).stdout
        assert Path(out.strip()).resolve().is_relative_to(code.resolve())
    assert not code.exists()


def test_bad_ref_and_folder_fail_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--baseline-ref no-such-ref-xyz: cannot export"):
        with baseline.baseline_code(argparse.Namespace(baseline_ref="no-such-ref-xyz",
                                                       baseline=None)):
            pass
    with pytest.raises(SystemExit, match="no kvtier package"):
        with baseline.baseline_code(argparse.Namespace(baseline_ref=None,
                                                       baseline=str(tmp_path))):
            pass
