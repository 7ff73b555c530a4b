"""Model-free serving replay: a hand-computed case, a plain reference simulator, FIFO order,
batch limits, the cost model's calibration and the extra-step-time hook."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from kvtier.runners.datasets import load_burstgpt, load_mooncake
from kvtier.runners.requests import Request
from kvtier.runners.serving_sim import (
    StepCostModel,
    decode_samples_from_trace,
    simulate,
)

DATA = Path(__file__).parents[2] / "shared" / "data"


def req(rid, arrival, prompt, gen=None):
    return Request(request_id=rid, prompt_len=prompt, max_new_tokens=gen, arrival_s=arrival)


def test_hand_computed_case():
    cost = StepCostModel(prefill_s_per_token=0.01, decode_base_s=0.1)
    reqs = [req("A", 0.0, 10, 3), req("B", 0.05, 20, 1), req("C", 0.06, 5, 2),
            req("D", 5.0, 10, None)]
    res = simulate(reqs, cost, batch_size=2, max_new_tokens=4, engine="per_request")
    # A alone: prefill 0.1 + 2 decode steps 0.2 -> done 0.3. B+C at 0.3: prefill 0.25;
    # B (1 token) done 0.55, C one step later 0.65. D (cap 4) at 5.0: 0.1 + 3 x 0.1.
    assert res.request_ids == ["A", "B", "C", "D"]
    assert res.batch_index.tolist() == [0, 1, 1, 2]
    assert res.gen_tokens.tolist() == [3, 1, 2, 4]
    np.testing.assert_allclose(res.queue_s, [0.0, 0.25, 0.24, 0.0], atol=1e-12)
    np.testing.assert_allclose(res.service_s, [0.3, 0.25, 0.35, 0.4], atol=1e-12)
    np.testing.assert_allclose(res.latency_s, [0.3, 0.5, 0.59, 0.4], atol=1e-12)
    s = res.serving()
    assert (s.requests, s.batch_size, s.max_new_tokens_cap) == (4, 2, 4)
    # sorted latencies 300, 400, 500, 590 ms; linear interpolation between closest ranks
    assert s.latency_ms.p50 == pytest.approx(450.0)
    assert s.latency_ms.p95 == pytest.approx(500 + 0.85 * 90)
    assert s.latency_ms.p99 == pytest.approx(500 + 0.97 * 90)
    assert s.latency_ms.max == pytest.approx(590.0)
    assert res.per_request()[2]["latency_s"] == pytest.approx(0.59)


def serve_per_request(p, g, ids, cost, extra):
    """Finish offsets of one batch, per-request engine, one decode step at a time."""
    clock = cost.prefill_base_s + cost.prefill_s_per_token * sum(p)
    left = [max(x - 1, 0) for x in g]
    done = [clock if n == 0 else None for n in left]
    step = 0
    while any(left):
        active = [j for j in range(len(p)) if left[j] > 0]
        dt = (cost.decode_base_s + cost.decode_s_per_seq * len(active)
              + cost.decode_s_per_ctx_token * sum(p[j] + step + 1 for j in active))
        if extra is not None:
            dt += extra([ids[j] for j in active], step)
        clock += dt
        for j in active:
            left[j] -= 1
            if left[j] == 0:
                done[j] = clock
        step += 1
    return done


def serve_generate_py(p, g, ids, cost, extra, max_seq_len=None):
    """Finish offsets of one batch, written as generate.py's loop (no EOS)."""
    rows = len(p)
    total_len = max(p) + max(g)
    if max_seq_len is not None:
        total_len = min(total_len, max_seq_len)
    clock, prev_pos, step = 0.0, 0, 0
    for cur_pos in range(min(p), total_len):
        if prev_pos == 0:  # prefill of tokens[:, 0:min(p)]
            clock += cost.prefill_base_s + cost.prefill_s_per_token * rows * cur_pos
        else:
            clock += (cost.decode_base_s + cost.decode_s_per_seq * rows
                      + cost.decode_s_per_ctx_token * rows * (prev_pos + 1))
            active = [ids[j] for j in range(rows)
                      if p[j] <= prev_pos and prev_pos - p[j] < g[j] - 1]
            if extra is not None and active:
                clock += extra(active, step)
            step += 1
        prev_pos = cur_pos
    if prev_pos == 0:  # no forward at all: the prefill is still paid
        clock += cost.prefill_base_s + cost.prefill_s_per_token * rows * min(p)
    return [clock] * rows


