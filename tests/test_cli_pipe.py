"""Every command handles a closed stdout (``kvtier ... | head``) quietly: no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvtier.sim.synth import SynthConfig, synth_stream, write_trace


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe") / "t"
    write_trace(synth_stream(SynthConfig(requests=2, layers=2, steps=4, prompt_len=300,
                                         prompt_jitter=0, topk=32, block_size=16)), d)
    return d


def run_closed_stdout(*argv: str) -> subprocess.CompletedProcess:
    """Run ``python -m kvtier ARGV`` with a stdout pipe whose reading end is already closed
    (what ``| head`` leaves once head has exited)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "kvtier", *argv], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(w)


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["replay", "{trace}", "--out", "{tmp}/r", "--no-progress"],
    ["sweep", "{trace}", "--policies", "lru", "--capacities", "10%", "--out", "{tmp}/s.csv",
     "--no-progress"],
    ["mrc", "{trace}", "--out", "{tmp}/m.csv"],
    ["validate", "{trace}"],
    ["summarize", "{trace}"],
    ["synth", "--out", "{tmp}/y", "--requests", "1", "--new-tokens", "2", "--no-progress"],
    ["sanity", "--out", "{tmp}/z", "--requests", "1", "--new-tokens", "2"],
])
def test_closed_stdout_is_quiet(tmp_path, trace, argv):
    argv = [a.replace("{trace}", str(trace)).replace("{tmp}", str(tmp_path)) for a in argv]
    res = run_closed_stdout(*argv)
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr, res.stderr
    # 141 = 128 + SIGPIPE; argparse swallows its own write errors for --help (status 0)
    assert res.returncode == (0 if argv == ["--help"] else 141), (res.returncode, res.stderr)
