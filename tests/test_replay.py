"""``kvtier replay``: records preserved with kv_fetch replaced, summaries consistent, the LRU
reference through the CLI, overwrite protection, error lines, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
from cache_refs import ref_lru

from kvtier.cli import main
from kvtier.schema import Summary, TopkRecord
from kvtier.sim.access import key_stream
from kvtier.sim.synth import SynthConfig, synth_stream, write_trace
from kvtier.sim.tiers.config import load_tier_config

BS = 16


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("trace")
    s = synth_stream(SynthConfig(requests=3, layers=3, steps=8, prompt_len=512, prompt_jitter=64,
                                 topk=64, block_size=BS, stagger=2, seed=3))
    write_trace(s, d)
    return d


def _records(path: Path) -> list[TopkRecord]:
    return msgspec.json.Decoder(TopkRecord).decode_lines((path / "trace_steps.jsonl").read_bytes())


def _summary(path: Path) -> Summary:
    return msgspec.json.decode((path / "summary.json").read_bytes(), type=Summary)


def _replay(*args: str) -> int:
    return main(["replay", *args, "--no-progress"])


def test_sim_replay_keeps_records_and_sums_up(trace, tmp_path):
    out = tmp_path / "out"
    assert _replay(str(trace), "--out", str(out), "--tiers", "mooncake", "--hbm-blocks", "40") == 0
    before, after = _records(trace), _records(out)
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert msgspec.structs.replace(a, kv_fetch=b.kv_fetch) == b
        tiers = [b.kv_fetch.hbm, b.kv_fetch.local_pool, b.kv_fetch.remote_pool]
        assert sorted(x for t in tiers for x in t.hit_blocks) == b.selected_block_ids  # partition
        assert all(t.batch_size == len(t.hit_blocks) for t in tiers)
    assert any(r.kv_fetch.local_pool.hit_blocks and r.kv_fetch.hbm.hit_blocks for r in after)
    summ = _summary(out)
    assert summ.records == len(after)
    for name in ("hbm", "local_pool", "remote_pool"):
        recs = [getattr(r.kv_fetch, name) for r in after]
        refilled = summ.tiers[name]["refilled_blocks"]  # unserved blocks, listed under hbm
        assert sum(len(x.hit_blocks) for x in recs) == summ.tiers[name]["hit_blocks"] + refilled
        assert sum(x.bytes_read for x in recs) == summ.tiers[name]["bytes_read"]
        assert sum(x.read_ops for x in recs) == summ.tiers[name]["read_ops"]
    assert summ.tiers["_totals"]["accesses"] == sum(r.unique_blocks for r in after)
    assert set(summ.stall) >= {"total_us", "per_step_us", "per_layer_us", "per_fetch_us"}
    assert summ.fetch_vs_recompute["requests"] == 3
    meta = json.loads((out / "trace_meta.json").read_text())
    assert meta["config"]["replay"]["tiers"] == "mooncake"
    assert meta["config"]["backend"] == "sim"


def test_hbm_only_replay_through_cli_equals_reference_lru(trace, tmp_path):
    """Only an HBM tier, keys in trace order: hits equal a plain LRU over the key stream."""
    cfg = msgspec.to_builtins(load_tier_config("memfabric"))
    del cfg["local_pool"], cfg["remote_pool"]
    path = tmp_path / "hbm_only.json"
    path.write_text(json.dumps(cfg))
    keys = key_stream(trace).tolist()
    for cap in (10, 60, 300):
        out = tmp_path / f"o{cap}"
        assert _replay(str(trace), "--out", str(out), "--tiers", str(path), "--hbm-blocks",
                       str(cap), "--on-release", "keep") == 0
        assert _summary(out).tiers["hbm"]["hit_blocks"] == ref_lru(keys, cap)


def test_hbm_backend_marks_everything_hbm(trace, tmp_path):
    out = tmp_path / "hbm"
    assert _replay(str(trace), "--out", str(out), "--backend", "hbm") == 0
    for r in _records(out):
        assert r.kv_fetch.hbm.hit_blocks == r.selected_block_ids
        assert r.kv_fetch.hbm.batch_size == r.unique_blocks
        assert r.kv_fetch.local_pool.latency_us is None and r.kv_fetch.local_pool.hit_blocks == []


def test_rebucketing_rewrites_block_fields(trace, tmp_path):
    out = tmp_path / "bs32"
    assert _replay(str(trace), "--out", str(out), "--block-size", "32") == 0
    for r in _records(out):
        pos = np.asarray(r.selected_token_pos)
        blocks = np.unique(pos // 32)
        assert r.block_size_tokens == 32
        assert r.selected_block_ids == blocks.tolist() and r.unique_blocks == blocks.size
        per = np.unique(pos // 32, return_counts=True)[1]
        assert r.tokens_per_touched_block.mean == pytest.approx(per.mean())
        tiers = [r.kv_fetch.hbm, r.kv_fetch.local_pool, r.kv_fetch.remote_pool]
        assert sorted(x for t in tiers for x in t.hit_blocks) == r.selected_block_ids
        assert r.prefix.intersection_blocks == []  # no prefix key: no prefix blocks
    # a tracer trace (prefix keys, cache hits) re-bucketed: every record still validates
    src, out2 = tmp_path / "san", tmp_path / "san32"
    assert main(["sanity", "--out", str(src), "--requests", "3", "--layers", "2"]) == 0
    assert _replay(str(src), "--out", str(out2), "--block-size", "32", "--hbm-blocks", "20") == 0
    assert main(["validate", str(out2)]) == 0
    recs = _records(out2)
    assert any(r.prefix.intersection_blocks for r in recs)
    assert any(r.prefix.prefix_cache_hit for r in recs)


def test_refuses_to_overwrite_without_force(trace, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert _replay(str(trace), "--out", str(out)) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert _replay(str(trace), "--out", str(out), "--force") == 0
    assert not (out / "keep.txt").exists()


@pytest.mark.parametrize(("flag", "value", "pattern"), [
    ("--policy", "nosuch", "unknown eviction policy"),
    ("--placement", "nowhere", "unknown placement policy"),
    ("--prefetch", "psychic", "unknown prefetch policy"),
    ("--migration", "promote_hot:hot=0", "hot"),
    ("--tiers", "nosuchpreset", "unknown tier preset"),
    ("--fetch-granularity", "5", "fetch_granularity"),
])
def test_bad_settings_fail_at_start(trace, tmp_path, capsys, flag, value, pattern):
    out = tmp_path / "never"
    assert _replay(str(trace), "--out", str(out), flag, value) == 2
    err = capsys.readouterr().err
    assert pattern in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_record_is_skipped_naming_file_and_line(trace, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (trace / "trace_steps.jsonl").read_bytes().splitlines()
    lines[4] = lines[4].replace(b'"layer_id":', b'"layer_id":"x","was":')
    (bad / "trace_steps.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "o"
    assert _replay(str(bad), "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "trace_steps.jsonl:5: invalid_record" in err
    assert (out / "trace_steps.jsonl").read_bytes().count(b"\n") == len(lines) - 1
    # nothing at all is a record: an error, nothing written
    (bad / "trace_steps.jsonl").write_bytes(lines[4] + b"\n" + b"{oops\n")
    assert _replay(str(bad), "--out", str(tmp_path / "o2")) == 2
    assert "no record could be read" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_offline_policy_gets_the_future(trace, tmp_path):
    lru, opt = tmp_path / "lru", tmp_path / "opt"
    assert _replay(str(trace), "--out", str(lru), "--hbm-blocks", "40") == 0
    assert _replay(str(trace), "--out", str(opt), "--hbm-blocks", "40", "--policy", "belady") == 0
    assert _summary(opt).tiers["hbm"]["hit_blocks"] >= _summary(lru).tiers["hbm"]["hit_blocks"]


def test_replay_does_not_import_torch(trace, tmp_path):
    code = (
        "import sys\n"
        "from kvtier.cli import main\n"
        f"rc = main(['replay', {str(trace)!r}, '--out', {str(tmp_path / 'o')!r}, '--no-progress',"
        " '--prefetch', 'this_step_prev_layer', '--migration', 'promote_hot'])\n"
        "assert rc == 0, rc\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_parquet_input_gives_the_same_replay(trace, tmp_path):
    from kvtier.trace.convert import convert_trace

    pq_dir = tmp_path / "pq"
    convert_trace(trace, pq_dir, to="parquet")
    a, b = tmp_path / "a", tmp_path / "b"
    assert _replay(str(trace), "--out", str(a), "--hbm-blocks", "30") == 0
    assert _replay(str(pq_dir), "--out", str(b), "--hbm-blocks", "30") == 0
    assert _records(a) == _records(b)
    assert _summary(a).tiers == _summary(b).tiers


def test_summary_equals_the_record_path(trace, tmp_path):
    """replay's columnar summary == SummaryBuilder.add_records over its output records, with
    non-trivial prefix fields and after re-bucketing."""
    from kvtier.trace.summary import SummaryBuilder

    src = tmp_path / "pre"
    src.mkdir()
    recs = _records(trace)
    for r in recs:  # every request's prompt shares its first 6 blocks (3 at block 32)
        inter = [b for b in r.selected_block_ids if b < 6]
        r.prefix = msgspec.structs.replace(
            r.prefix, intersection_blocks=inter, prefix_cached_blocks=6 * (r.request_id > 0),
            prefix_cache_hit=r.request_id > 0, prefix_key="0" * 15 + "7",
            intersection_ratio=len(inter) / r.unique_blocks)
    (src / "trace_steps.jsonl").write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in recs))
    meta = {"schema_version": 2, "run_name": "x", "dataset": "d", "format": "jsonl",
            "config": {"trace": {"kv_block_size": BS, "prefix_key_tokens": 96}}}
    (src / "trace_meta.json").write_text(json.dumps(meta))
    for extra in ([], ["--block-size", "32"]):
        out = tmp_path / f"o{len(extra)}"
        assert _replay(str(src), "--out", str(out), "--hbm-blocks", "50", *extra) == 0
        got = _summary(out)
        ref = SummaryBuilder(got.run_name, got.dataset, got.config)
        ref.add_records(_records(out))
        want = ref.build()
        for field in ("records", "requests", "unique_blocks", "tokens_per_touched_block",
                      "offsets", "prefix_intersection_ratio", "prefix_hot_blocks"):
            assert getattr(got, field) == getattr(want, field), field
        if extra:  # at block 32 the 96-token prefix region is 3 blocks, the cached part too
            for r in _records(out):
                assert r.prefix.intersection_blocks == [b for b in r.selected_block_ids if b < 3]
                assert r.prefix.prefix_cached_blocks == 3 * (r.request_id > 0)


def test_lines_that_are_not_records_are_skipped_and_reported_once(trace, tmp_path, capsys):
    """A bad field late in the trace and a killed run's half line: replay skips both (one
    warning line naming file, line and field), replays the other records byte for byte
    outside kv_fetch, and its output validates."""
    bad = tmp_path / "bad2"
    bad.mkdir()
    lines = (trace / "trace_steps.jsonl").read_bytes().splitlines()
    assert b'"scores_stats":null' in lines[40]
    lines[40] = lines[40].replace(b'"scores_stats":null', b'"scores_stats":5')
    (bad / "trace_steps.jsonl").write_bytes(b"\n".join(lines) + b"\n" + lines[0][:50])
    out, ref = tmp_path / "o", tmp_path / "ref"
    assert _replay(str(bad), "--out", str(out), "--tiers", "mooncake", "--hbm-blocks", "40") == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "skipped 2 lines" in err
    assert "trace_steps.jsonl:41: invalid_record: $.scores_stats" in err
    good = tmp_path / "good"
    good.mkdir()
    (good / "trace_steps.jsonl").write_bytes(b"\n".join(lines[:40] + lines[41:]) + b"\n")
    assert _replay(str(good), "--out", str(ref), "--tiers", "mooncake", "--hbm-blocks", "40") == 0
    assert (out / "trace_steps.jsonl").read_bytes() == (ref / "trace_steps.jsonl").read_bytes()
    assert main(["validate", str(out)]) == 0
    # the same through the re-encoding path (another block size)
    assert _replay(str(bad), "--out", str(tmp_path / "o32"), "--block-size", "32") == 0
    assert _replay(str(good), "--out", str(tmp_path / "r32"), "--block-size", "32") == 0
    assert ((tmp_path / "o32" / "trace_steps.jsonl").read_bytes()
            == (tmp_path / "r32" / "trace_steps.jsonl").read_bytes())


def test_replays_a_sharded_tracer_trace_and_validates(tmp_path):
    """The real tracer's output (``kvtier sanity``: shards, meta with step wall times) replays
    through the emulator, and the replayed trace passes ``kvtier validate``."""
    src, out = tmp_path / "san", tmp_path / "out"
    assert main(["sanity", "--out", str(src), "--requests", "4", "--batch-size", "2",
                 "--layers", "3", "--trace-shard-records", "40"]) == 0
    assert _replay(str(src), "--out", str(out), "--tiers", "mooncake", "--hbm-blocks", "30",
                   "--prefetch", "this_step_prev_layer") == 0
    assert main(["validate", str(out)]) == 0
    summ = _summary(out)
    assert summ.records == _summary(src).records
    # sanity records 1000 us per step: each (step, layer) adds 1000/3 us of compute
    from kvtier.trace.reader import find_trace, iter_records

    wall = next(iter_records(find_trace(src))).kv_fetch.hbm.latency_us
    assert wall
    fetches = summ.stall["per_fetch_us"]["count"]
    assert summ.tiers["_totals"]["virtual_time_us"] >= fetches * wall / 3


def test_shared_prefix_keys_alias_blocks_in_replay(trace, tmp_path):
    """Requests with one ``prefix_key`` share their first prefix blocks (256 tokens / 16 = 16
    blocks): HBM hits follow the aliased key stream, for LRU and for Belady's future."""
    from kvtier.policies.belady import BeladyPolicy
    from kvtier.sim.access import read_access_stream
    from kvtier.sim.cachesim import simulate
    from kvtier.sim.replay import aliased_key_stream, prefix_hashes

    src = tmp_path / "shared"
    src.mkdir()
    recs = _records(trace)
    for r in recs:
        r.prefix = msgspec.structs.replace(r.prefix, prefix_key="00000000000000aa")
    (src / "trace_steps.jsonl").write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in recs))
    stream = read_access_stream(src)
    first = {}
    for i, r in enumerate(stream.req.tolist()):
        first.setdefault(r, int(stream.seq_len[i]) - 1)
    hashes = [prefix_hashes("00000000000000aa", first[i], 256, BS) for i in range(len(first))]
    keys = aliased_key_stream(stream, BS, hashes)
    assert len(np.unique(keys)) < len(np.unique(key_stream(src)))  # blocks really merged
    cfg = msgspec.to_builtins(load_tier_config("memfabric"))
    del cfg["local_pool"], cfg["remote_pool"]
    path = tmp_path / "hbm_only.json"
    path.write_text(json.dumps(cfg))
    for policy, ref in (("lru", ref_lru(keys.tolist(), 60)),
                        ("belady", simulate(BeladyPolicy(60), keys).hits)):
        out = tmp_path / policy
        assert _replay(str(src), "--out", str(out), "--tiers", str(path), "--hbm-blocks", "60",
                       "--on-release", "keep", "--policy", policy) == 0
        assert _summary(out).tiers["hbm"]["hit_blocks"] == ref, policy
    # the working set replay reports is HBM's: shared prefix blocks count once, so an HBM
    # holding it misses only first reads
    ws = len(np.unique(keys))
    out = tmp_path / "all"
    assert _replay(str(src), "--out", str(out), "--tiers", str(path), "--hbm-blocks",
                   str(ws), "--on-release", "keep") == 0
    tiers = _summary(out).tiers
    assert tiers["_totals"]["working_set_blocks"] == ws
    assert tiers["hbm"]["working_set_share"] == 1.0
    assert tiers["hbm"]["hit_blocks"] == len(keys) - ws


