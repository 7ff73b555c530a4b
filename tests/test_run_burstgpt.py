"""``kvtier run burstgpt``: the live serving replay on the tiny model, end to end."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from run_helpers import SHARED_DATA, check_run, demo_bundle, run_cli
from spec52 import check_summary

from kvtier.schema import PERCENTILE_METHOD

# the v2.0 8-column layout (Session ID / Elapsed time inserted at positions 2-3)
CSV_8COL = """\
Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type
10.0,s1,1.5,ChatGPT,12,3,15,Conversation log
10.0,s2,2.0,GPT-4,9,1,10,Conversation log
11.0,,0.0,ChatGPT,0,0,0,API log
12.0,s3,1.0,ChatGPT,500,4,504,Conversation log
12.5,s4,1.0,ChatGPT,abc,4,4,Conversation log
13.0,s5,0.5,GPT-4,7,2,9,Conversation log
"""


def test_burstgpt_serving_replay(tmp_path):
    csv = tmp_path / "burst.csv"
    csv.write_text(CSV_8COL)
    out = tmp_path / "out"
    rc = run_cli(["burstgpt", "--burstgpt-csv", str(csv), "--trace-out", str(out),
                  "--max-new-tokens", "3", "--max-prompt-tokens", "64", "--batch-size", "2",
                  "--time-scale", "0"])  # fmt: skip
    assert rc == 0
    summary, meta, records = check_run(out, "burstgpt", "lzzmm/BurstGPT")
    # loader skips (failed, non-numeric) + the runner's length skip, per reason
    assert summary.skipped == {"failed_request": 1, "non_numeric": 1, "prompt_too_long": 1}
    # synthetic prompts of exactly `Request tokens`; cap = min(Response tokens, 3): a request
    # generating g tokens is decoded g-1 times, in every layer
    layers = demo_bundle().args.n_layers
    per_req = Counter(r["sample_id"] for r in records)
    lens = {r["sample_id"]: r["seq_len_current"] - r["step_idx"] for r in records}
    # burstgpt-1 asks for 1 token: its prompt forward makes it, so it has no decode records
    assert dict(per_req) == {"burstgpt-0": (3 - 1) * layers, "burstgpt-5": (2 - 1) * layers}
    first_step = {}
    for r in records:
        first_step.setdefault(r["sample_id"], r["step_idx"])
    assert first_step["burstgpt-0"] == 12 and first_step["burstgpt-5"] == 7
    assert all(v == 1 for v in lens.values())
    # serving section: every kept request served, percentiles of the per-request log
    rows = [json.loads(x) for x in (out / "serving_requests.jsonl").read_text().splitlines()]
    assert summary.serving.requests == len(rows) == 3
    assert summary.serving.batch_size == 2 and summary.serving.max_new_tokens_cap == 3
    lat = np.array([r["latency_s"] for r in rows]) * 1e3  # the summary is in ms
    p50, p95, p99 = np.percentile(lat, [50, 95, 99], method=PERCENTILE_METHOD)
    assert summary.serving.latency_ms.p50 == pytest.approx(p50)
    assert summary.serving.latency_ms.p99 == pytest.approx(p99)
    assert summary.serving.latency_ms.max == pytest.approx(lat.max())
    # time scale 0: all arrive at once; FIFO batches of 2, then 1; latency = wait + service
    assert [r["sample_id"] for r in rows] == ["burstgpt-0", "burstgpt-1", "burstgpt-5"]
    assert [r["batch_size"] for r in rows] == [2, 2, 1]
    assert [r["batch"] for r in rows] == [0, 0, 1]
    for r in rows:
        assert r["arrival_s"] == 0.0
        assert r["latency_s"] == pytest.approx(r["queue_s"] + (r["finish_s"] - r["start_s"]))
        assert r["service_s"] == pytest.approx(r["finish_s"] - r["start_s"])
    assert rows[2]["start_s"] == pytest.approx(rows[0]["finish_s"])
    assert meta["config"]["serving"] is True and meta["requests_run"] == 3


def test_burstgpt_model_free_on_the_real_sample(tmp_path):
    sample = SHARED_DATA / "burstgpt" / "BurstGPT_1.head400.csv"
    if not sample.is_file():
        pytest.skip("shared BurstGPT sample not present")
    out = tmp_path / "free"
    rc = run_cli(["burstgpt", "--burstgpt-csv", str(sample), "--trace-out", str(out),
                  "--limit", "0", "--model-free", "--batch-size", "4", "--max-new-tokens", "64",
                  "--decode-base-s", "0.02", "--prefill-s-per-token", "1e-5"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    # 17 of the 400 sample rows are failed (0/0) requests
    assert summary["skipped"] == {"failed_request": 17}
    assert summary["serving"]["requests"] == 383
    assert summary["records"] == 0
    assert check_summary(summary) == []  # §5.3, serving included
    reqs = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert [r["request_id"] for r in reqs] == list(range(383))
    served = [json.loads(x) for x in (out / "serving_requests.jsonl").read_text().splitlines()]
    assert [(r["request_id"], r["sample_id"]) for r in served] == \
        [(r["request_id"], r["sample_id"]) for r in reqs]
    assert all(r["sample_id"].startswith("burstgpt-") and "arrival_s" in r for r in reqs)
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["model_free"] is True and meta["dataset"]["sha256"]


@pytest.mark.parametrize(("arrivals", "flag", "rel", "rows"), [
    ("mooncake", "--mooncake-jsonl", "mooncake/synthetic_trace.jsonl", 3993),
    ("azure", "--azure-csv", "azure_llm/AzureLLMInferenceTrace_code.csv", 8819),
])  # fmt: skip
def test_model_free_other_arrival_processes(tmp_path, arrivals, flag, rel, rows):
    trace = SHARED_DATA / rel
    if not trace.is_file():
        pytest.skip(f"shared {arrivals} sample not present")
    out = tmp_path / arrivals
    rc = run_cli([arrivals, flag, str(trace), "--config", "671B_v3.2",
                  "--trace-out", str(out), "--limit", "0", "--model-free", "--batch-size", "8",
                  "--decode-base-s", "0.01", "--time-scale", "0.5"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == arrivals
    assert summary["serving"]["requests"] + sum(summary["skipped"].values()) == rows
    assert summary["serving"]["batch_size"] == 8
    lat = summary["serving"]["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]


def test_model_free_sim_adds_fetch_time_to_service(tmp_path):
    sample = SHARED_DATA / "burstgpt" / "BurstGPT_1.head400.csv"
    if not sample.is_file():
        pytest.skip("shared BurstGPT sample not present")
    common = ["burstgpt", "--burstgpt-csv", str(sample), "--limit", "30", "--model-free",
              "--batch-size", "4", "--decode-base-s", "0.01", "--max-new-tokens", "16"]  # fmt: skip
    assert run_cli([*common, "--trace-out", str(tmp_path / "hbm")]) == 0
    assert run_cli([*common, "--trace-out", str(tmp_path / "sim"), "--backend", "sim",
                    "--hbm-blocks", "256"]) == 0  # fmt: skip
    rows = {}
    for name in ("hbm", "sim"):
        lines = (tmp_path / name / "serving_requests.jsonl").read_text().splitlines()
        rows[name] = {r["sample_id"]: r for r in map(json.loads, lines)}
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["config"]["kv_selections"] == "synthetic"
    tiers = summary["tiers"]
    assert tiers["local_pool"]["hit_blocks"] > 0
    # arrivals are seconds apart and a batch takes < 1 s, so nothing queues: each batch's
    # service grows by exactly the pool fetch time of its decode steps
    per_batch = {}
    for rid, r in rows["sim"].items():
        h = rows["hbm"][rid]
        assert r["batch"] == h["batch"] and r["queue_s"] == pytest.approx(h["queue_s"])
        assert r["service_s"] >= h["service_s"]
        per_batch[r["batch"]] = r["service_s"] - h["service_s"]
    assert sum(per_batch.values()) == pytest.approx(summary["config"]["kv_fetch_s_total"])
    assert summary["config"]["kv_fetch_s_total"] > 0
