"""``kvtier sweep`` and ``kvtier mrc`` end to end on a small synthetic trace."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq
import pytest

from kvtier.cli import main
from kvtier.policies import load_policy
from kvtier.sim.access import read_access_stream, rebucket
from kvtier.sim.cachesim import lru_mrc, simulate
from kvtier.sim.capacity import CapacitySpec, parse_capacity
from kvtier.sim.sweep import split_policies
from kvtier.sim.synth import SynthConfig, synth_stream, write_trace

CFG = SynthConfig(requests=2, layers=3, steps=10, prompt_len=600, prompt_jitter=100, topk=96,
                  block_size=16)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    d = tmp_path_factory.mktemp("trace")
    write_trace(synth_stream(CFG), d)
    return d


def test_split_policies():
    assert split_policies("lru, fifo") == ["lru", "fifo"]
    assert split_policies("lru,dsa_aware:half_life=8,window_tokens=128,m.p:C,f.py:D:x=1,y=2") == [
        "lru", "dsa_aware:half_life=8,window_tokens=128", "m.p:C", "f.py:D:x=1,y=2"]


def test_sweep_policy_arguments(trace, tmp_path):
    out = tmp_path / "t.csv"
    assert main(["sweep", str(trace), "--policies",
                 "dsa_aware,dsa_aware:half_life=1,admission=false", "--capacities", "48blocks",
                 "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["policy"] for r in rows] == ["dsa_aware", "dsa_aware:half_life=1,admission=false"]
    bs = rebucket(read_access_stream(trace), 16)
    from kvtier.policies.dsa_aware import DSAAwarePolicy

    assert int(rows[1]["hits"]) == simulate(DSAAwarePolicy(48, half_life=1, admission=False),
                                            bs).hits


def test_parse_capacity():
    assert parse_capacity("256") == CapacitySpec("256", blocks=256)
    assert parse_capacity("101").blocks == 101
    assert parse_capacity("1k").blocks == 1024
    assert parse_capacity("2M").blocks == 2 * 1024**2
    assert parse_capacity("30blocks") == CapacitySpec("30blocks", blocks=30)
    assert parse_capacity("1 block").blocks == 1
    assert parse_capacity("256blocks").blocks == 256
    assert parse_capacity("0.25").fraction == 0.25
    assert parse_capacity("25%").fraction == 0.25
    assert parse_capacity("100%").resolve(40) == 40
    assert parse_capacity("1%").resolve(10) == 1
    for bad in ("abc", "1.5", "0%", "-3", "1kb", "0blocks", "1.5blocks", "2kblocks"):
        with pytest.raises(ValueError, match="capacity"):
            parse_capacity(bad)


@pytest.mark.parametrize("bare", ["1", "30", "64", "100"])
def test_bare_numbers_up_to_100_are_ambiguous(bare):
    """30 could mean 30 blocks or 30 % of the working set: refused, naming both spellings."""
    with pytest.raises(ValueError, match=f"ambiguous.*{bare}%.*{bare}blocks"):
        parse_capacity(bare)
    assert parse_capacity(bare, bare="blocks").blocks == int(bare)  # a flag named for blocks


def test_sweep_refuses_an_ambiguous_capacity(trace, tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert main(["sweep", str(trace), "--capacities", "10%,30", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--capacities: capacity '30' is ambiguous" in err
    assert "30%" in err and "30blocks" in err
    assert not out.exists()


@pytest.mark.parametrize("jobs", [1, 2])
def test_sweep_table_matches_direct_simulation(trace, tmp_path, jobs):
    out = tmp_path / "table.csv"
    rc = main(["sweep", str(trace), "--policies", "lru,fifo,belady,dsa_aware",
               "--capacities", "8blocks,64blocks,50%", "--block-sizes", "16,64", "--jobs", str(jobs),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    table = pq.read_table(out.with_suffix(".parquet")).to_pylist()
    assert len(rows) == len(table) == 2 * 4 * 3
    stream = read_access_stream(trace)
    for r, t in zip(rows, table, strict=True):
        assert int(r["hits"]) == t["hits"] and r["policy"] == t["policy"]
        bs = rebucket(stream, t["block_size"])
        ws = int(np.unique(bs.keys()).shape[0])
        assert t["working_set"] == ws
        expect_cap = max(1, round(0.5 * ws)) if t["capacity_spec"] == "50%" else int(
            t["capacity_spec"].removesuffix("blocks"))
        assert t["capacity_blocks"] == expect_cap
        direct = simulate(load_policy(t["policy"])(expect_cap), bs)
        assert t["hits"] == direct.hits
        assert t["hits"] + t["misses"] == t["accesses"] == direct.accesses
    # grid order: block size, policy, capacity
    assert [(t["block_size"], t["policy"]) for t in table[:4]] == [
        (16, "lru"), (16, "lru"), (16, "lru"), (16, "fifo")]


def test_sweep_defaults_to_trace_block_size(trace, tmp_path):
    out = tmp_path / "t.csv"
    assert main(["sweep", str(trace), "--policies", "lru", "--capacities", "16blocks",
                 "--out", str(out), "--parquet", str(tmp_path / "x.parquet"),
                 "--no-progress"]) == 0
    t = pq.read_table(tmp_path / "x.parquet").to_pylist()
    assert [r["block_size"] for r in t] == [16]


def test_sweep_user_policy_file(trace, tmp_path):
    f = tmp_path / "my_policy.py"
    f.write_text("from kvtier.policies.fifo import FIFOPolicy\n\n"
                 "class MyFIFO(FIFOPolicy):\n    name = 'myfifo'\n")
    out = tmp_path / "t.csv"
    assert main(["sweep", str(trace), "--policies", f"fifo,{f}:MyFIFO", "--capacities", "32blocks",
                 "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["hits"] == rows[1]["hits"]
    assert rows[1]["policy"] == f"{f}:MyFIFO"


@pytest.mark.parametrize("argv, needle", [
    (["--policies", "lru,bogus"], "unknown eviction policy 'bogus'; known: arc, belady"),
    (["--policies", "dsa_aware:half_life=-1"], "half_life must be > 0"),
    (["--policies", "lru:nonsense=1"], "--policies: eviction policy 'lru:nonsense=1'"),
    (["--capacities", "12x"], "--capacities: capacity '12x'"),
    (["--block-sizes", "16,0"], "--block-sizes: block size 0 must be > 0"),
    (["--jobs", "0"], "--jobs: must be >= 1"),
])
def test_sweep_bad_flags_fail_at_start(trace, tmp_path, capsys, argv, needle):
    out = tmp_path / "t.csv"
    assert main(["sweep", str(trace), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not out.exists()


def test_sweep_bad_trace(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "trace_steps.jsonl").write_text('{"event": "dsa_topk"}\n')
    assert main(["sweep", str(d), "--out", str(tmp_path / "t.csv"), "--no-progress"]) == 2
    assert "trace_steps.jsonl:1:" in capsys.readouterr().err


def test_mrc_command(trace, tmp_path):
    out = tmp_path / "mrc.csv"
    png = tmp_path / "mrc.png"
    assert main(["mrc", str(trace), "--block-sizes", "16,64", "--all-capacities",
                 "--out", str(out), "--plot", str(png)]) == 0
    rows = list(csv.DictReader(out.open()))
    stream = read_access_stream(trace)
    for bsz in (16, 64):
        keys = rebucket(stream, bsz).keys()
        curve = lru_mrc(keys)
        mine = [r for r in rows if int(r["block_size"]) == bsz]
        assert [int(r["hits"]) for r in mine] == curve.hits.tolist()
        assert [int(r["capacity_blocks"]) for r in mine] == list(range(len(mine)))
        for r in mine[:: max(1, len(mine) // 7)]:
            cap = int(r["capacity_blocks"])
            assert int(r["hits"]) == load_policy("lru")(cap).access_many(keys)
        assert sum(r["knee"] == "true" for r in mine) == 1
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def brute_knee(hits: list[int]) -> int:
    """The Kneedle knee written out: the capacity where the normalised hit curve is furthest
    above the chord from (0, 0) to (working set, all reuse hits)."""
    ws, top = len(hits) - 1, hits[-1]
    gaps = [hits[c] / top - c / ws for c in range(1, ws + 1)]
    return gaps.index(max(gaps)) + 1


@pytest.fixture(scope="module")
def big_trace(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    write_trace(synth_stream(SynthConfig(requests=3, layers=3, steps=12, prompt_len=2000,
                                         prompt_jitter=200, topk=128, block_size=16)), d)
    return d


def test_mrc_default_is_a_bounded_set_with_the_knee(big_trace, tmp_path, capsys):
    trace = big_trace
    out = tmp_path / "mrc.csv"
    assert main(["mrc", str(trace), "--out", str(out), "--points", "10"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    curve = lru_mrc(rebucket(read_access_stream(trace), 16).keys())
    ws = curve.hits.shape[0] - 1
    assert ws > 100  # the bound matters
    caps = [int(r["capacity_blocks"]) for r in rows]
    assert caps == sorted(set(caps)) and caps[0] == 0 and caps[-1] == ws
    assert len(rows) <= 10 + 4  # log-spaced points, 0, the working set, the knee and before
    knee = brute_knee(curve.hits.tolist())
    assert curve.knee() == knee
    assert knee in caps and knee - 1 in caps
    assert [int(r["capacity_blocks"]) for r in rows if r["knee"] == "true"] == [knee]
    for r in rows:
        assert int(r["hits"]) == curve.hits[int(r["capacity_blocks"])]
    assert f"knee at {knee} blocks" in printed and "--all-capacities" in printed
    # the default (64 points) is bounded too, far below one row per capacity
    assert main(["mrc", str(trace), "--out", str(out)]) == 0
    assert len(list(csv.DictReader(out.open()))) <= 64 + 4 < ws + 1


def test_mrc_old_block_size_spelling(trace, tmp_path, capsys):
    new, old = tmp_path / "new.csv", tmp_path / "old.csv"
    assert main(["mrc", str(trace), "--block-sizes", "16,64", "--out", str(new)]) == 0
    capsys.readouterr()
    assert main(["mrc", str(trace), "--block-size", "16,64", "--out", str(old)]) == 0
    assert "--block-size is deprecated: use --block-sizes" in capsys.readouterr().err
    assert old.read_bytes() == new.read_bytes()
    assert main(["mrc", str(trace), "--block-size", "16", "--block-sizes", "16",
                 "--out", str(old)]) == 2
    assert "use --block-sizes only" in capsys.readouterr().err
    assert main(["mrc", str(trace), "--points", "1", "--out", str(old)]) == 2
    assert "--points: must be >= 2" in capsys.readouterr().err


def test_knee_edge_cases():
    assert lru_mrc(np.zeros(0, np.int64)).knee() is None
    assert lru_mrc(np.array([1, 2, 3])).knee() is None  # no reuse: nothing to gain
    assert lru_mrc(np.array([5, 5, 5])).knee() == 1
    loop = np.tile(np.arange(50), 4)  # LRU's cliff: no hits below the loop size
    assert lru_mrc(loop).knee() == 50


def test_sweep_failing_cell_keeps_other_rows(trace, tmp_path, capsys):
    f = tmp_path / "flaky.py"
    f.write_text("from kvtier.policies.lru import LRUPolicy\n\n"
                 "class Flaky(LRUPolicy):\n"
                 "    def access_many(self, keys):\n"
                 "        if self.capacity == 7:\n"
                 "            raise RuntimeError('boom at 7')\n"
                 "        return super().access_many(keys)\n")
    out = tmp_path / "t.csv"
    rc = main(["sweep", str(trace), "--policies", f"{f}:Flaky", "--capacities", "5blocks,7blocks,9blocks",
               "--out", str(out), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "capacity=7blocks: RuntimeError: boom at 7" in err and "1 of 3 cells failed" in err
    rows = list(csv.DictReader(out.open()))
    assert [r["capacity_blocks"] for r in rows] == ["5", "9"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_sweep_times_cells_in_cpu_seconds_and_says_how_many_jobs(trace, tmp_path, jobs):
    """A cell's time is its worker's CPU time, which other workers waiting for a core do not
    inflate (wall time under --jobs would be); the table says how many jobs ran."""
    out = tmp_path / "t.csv"
    assert main(["sweep", str(trace), "--policies", "lru,fifo", "--capacities", "10%,50%",
                 "--jobs", str(jobs), "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert "seconds" not in rows[0] and "accesses_per_s" not in rows[0]
    for r in rows:
        assert int(r["jobs"]) == jobs
        cpu = float(r["cpu_seconds"])
        assert cpu >= 0
        if cpu > 0:
            assert float(r["accesses_per_cpu_s"]) == pytest.approx(int(r["accesses"]) / cpu)


def test_simulate_measures_process_time(monkeypatch):
    """``SimResult.cpu_seconds`` comes from ``time.process_time`` (a fake clock here)."""
    import itertools

    from kvtier.sim import cachesim

    clock = itertools.count(0.0, 2.5)
    monkeypatch.setattr(cachesim.time, "process_time", lambda: next(clock))
    res = simulate(load_policy("lru")(4), np.array([1, 2, 1, 3], dtype=np.int64))
    assert res.cpu_seconds == 2.5 and res.accesses_per_cpu_s == 4 / 2.5


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sweep_and_mrc_read_a_killed_runs_trace(trace, tmp_path, capsys, jobs):
    """A half-written last line (a killed run): sweep and mrc read the other records, give
    exactly their numbers on the trace without that line, and warn in one line (once, also
    with --jobs workers)."""
    data = (trace / "trace_steps.jsonl").read_bytes()
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    cut.mkdir(), whole.mkdir()
    keep = data[:data.rfind(b"\n", 0, len(data) - 1) + 1]
    (cut / "trace_steps.jsonl").write_bytes(data[:-30])
    (whole / "trace_steps.jsonl").write_bytes(keep)
    for cmd, extra in (("sweep", ["--policies", "lru,fifo", "--capacities", "16blocks,64blocks",
                                  "--jobs", jobs, "--no-progress"]),
                       ("mrc", ["--block-sizes", "16"])):
        outs = []
        for d in (cut, whole):
            out = tmp_path / f"{cmd}-{d.name}.csv"
            assert main([cmd, str(d), "--out", str(out), *extra]) == 0
            outs.append([{k: v for k, v in r.items() if "seconds" not in k and "per_cpu" not in k}
                         for r in csv.DictReader(out.open())])
        assert outs[0] == outs[1] and outs[0]
        err = capsys.readouterr().err
        warns = [ln for ln in err.splitlines() if "warning" in ln]
        assert len(warns) == 1 and "skipped 1 line (truncated_final_line 1)" in warns[0], err