# ---------------------------------------------------------------- kv_fetch splicing


def _new_kv(i: int):
    from kvtier.schema import KVFetch, TierFetch, empty_tier

    return KVFetch(hbm=TierFetch(hit_blocks=list(range(i)), bytes_read=i * 7, read_ops=1,
                                 latency_us=i / 3, batch_size=i),
                   local_pool=empty_tier(), remote_pool=TierFetch(
                       hit_blocks=[i + 1], bytes_read=5, read_ops=1, latency_us=None, batch_size=1))


def test_splice_equals_reencoding(trace):
    """On msgspec-written lines the spliced line is byte for byte the re-encoded record."""
    from kvtier.sim.replay import splice_kv_fetch

    enc = msgspec.json.Encoder()
    lines = (trace / "trace_steps.jsonl").read_bytes().splitlines()
    for i, (line, rec) in enumerate(zip(lines, _records(trace), strict=True)):
        kv = _new_kv(i)
        rec.kv_fetch = kv
        assert splice_kv_fetch(line, enc.encode(kv)) == enc.encode(rec)


def test_splice_finds_the_field_not_lookalike_strings(trace):
    """``"kv_fetch"`` inside string values (escaped or as a whole value) is not the field; JSON
    whitespace around the field is kept as it was."""
    from kvtier.sim.replay import splice_kv_fetch

    enc = msgspec.json.Encoder()
    rec = _records(trace)[0]
    rec.dataset = "kv_fetch"
    rec.run_name = 'x"kv_fetch":{"hbm":{}}'
    pretty = json.dumps(json.loads(enc.encode(rec)), indent=1).replace("\n", " ").encode()
    for line in (enc.encode(rec), pretty):
        new = splice_kv_fetch(line, enc.encode(_new_kv(5)))
        got = msgspec.json.decode(new, type=TopkRecord)
        want = msgspec.json.decode(enc.encode(msgspec.structs.replace(rec, kv_fetch=_new_kv(5))),
                                   type=TopkRecord)  # empty tiers hold () until decoded
        assert got == want
        head = line[:line.index(b'"kv_fetch"', line.index(b'"tokens_per_touched_block"'))]
        assert new.startswith(head)
    assert splice_kv_fetch(b'{"dataset":"kv_fetch"}', b"{}") is None