def reference(reqs, cost, batch_size, cap, time_scale=1.0, extra=None, engine="per_request"):
    """Straightforward event loop with per-step Python arithmetic."""
    order = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s)
    arr = [reqs[i].arrival_s for i in order]
    arr = [(a - arr[0]) * time_scale for a in arr]
    p = [reqs[i].prompt_len for i in order]
    g = [min(reqs[i].max_new_tokens, cap) if reqs[i].max_new_tokens is not None else cap
         for i in order]
    ids = [reqs[i].request_id for i in order]
    serve = serve_per_request if engine == "per_request" else serve_generate_py
    start, finish, batch_no = [0.0] * len(order), [0.0] * len(order), [0] * len(order)
    t, i, q, b = 0.0, 0, deque(), 0
    while i < len(order) or q:
        if not q:
            t = max(t, arr[i])
        while i < len(order) and arr[i] <= t:
            q.append(i)
            i += 1
        batch = [q.popleft() for _ in range(min(batch_size, len(q)))]
        done = serve([p[j] for j in batch], [g[j] for j in batch], [ids[j] for j in batch],
                     cost, extra)
        for j, d in zip(batch, done, strict=True):
            start[j], finish[j], batch_no[j] = t, t + d, b
        t += max(done)
        b += 1
    return ids, start, finish, batch_no


def test_reference_engine_hand_computed():
    cost = StepCostModel(prefill_s_per_token=0.01, decode_base_s=0.1, decode_s_per_seq=0.01,
                         decode_s_per_ctx_token=0.001)
    calls = []
    res = simulate([req("A", 0.0, 3, 2), req("B", 0.0, 5, 1)], cost, batch_size=2,
                   max_new_tokens=8, extra_step_time=lambda ids, k: calls.append((ids, k)) or 0)
    # prefill 3 tokens x 2 rows = 0.06; forwards at positions 3, 4, 5 (total_len 5 + 2):
    # 0.1 + 0.02 + 0.001 x 2 x (4, 5, 6); only A decodes (at position 3), B is teacher-forced
    assert res.service_s.tolist() == pytest.approx([0.45, 0.45])
    assert calls == [(["A"], 0)]
    capped = simulate([req("A", 0.0, 3, 2), req("B", 0.0, 5, 1)], cost, batch_size=2,
                      max_new_tokens=8, max_seq_len=6)
    assert capped.service_s.tolist() == pytest.approx([0.06 + 0.128 + 0.13] * 2)
    assert serve_generate_py([3, 5], [2, 1], ["A", "B"], cost, None, 6) == pytest.approx(
        capped.service_s.tolist())


