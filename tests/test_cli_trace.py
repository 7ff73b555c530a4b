"""The trace subcommands end to end, and one clear line + non-zero exit for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvtier.cli import main


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    code = "import sys; from kvtier.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)


def test_sanity_validate_summarize_convert(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["sanity", "--out", out, "--requests", "3", "--new-tokens", "3", "--layers", "2"]) == 0
    assert "validate: ok" in capsys.readouterr().out
    assert main(["validate", out]) == 0
    assert main(["summarize", out]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["convert", out, str(tmp_path / "p")]) == 0
    assert main(["validate", str(tmp_path / "p")]) == 0
    assert main(["summarize", str(tmp_path / "p")]) == 0
    assert "up to date" in capsys.readouterr().out
    (tmp_path / "s" / "summary.json").unlink()
    assert main(["summarize", out]) == 0
    assert (tmp_path / "s" / "summary.json").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["sanity", "--kv-block-size", "0"], "--kv-block-size must be > 0"),
    (["sanity", "--trace-sample-rate", "1.5"], "--trace-sample-rate must be in (0, 1]"),
    (["sanity", "--topk", "0"], "--topk must be > 0"),
    (["summarize", "{tmp}/missing"], "no such trace directory"),
    (["convert", "{tmp}/missing", "{tmp}/out"], "no such trace directory"),
    (["validate", "{tmp}/x", "--max-errors", "-1"], "--max-errors must be >= 0"),
])
def test_bad_input_is_one_line(tmp_path, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "sanity":
        argv += ["--out", str(tmp_path / "o")]
    res = run_cli(*argv)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


def test_nothing_overwritten_without_force(tmp_path):
    out = str(tmp_path / "s")
    assert run_cli("sanity", "--out", out, "--new-tokens", "2").returncode == 0
    before = (tmp_path / "s" / "trace_steps.jsonl").read_bytes()
    res = run_cli("sanity", "--out", out, "--new-tokens", "3")
    assert res.returncode == 2 and "--force" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert (tmp_path / "s" / "trace_steps.jsonl").read_bytes() == before
    summary = tmp_path / "s" / "summary.json"
    summary.write_text(summary.read_text().replace('"records": ', '"records": 1'))
    res = run_cli("summarize", out)
    assert res.returncode == 2 and "differs" in res.stderr
    assert run_cli("summarize", out, "--force").returncode == 0
    assert run_cli("summarize", out).stdout.strip().endswith("records)")
    assert run_cli("convert", out, out + "p").returncode == 0
    res = run_cli("convert", out, out + "p")
    assert res.returncode == 2 and "--force" in res.stderr
    assert run_cli("sanity", "--out", out, "--new-tokens", "3", "--force").returncode == 0


def test_validate_reports_bad_lines(tmp_path):
    out = tmp_path / "s"
    assert run_cli("sanity", "--out", str(out), "--new-tokens", "2").returncode == 0
    f = out / "trace_steps.jsonl"
    lines = f.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"layer_id":', b'"layer_id":"x","old":')
    f.write_bytes(b"".join(lines) + b'{"event":')
    res = run_cli("validate", str(out))
    assert res.returncode == 1
    assert f"{f}:3: $.layer_id: Expected `int`, got `str`" in res.stdout
    assert f"{f}:{len(lines) + 1}: $: truncated final line" in res.stdout
    assert "2 error(s)" in res.stdout


def test_help_lists_trace_commands():
    res = run_cli("--help")
    assert res.returncode == 0
    for name in ("sanity", "validate", "summarize", "convert"):
        assert name in res.stdout
    res = run_cli("sanity", "--help")
    assert "--trace-store-scores" in res.stdout and "--kv-bytes-per-token" in res.stdout