def test_replay_copies_unchanged_bytes(trace, tmp_path):
    """Output lines are the input lines with only the kv_fetch value replaced (non-compact
    input stays non-compact), and decode to what the re-encoding path gives."""
    src = tmp_path / "pretty"
    src.mkdir()
    lines = (trace / "trace_steps.jsonl").read_bytes().splitlines()
    (src / "trace_steps.jsonl").write_bytes(
        b"".join(json.dumps(json.loads(x)).encode() + b"\n" for x in lines))
    for d in ("pretty_out", "compact_out"):
        inp = src if d == "pretty_out" else trace
        assert _replay(str(inp), "--out", str(tmp_path / d), "--hbm-blocks", "40") == 0
    a, b = _records(tmp_path / "pretty_out"), _records(tmp_path / "compact_out")
    assert a == b
    out_lines = (tmp_path / "pretty_out" / "trace_steps.jsonl").read_bytes().splitlines()
    in_lines = (src / "trace_steps.jsonl").read_bytes().splitlines()
    for x, y in zip(in_lines, out_lines, strict=True):
        cut = x.index(b'"kv_fetch": ')
        assert y[:cut] == x[:cut]
        assert y.endswith(x[x.index(b', "prefix": '):])


# ------------------------------------------------------ HBM capacity against the working set


