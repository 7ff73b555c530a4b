"""``kvtier.analysis.analyze`` against the per-record reference (tests/analysis_ref.py) on random
traces, both kernel sets, several settings and seeds; plus traces whose answers are known by
construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
from analysis_ref import reference_analysis
from analysis_traces import (
    distinct_trace,
    random_trace,
    record,
    sliding_window_trace,
    write_records,
)

from kvtier.analysis.analyze import AnalysisError, AnalysisSettings, analyze
from kvtier.analysis.kernels import NUMPY, numba_kernels
from kvtier.sim.tiers.config import load_tier_config
from kvtier.trace.reader import SkippedLinesWarning

# the random traces hold bad lines on purpose; the tests check analyze's counts of them
pytestmark = pytest.mark.filterwarnings(f"ignore::{SkippedLinesWarning.__module__}."
                                        f"{SkippedLinesWarning.__name__}")

KERNELS = [pytest.param(NUMPY, id="numpy")]
if numba_kernels() is not None:
    KERNELS.append(pytest.param(numba_kernels(), id="numba"))


def assert_same(fast, ref, path="$"):
    """Every field of ``ref`` equals ``fast`` (floats to 1e-9 relative)."""
    if isinstance(ref, dict):
        assert isinstance(fast, dict), path
        for k, v in ref.items():
            assert k in fast, f"{path}.{k} missing"
            assert_same(fast[k], v, f"{path}.{k}")
    elif isinstance(ref, list):
        assert isinstance(fast, list) and len(fast) == len(ref), (
            f"{path}: length {len(fast) if isinstance(fast, list) else fast} != {len(ref)}")
        for i, (a, b) in enumerate(zip(fast, ref, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(ref, float) or isinstance(fast, float):
        assert fast is not None and ref is not None, f"{path}: {fast} != {ref}"
        assert math.isclose(fast, ref, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {fast} != {ref}"
    else:
        assert fast == ref, f"{path}: {fast!r} != {ref!r}"


def run_both(trace, kern, **kw):
    s = AnalysisSettings(shared_samples=0, **kw).check()
    fast = analyze(trace, s, kern=kern)
    ref = reference_analysis(trace, s, load_tier_config(s.tiers), fast["kv_bytes_per_token"])
    return fast, ref


SETTINGS = [
    {},
    {"block_sizes": (3, 16, 64), "lru_caps": (1, 2, 5, 17, 40), "ws_windows": (1, 2, 3, 7)},
    {"key_mode": "request", "lru_caps": (3, 30), "recent_token_windows": (8, 64)},
    {"step_union": True, "block_sizes": (8, 32), "lru_caps": (4, 50)},
    {"step_union": True, "key_mode": "request", "max_steps_per_stream": 3},
    {"max_steps_per_stream": 4, "reuse_cap_steps": 2, "recent_block_windows": (1, 2)},
]


@pytest.mark.parametrize("kern", KERNELS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("new_form", [True, False], ids=["design-note", "count-form"])
def test_equals_reference_on_random_traces(tmp_path, kern, seed, new_form):
    trace = random_trace(tmp_path / "t", seed, new_form=new_form)
    for kw in SETTINGS:
        fast, ref = run_both(trace, kern, **kw)
        assert fast["records_analyzed"] > 50
        assert_same(fast, ref, f"settings={kw}")
    assert fast["skipped"] == {"truncated_final_line": 0, "malformed_json": 2,
                               "invalid_record": 0, "missing_field": 1, "empty_selection": 1,
                               "invalid": 1, "max_steps_per_stream": fast["skipped"][
                                   "max_steps_per_stream"]}


@pytest.mark.parametrize("kern", KERNELS)
def test_equals_reference_with_long_streams_and_small_chunks(tmp_path, kern, monkeypatch):
    """Chunks of a few records: state carries across chunk boundaries (tables grow and move,
    the union's open steps, rings of working sets); long streams wrap the rings."""
    from kvtier.analysis import source

    monkeypatch.setattr(source, "JSONL_CHUNK_BYTES", 4096)
    trace = random_trace(tmp_path / "t", 7, requests=3, layers=2, steps=90, k=24, prompt=600)
    for kw in ({"ws_windows": (1, 4, 16, 64), "lru_caps": (3, 9, 27)},
               {"step_union": True, "ws_windows": (2, 5)}):
        fast, ref = run_both(trace, kern, **kw)
        assert_same(fast, ref, f"settings={kw}")


def test_kernel_sets_agree_on_the_big_defaults(tmp_path):
    if numba_kernels() is None:
        pytest.skip("numba not installed (extra `fast`)")
    trace = random_trace(tmp_path / "t", 3, requests=6, layers=5, steps=16, k=300, prompt=2000)
    s = AnalysisSettings(block_sizes=(1, 16, 64, 100)).check()
    a = analyze(trace, s, kern=NUMPY)
    b = analyze(trace, s, kern=numba_kernels())
    for x in (a, b):
        x.pop("seconds"), x.pop("kernels")
    assert_same(a, b)


# -- known by construction ----------------------------------------------------------------------


def result(trace, **kw):
    return analyze(trace, AnalysisSettings(shared_samples=0, **kw))


def test_sliding_window(tmp_path):
    """Every step selects the last 64 tokens (4 blocks of 16 when aligned, 5 otherwise)."""
    W, steps, prompt, bs = 64, 20, 300, 16
    trace = sliding_window_trace(tmp_path / "t", window=W, steps=steps, prompt=prompt, bs=bs)
    r = result(trace, recent_token_windows=(31, 63, 64), recent_block_windows=(2, 4),
               ws_windows=(1, 2, 3))
    res = r["results"][0]
    sets = []
    for s in range(steps):
        seq = prompt + s + 1
        sets.append(set(range((seq - W) // bs, (seq - 1) // bs + 1)))
    jac = [len(a & b) / len(a | b) for a, b in zip(sets, sets[1:], strict=False)]
    tl = res["temporal_locality"]
    assert tl["step_jaccard"]["count"] == 2 * (steps - 1)
    assert tl["step_jaccard"]["mean"] == pytest.approx(np.mean(jac))
    assert tl["step_jaccard"]["min"] == pytest.approx(min(jac))
    # every reuse is one step back (the window slides one token per step); first touches are
    # the first set plus one new block each time the window crosses into one
    new_blocks = len(sets[0]) + sum(len(b - a) for a, b in zip(sets, sets[1:], strict=False))
    assert tl["first_touch_blocks"] == 2 * new_blocks
    assert tl["reuse_distance_hist_steps"] == {"1": 2 * (sum(map(len, sets)) - new_blocks)}
    assert tl["reuse_distance_cdf_steps"] == [{"reuse_distance_steps": 1, "cdf": 1.0}]
    rl = res["record_stats"]["recent_locality"]
    assert rl["recent_token_ratio"]["31"]["mean"] == pytest.approx(32 / 64)
    assert rl["recent_token_ratio"]["63"]["mean"] == 1.0
    assert rl["recent_token_ratio"]["64"]["min"] == 1.0
    # cur_block - b <= w: all but the oldest block when the window spans 5 blocks
    ratios = [sum(1 for b in bl if (prompt + s) // bs - b <= 2) / len(bl)
              for s, bl in enumerate(sets)]
    assert rl["recent_block_ratio"]["2"]["mean"] == pytest.approx(np.mean(ratios))
    assert rl["recent_block_ratio"]["4"]["mean"] == 1.0
    ws = res["working_set"]
    for w in (1, 2, 3):
        exp = [len(set().union(*sets[max(0, s - w + 1):s + 1])) for s in range(steps)]
        assert ws[str(w)]["mean"] == pytest.approx(np.mean(exp))
        assert ws[str(w)]["max"] == max(exp)
    # tokens per block, density
    assert res["record_stats"]["block_density"]["min"] == 1.0
    assert res["record_stats"]["tokens_per_block_mean"]["mean"] == pytest.approx(
        np.mean([W / len(b) for b in sets]))
    # both layers select the same blocks: IoU 1 for every layer pair
    iou = res["cross_layer_overlap"]["iou"]
    assert iou["count"] == steps and iou["min"] == iou["max"] == 1.0


def test_identical_selection_across_layers_gives_iou_one(tmp_path):
    rng = np.random.default_rng(5)
    recs = []
    for s in range(6):
        seq = 500 + s
        pos = np.sort(rng.choice(seq, 40, replace=False)).tolist()
        recs += [record(r, lv, seq - 1, seq, pos, 16) for lv in range(5) for r in range(2)]
    res = result(write_records(tmp_path / "t", recs, 16))["results"][0]
    pairs = res["cross_layer_overlap"]["by_layer_pair"]
    assert [p["layers"] for p in pairs] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert all(p["min"] == p["max"] == 1.0 and p["count"] == 12 for p in pairs)


def test_all_distinct_selections_only_cold_misses(tmp_path):
    """No block is ever read twice: OPT = LRU = cold misses, per stream and shared."""
    res = result(distinct_trace(tmp_path / "t"), lru_caps=(1, 4, 64))["results"][0]
    sc = res["shared_cache"]
    assert sc["exact"] and sc["working_set_blocks"] == sc["accesses"]
    assert set(sc["lru_miss_ratio"]) == {1.0} and set(sc["opt_miss_ratio"]) == {1.0}
    for c in res["cache_sim"].values():
        assert c["hits"] == 0 and c["hit_rate"] == 0.0
    tl = res["temporal_locality"]
    assert tl["reuse_samples"] == 0 and tl["first_touch_blocks"] == sc["accesses"]


def test_one_block_and_uniform_blocks_are_the_concentration_extremes(tmp_path):
    bs = 16
    one = [record(0, 0, 99 + s, 100 + s, list(range(32, 48)), bs) for s in range(4)]  # block 2
    uni = [record(0, 0, 99 + s, 100 + s, [b * bs + 3 for b in range(6)], bs) for s in range(4)]
    skew = [record(0, 0, 99, 100, list(range(16)) + [20, 40, 60], bs)]  # counts 16, 1, 1, 1
    full1 = result(write_records(tmp_path / "one", one, bs), lru_caps=(1, 2))["results"][0]
    r1 = full1["record_stats"]
    # the one block is the most recent at every later read: a hit at every capacity
    assert [c["hits"] for c in full1["cache_sim"].values()] == [3, 3]
    r2 = result(write_records(tmp_path / "uni", uni, bs))["results"][0]["record_stats"]
    r3 = result(write_records(tmp_path / "skew", skew, bs))["results"][0]["record_stats"]
    bc1, bc2, bc3 = (r["block_concentration"] for r in (r1, r2, r3))
    assert bc1["normalized_entropy"]["max"] == 0.0 and bc1["gini"]["max"] == 0.0  # defined: 0
    assert r1["unique_blocks"]["max"] == 1 and r1["tokens_per_block_mean"]["min"] == 16
    assert bc2["normalized_entropy"]["min"] == pytest.approx(1.0)
    assert bc2["gini"]["max"] == pytest.approx(0.0, abs=1e-12)
    xs = [1, 1, 1, 16]  # sorted counts
    g = 2 * sum(i * x for i, x in enumerate(xs, 1)) / (4 * 19) - 5 / 4
    p = np.array(xs) / 19
    assert bc3["gini"]["mean"] == pytest.approx(g)
    assert bc3["normalized_entropy"]["mean"] == pytest.approx(-(p * np.log(p)).sum() / np.log(4))


def test_rebucketing_equals_direct_computation(tmp_path):
    """A trace recorded at 16-token blocks analysed at 4, 48 and 128 equals the direct
    count of distinct pos // B per record."""
    rng = np.random.default_rng(11)
    recs, direct = [], {4: [], 48: [], 128: []}
    for s in range(10):
        seq = 3000 + s
        pos = np.sort(rng.choice(seq, 200, replace=False))
        recs.append(record(0, 0, seq - 1, seq, pos.tolist(), 16))
        for b in direct:
            direct[b].append(len(set((pos // b).tolist())))
    r = result(write_records(tmp_path / "t", recs, 16), block_sizes=(4, 48, 128))
    for res in r["results"]:
        ub = res["record_stats"]["unique_blocks"]
        b = res["block_size_tokens"]
        assert ub["mean"] == pytest.approx(np.mean(direct[b]))
        assert ub["min"] == min(direct[b]) and ub["max"] == max(direct[b])
        assert res["read_amplification"]["ratio"] == pytest.approx(sum(direct[b]) * b / 2000)
    amp = {row["block_size_tokens"]: row for row in r["read_amplification"]["by_block_size"]}
    for b in (1, 4, 128):
        pos_all = [rr["selected_token_pos"] for rr in recs]
        u = sum(len({p // b for p in pos}) for pos in pos_all)
        assert amp[b]["ratio"] == pytest.approx(u * b / 2000)
    assert amp[1]["ratio"] == 1.0


def test_shared_cache_sampling_is_the_exact_analysis_of_the_sample(tmp_path):
    """With sampling, the curves are those of the kept keys (every access of a kept key),
    at capacities scaled by the rate; and close to the exact curve."""
    trace = random_trace(tmp_path / "t", 4, requests=6, layers=4, steps=20, k=120, prompt=1500)
    exact = analyze(trace, AnalysisSettings(shared_samples=0))["results"][0]["shared_cache"]
    samp = analyze(trace, AnalysisSettings(shared_samples=2000))["results"][0]["shared_cache"]
    assert exact["exact"] and not samp["exact"]
    assert samp["sampled_accesses"] <= 2000 and samp["accesses"] == exact["accesses"]
    assert samp["sample_rate"] < 1.0
    grid = np.array(exact["capacity_blocks"])
    approx = np.interp(grid, samp["capacity_blocks"], samp["lru_miss_ratio"])
    assert np.abs(approx - np.array(exact["lru_miss_ratio"])).mean() < 0.1


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(AnalysisError, match="no such trace"):
        analyze(tmp_path / "missing")
    d = write_records(tmp_path / "empty", [], 16)
    with pytest.raises(AnalysisError, match="no record could be analysed"):
        analyze(d)
    d2 = write_records(tmp_path / "bad", [], 16, extra_lines=[(0, "{oops")])
    with pytest.raises(AnalysisError, match="not records: malformed_json 1;"):
        analyze(d2)
    with pytest.raises(AnalysisError, match="--key-mode"):
        analyze(d, AnalysisSettings(key_mode="layer"))
    with pytest.raises(AnalysisError, match="--ws-windows"):
        analyze(d, AnalysisSettings(ws_windows=(0, 4)))