@pytest.mark.parametrize("hook", [True, False])  # per-step numpy path / closed forms
@pytest.mark.parametrize("engine", ["reference", "per_request"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_matches_reference_on_random_traces(seed, batch_size, engine, hook):
    rng = np.random.default_rng(seed)
    n = 60
    arrivals = np.sort(rng.integers(0, 40, n)).astype(float)  # integer seconds: many ties
    reqs = [req(f"r{i}", float(arrivals[i]), int(rng.integers(1, 300)),
                int(rng.integers(0, 50))) for i in range(n)]
    reqs = [reqs[i] for i in rng.permutation(n)]  # input order must not matter but for ties
    cost = StepCostModel(prefill_base_s=0.01, prefill_s_per_token=1e-4, decode_base_s=0.02,
                         decode_s_per_seq=3e-3, decode_s_per_ctx_token=2e-6)

    def extra(ids, step):
        return 1e-3 * len(ids) + 1e-4 * step

    extra = extra if hook else None

    for time_scale in (1.0, 0.25):
        res = simulate(reqs, cost, batch_size=batch_size, max_new_tokens=32,
                       time_scale=time_scale, extra_step_time=extra, engine=engine)
        ids, start, finish, batch_no = reference(reqs, cost, batch_size, 32, time_scale, extra,
                                                 engine)
        assert res.request_ids == ids
        np.testing.assert_allclose(res.start_s, start, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(res.finish_s, finish, rtol=1e-9, atol=1e-9)
        assert res.batch_index.tolist() == batch_no


def test_fifo_and_batch_limits():
    reqs = [req(f"r{i}", 0.0, 100, 5) for i in range(10)]  # all at once, in input order
    res = simulate(reqs, StepCostModel(decode_base_s=1.0), batch_size=4, max_new_tokens=8,
                   time_scale=0, engine="per_request")
    assert res.request_ids == [f"r{i}" for i in range(10)]
    assert res.batch_index.tolist() == [0] * 4 + [1] * 4 + [2] * 2
    assert np.all(np.diff(res.start_s) >= 0)
    np.testing.assert_allclose(res.start_s, [0] * 4 + [4] * 4 + [8] * 2)
    np.testing.assert_allclose(res.latency_s, [4] * 4 + [8] * 4 + [12] * 2)


def test_hook_calls_and_finish_order():
    calls, finished = [], []
    reqs = [req("long", 0.0, 10, 4), req("short", 0.0, 10, 2), req("one", 0.0, 10, 1)]
    res = simulate(reqs, StepCostModel(decode_base_s=0.5), batch_size=3, max_new_tokens=10,
                   extra_step_time=lambda ids, step: calls.append((list(ids), step)) or 0.25,
                   on_finish=finished.append, engine="per_request")
    assert calls == [(["long", "short"], 0), (["long"], 1), (["long"], 2)]
    assert finished == ["one", "short", "long"]
    np.testing.assert_allclose(res.service_s, [2.25, 0.75, 0.0])
    with pytest.raises(ValueError, match="extra_step_time"):
        simulate(reqs, StepCostModel(), batch_size=3, max_new_tokens=10,
                 extra_step_time=lambda ids, step: -1.0)


def test_empty_and_invalid_config():
    s = simulate([], StepCostModel(), batch_size=1, max_new_tokens=1).serving()
    assert s.requests == 0 and s.latency_ms.p50 is None and s.latency_ms.max is None
    ok = [req("a", 0.0, 1, 1)]
    for kwargs, field in [({"batch_size": 0}, "batch_size"), ({"max_new_tokens": -1},
                          "max_new_tokens"), ({"time_scale": -1.0}, "time_scale"),
                          ({"engine": "vllm"}, "engine"), ({"max_seq_len": 0}, "max_seq_len")]:
        args = {"batch_size": 1, "max_new_tokens": 1, **kwargs}
        with pytest.raises(ValueError, match=field):
            simulate(ok, StepCostModel(), **args)
    with pytest.raises(ValueError, match="prompt_len"):
        simulate([Request("t", prompt="text", arrival_s=0.0)], StepCostModel(), batch_size=1,
                 max_new_tokens=1)
    with pytest.raises(ValueError, match="arrival_s"):
        simulate([req("a", None, 1)], StepCostModel(), batch_size=1, max_new_tokens=1)
    with pytest.raises(ValueError, match="decode_base_s"):
        StepCostModel(decode_base_s=-1)
    with pytest.raises(ValueError, match="decode_per_step"):
        StepCostModel.from_dict({"decode_per_step": 1})


def test_calibrate_recovers_coefficients():
    true = StepCostModel(prefill_base_s=0.003, prefill_s_per_token=2e-5, decode_base_s=0.01,
                         decode_s_per_seq=4e-4, decode_s_per_ctx_token=3e-8)
    rng = np.random.default_rng(0)
    pre = [(n, true.prefill_time(np.array([n]))) for n in rng.integers(10, 5000, 20)]
    dec = [(b, c, float(true.decode_step_times(b, c)))
           for b, c in zip(rng.integers(1, 16, 30), rng.integers(100, 100000, 30), strict=True)]
    fit = StepCostModel.calibrate(pre, dec)
    for k, v in true.to_dict().items():
        assert getattr(fit, k) == pytest.approx(v, rel=1e-6), k
    # a fit that would go negative is clamped to the best non-negative one
    neg = StepCostModel.calibrate(decode=[(1, 0, 1.0), (2, 0, 0.5), (3, 0, 0.0)])
    assert min(neg.to_dict().values()) >= 0
    assert StepCostModel.calibrate() == StepCostModel()


def test_decode_samples_from_trace(tmp_path):
    def rec(layer, step, seq, lat, bs):
        tier = {"hit_blocks": 1, "bytes_read": 1, "read_ops": 1, "latency_us": lat,
                "batch_size": bs}
        return json.dumps({"event": "dsa_topk", "layer_id": layer, "step_idx": step,
                           "seq_len_current": seq, "request_id": "x",
                           "kv_fetch": {"hbm": tier}})
    lines = [rec(0, 0, 100, 500.0, 2), rec(0, 0, 50, 500.0, 2), rec(1, 0, 100, 500.0, 2),
             rec(1, 0, 50, 500.0, 2), rec(0, 1, 101, 800.0, 1), rec(0, 2, 102, None, 1)]
    (tmp_path / "trace_steps.jsonl").write_text("\n".join(lines) + "\n")
    assert sorted(decode_samples_from_trace(tmp_path)) == [(1, 101, 0.0008), (2, 150, 0.0005)]


@pytest.mark.skipif(not (DATA / "burstgpt").is_dir() or not (DATA / "mooncake").is_dir(),
                    reason="shared/data samples absent")
def test_whole_real_traces_replay():
    cost = StepCostModel(prefill_s_per_token=1e-5, decode_base_s=0.02, decode_s_per_seq=1e-3)
    for wl, engine in ((load_burstgpt(DATA / "burstgpt"), "reference"),
                       (load_burstgpt(DATA / "burstgpt"), "per_request"),
                       (load_mooncake(DATA / "mooncake"), "reference"),
                       (load_mooncake(DATA / "mooncake"), "per_request")):
        res = simulate(wl.requests, cost, batch_size=8, max_new_tokens=128, engine=engine)
        assert res.serving().requests == len(wl.requests) > 0
        assert np.all(res.queue_s >= -1e-9) and np.all(res.service_s > 0)
        assert np.all(np.bincount(res.batch_index) <= 8)
        assert np.all(np.diff(res.start_s) >= 0)  # FIFO: served in arrival order