def _working_set(trace: Path, bs: int = BS) -> int:
    return len(set(key_stream(trace, bs).tolist()))


def test_summary_and_output_give_hbm_as_a_share_of_the_working_set(trace, tmp_path, capsys):
    ws = _working_set(trace)
    out = tmp_path / "o"
    assert _replay(str(trace), "--out", str(out), "--hbm-blocks", "40") == 0
    printed = capsys.readouterr()
    tiers = _summary(out).tiers
    assert tiers["_totals"]["working_set_blocks"] == ws
    assert tiers["hbm"]["capacity_blocks"] == 40
    assert tiers["hbm"]["working_set_share"] == pytest.approx(40 / ws)
    assert f"HBM 40 blocks = {40 / ws:.1%} of the working set ({ws:,} blocks)" in printed.out
    assert "warning" not in printed.err
    # the preset's HBM (16 GiB) holds every block of a small trace: said, and how to change it
    big = tmp_path / "big"
    assert _replay(str(trace), "--out", str(big)) == 0
    printed = capsys.readouterr()
    cap = _summary(big).tiers["hbm"]["capacity_blocks"]
    assert cap > ws
    warning = printed.err.strip().splitlines()
    assert len(warning) == 1 and "warning" in warning[0] and "--hbm-blocks" in warning[0]
    assert f"HBM holds {cap / ws:,.0f}x the working set" in warning[0]  # a multiple past 10x


def test_hbm_blocks_takes_a_share_of_the_working_set(trace, tmp_path, capsys):
    ws = _working_set(trace)
    for text, want in (("25%", round(0.25 * ws)), ("0.5", round(0.5 * ws)), ("30", 30),
                       ("30blocks", 30), ("1k", 1024)):
        out = tmp_path / text
        assert _replay(str(trace), "--out", str(out), "--hbm-blocks", text) == 0
        assert _summary(out).tiers["hbm"]["capacity_blocks"] == want, text
        meta = json.loads((out / "trace_meta.json").read_text())
        assert str(meta["config"]["replay"]["hbm_blocks"]) == text
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # argparse: usage + one error line
        _replay(str(trace), "--out", str(tmp_path / "x"), "--hbm-blocks", "12x")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --hbm-blocks: capacity '12x'" in err and "25%" in err
    assert not (tmp_path / "x").exists()
    # the library call names the flag too, before writing anything
    from kvtier.sim.replay import ReplayError, ReplaySettings, replay

    with pytest.raises(ReplayError, match="--hbm-blocks: capacity '12x'"):
        replay(trace, tmp_path / "y", ReplaySettings(hbm_blocks="12x"))
    assert not (tmp_path / "y").exists()


def _sweep_hits(trace: Path, policy: str, caps: str, tmp_path: Path) -> dict[int, int]:
    import csv

    out = tmp_path / f"sweep_{policy}.csv"
    assert main(["sweep", str(trace), "--policies", policy, "--capacities", caps,
                 "--out", str(out), "--no-progress"]) == 0
    return {int(r["capacity_blocks"]): int(r["hits"]) for r in csv.DictReader(out.open())}


@pytest.mark.parametrize("policy", ["lru", "fifo", "belady", "dsa_aware"])
@pytest.mark.parametrize("preset", ["memfabric", "mooncake"])
def test_replay_hbm_hits_equal_sweep_with_on_release_keep(trace, tmp_path, policy, preset):
    """The documented equality (docs/TIERS.md): pools present, whole blocks, write-through,
    no prefetch, no shared prefixes, --on-release keep: HBM hits are the sweep's."""
    want = _sweep_hits(trace, policy, "5%,25%,50%,100%", tmp_path)
    for cap, hits in want.items():
        out = tmp_path / f"{preset}_{policy}_{cap}"
        assert _replay(str(trace), "--out", str(out), "--tiers", preset, "--policy", policy,
                       "--hbm-blocks", f"{cap}blocks", "--on-release", "keep") == 0
        assert _summary(out).tiers["hbm"]["hit_blocks"] == hits, (cap, policy)


def test_on_release_drop_equals_sweep_only_when_nothing_is_released_early(trace, tmp_path):
    """--on-release drop (the default) frees a finished request's blocks: on staggered
    requests LRU then hits more than the sweep (never less); with every request finishing in
    the last step, or an HBM holding the working set, the hits are equal."""
    ws = _working_set(trace)
    want = _sweep_hits(trace, "lru", "25%,50%,100%", tmp_path)
    got = {}
    for cap in want:
        out = tmp_path / f"drop{cap}"
        assert _replay(str(trace), "--out", str(out), "--hbm-blocks", f"{cap}blocks") == 0
        got[cap] = _summary(out).tiers["hbm"]["hit_blocks"]
    assert all(got[c] >= want[c] for c in want)
    assert got[ws] == want[ws]  # nothing evicted: only first reads miss
    assert any(got[c] > want[c] for c in want if c < ws)  # the difference is real here
    together = tmp_path / "together"
    write_trace(synth_stream(SynthConfig(requests=3, layers=3, steps=8, prompt_len=512,
                                         prompt_jitter=0, topk=64, block_size=BS, stagger=0,
                                         seed=4)), together)
    want = _sweep_hits(together, "lru", "10%,25%,50%", tmp_path)
    for cap, hits in want.items():
        out = tmp_path / f"together{cap}"
        assert _replay(str(together), "--out", str(out), "--hbm-blocks", f"{cap}blocks") == 0
        assert _summary(out).tiers["hbm"]["hit_blocks"] == hits


def test_hbm_backend_counts_its_block_accesses(trace, tmp_path, capsys):
    out = tmp_path / "hbm"
    assert _replay(str(trace), "--out", str(out), "--backend", "hbm") == 0
    n = sum(r.unique_blocks for r in _records(trace))
    assert f"{n} block accesses" in capsys.readouterr().out
