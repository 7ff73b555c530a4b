"""``kvtier run`` on real files as a new user meets them: filtering before the model loads,
runs that keep nothing, the Mooncake/Azure names, the serving log's one schema."""

from __future__ import annotations

import json

import pytest
from run_helpers import SHARED_DATA, demo_bundle

from kvtier.cli import build_parser
from kvtier.runners import launch

BURSTGPT = SHARED_DATA / "burstgpt" / "BurstGPT_1.head400.csv"
MOONCAKE = SHARED_DATA / "mooncake" / "synthetic_trace.jsonl"
AZURE = SHARED_DATA / "azure_llm" / "AzureLLMInferenceTrace_code.csv"


def _args(argv):
    return build_parser().parse_args(["run", *argv])


def test_requests_are_filtered_before_the_model_loads(tmp_path, monkeypatch):
    """Loading the weights takes seconds to minutes: the length filter (tokenizer and the
    config's max_seq_len only) runs first."""
    import kvtier.runners.model_setup as model_setup
    import kvtier.runners.prepare as prepare_mod

    events = []
    real_prepare, bundle = prepare_mod.prepare, demo_bundle()

    def prepare(*a, **k):
        events.append("prepare")
        return real_prepare(*a, **k)

    def load_model(*a, **k):
        events.append("load_model")
        return bundle

    monkeypatch.setattr(prepare_mod, "prepare", prepare)
    monkeypatch.setattr(model_setup, "load_model", load_model)
    csv = tmp_path / "b.csv"
    csv.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                   "5,ChatGPT,12,2,14,Conversation log\n")
    rc = launch.launch(_args(["burstgpt", "--burstgpt-csv", str(csv), "--trace-out",
                              str(tmp_path / "out"), "--max-new-tokens", "2"]))  # fmt: skip
    assert rc == 0
    assert events == ["prepare", "load_model"]


def _ruler_tree(tmp_path):
    d = tmp_path / "ruler" / "data" / "ruler" / "niah_single_1"
    d.mkdir(parents=True)
    row = {"index": 0, "input": "The sky is blue. " * 40, "outputs": ["7"], "length": 4096}
    (d / "validation_4096.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    return ["ruler", "--ruler-tgz", str(tmp_path / "ruler"), "--max-prompt-tokens", "20"]


def _lbv2(tmp_path):
    item = {"_id": "66f36490821e116aacb2cc22", "domain": "d", "sub_domain": "s",
            "difficulty": "easy", "length": "long", "question": "q?", "choice_A": "a",
            "choice_B": "b", "choice_C": "c", "choice_D": "d", "answer": "A", "context": "x"}
    p = tmp_path / "data.json"
    p.write_text(json.dumps([item]))
    return ["longbench-v2", "--lbv2-json", str(p), "--lbv2-length", "short"]


def _sharegpt(tmp_path):
    p = tmp_path / "sg.json"
    p.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": ""}]},
                             {"id": "b", "conversations": []}]))
    return ["sharegpt", "--sharegpt-json", str(p)]


def _burstgpt(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,0,0,0,Conversation log\n45,ChatGPT,0,0,0,Conversation log\n")
    return ["burstgpt", "--burstgpt-csv", str(p)]


@pytest.mark.parametrize(("make", "reasons", "extra"), [
    (_ruler_tree, "prompt_too_long 2", []),
    (_lbv2, "filtered_length 1", []),
    (_sharegpt, "empty_turn 1, empty_conversation 1", []),
    (_burstgpt, "failed_request 2", []),
    (_burstgpt, "failed_request 2", ["--model-free", "--decode-base-s", "0.01"]),
])  # fmt: skip
def test_a_run_that_keeps_nothing_fails_loudly(tmp_path, make, reasons, extra):
    """Every row skipped: one error line with each reason and its count, no output
    directory (it used to exit 0 with an empty trace and say nothing)."""
    argv = [*make(tmp_path), *extra]
    out = tmp_path / "out"
    with pytest.raises(launch.RunError, match=f"no request to run: all .*\\({reasons}\\)"):
        launch.launch(_args([*argv, "--trace-out", str(out)]), bundle=demo_bundle())
    assert not out.exists()


def test_keeps_nothing_exit_status_and_message(tmp_path, capsys):
    from kvtier.cli import main

    rc = main(["run", *_burstgpt(tmp_path), "--trace-out", str(tmp_path / "out"),
               "--model-free", "--decode-base-s", "0.01"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "no request to run: all 2 rows read from" in err and "failed_request 2" in err
    assert not (tmp_path / "out").exists()


def test_a_config_whose_vocab_misses_the_tokenizer_fails_before_loading(tmp_path, capsys,
                                                                         monkeypatch):
    """Text prompts through the DeepSeek tokenizer on the tiny config (vocab 1024): one error
    line naming vocab_size, exit 2, before the model loads (it used to be a traceback from
    inside generate, after the load and the warm-up)."""
    from kvtier.cli import main
    from kvtier.runners import model_setup

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model_setup, "load_model", no_load)
    p = tmp_path / "sg.json"
    p.write_text(json.dumps([{"id": "a", "conversations": [
        {"from": "human", "value": "Explain sparse attention in one sentence."}]}]))
    rc = main(["run", "sharegpt", "--sharegpt-json", str(p), "--config", "tiny",
               "--trace-out", str(tmp_path / "out"), "--max-new-tokens", "2"])
    err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]  # not the bar
    assert rc == 2 and len(err) == 1 and "kvtier run: error: vocab_size: the model config's " \
        "vocab_size 1024 does not cover the tokenizer" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not MOONCAKE.is_file(), reason="shared Mooncake trace absent")
def test_another_datasets_file_is_named_as_such(tmp_path):
    """The Mooncake trace passed as ShareGPT: every row lacks `conversations`."""
    with pytest.raises(launch.RunError, match=r"\(missing_field 3993\); rows lack fields "
                                              r"sharegpt needs: is it a sharegpt file\?"):
        launch.launch(_args(["sharegpt", "--sharegpt-json", str(MOONCAKE), "--trace-out",
                             str(tmp_path / "o")]), bundle=demo_bundle())  # fmt: skip


def test_an_empty_file_is_no_rows(tmp_path):
    p = tmp_path / "sg.json"
    p.write_text("[]")
    with pytest.raises(launch.RunError, match="sg.json has no rows"):
        launch.launch(_args(["sharegpt", "--sharegpt-json", str(p),
                             "--trace-out", str(tmp_path / "o")]), bundle=demo_bundle())


def test_requests_without_decode_steps_warn(tmp_path, capsys):
    csv = tmp_path / "b.csv"
    csv.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                   "5,ChatGPT,12,1,13,Conversation log\n")
    rc = launch.launch(_args(["burstgpt", "--burstgpt-csv", str(csv), "--trace-out",
                              str(tmp_path / "out")]), bundle=demo_bundle())  # fmt: skip
    assert rc == 0
    assert "WARNING: 0 trace records for 1 requests: every request's generation cap is 1" \
        in capsys.readouterr().err


@pytest.mark.skipif(not BURSTGPT.is_file(), reason="shared BurstGPT sample absent")
def test_model_free_refuses_to_run_without_a_cost_model(tmp_path):
    """All cost terms 0 gave all-zero latencies, silently."""
    out = tmp_path / "out"
    with pytest.raises(launch.RunError, match="needs a cost model.*--cost-from-trace DIR"):
        launch.launch(_args(["burstgpt", "--burstgpt-csv", str(BURSTGPT), "--model-free",
                             "--trace-out", str(out)]))  # fmt: skip
    assert not out.exists()
    empty = tmp_path / "empty_trace"
    empty.mkdir()
    (empty / "trace_steps.jsonl").write_text("")
    with pytest.raises(launch.RunError, match="no decode step with a measured latency"):
        launch.launch(_args(["burstgpt", "--burstgpt-csv", str(BURSTGPT), "--model-free",
                             "--cost-from-trace", str(empty), "--trace-out", str(out)]))
    assert not out.exists()


@pytest.mark.skipif(not BURSTGPT.is_file(), reason="shared BurstGPT sample absent")
def test_model_free_prints_its_cost_model(tmp_path, capsys):
    rc = launch.launch(_args(["burstgpt", "--burstgpt-csv", str(BURSTGPT), "--model-free",
                              "--limit", "20", "--decode-base-s", "0.02",
                              "--trace-out", str(tmp_path / "out")]))  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert ("cost model: prefill 0 s + 0 s/token; decode step 0.02 s + 0 s/seq + "
            "0 s/context token") in out
    skipped = json.loads((tmp_path / "out" / "summary.json").read_text())["skipped"]
    assert "skipped: " + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none") \
        in out


def test_live_and_model_free_admit_the_same_requests(tmp_path):
    """Model-free applied no context limit: a prompt longer than max_seq_len -
    max_new_tokens was simulated model-free but skipped live. Both now filter alike."""
    csv = tmp_path / "b.csv"
    csv.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                   "5,ChatGPT,10,2,12,Conversation log\n"
                   "6,ChatGPT,4050,2,4052,Conversation log\n"  # > 4096 - 64 (demo config)
                   "7,ChatGPT,12,3,15,Conversation log\n"
                   "8,ChatGPT,0,0,0,Conversation log\n")
    common = ["burstgpt", "--burstgpt-csv", str(csv), "--config", "demo", "--batch-size", "2"]
    live, free = tmp_path / "live", tmp_path / "free"
    assert launch.launch(_args([*common, "--trace-out", str(live)]), bundle=demo_bundle()) == 0
    assert launch.launch(_args([*common, "--trace-out", str(free), "--model-free",
                                "--decode-base-s", "0.01"])) == 0  # fmt: skip
    summaries = [json.loads((d / "summary.json").read_text()) for d in (live, free)]
    assert summaries[0]["skipped"] == summaries[1]["skipped"] == {"failed_request": 1,
                                                                  "prompt_too_long": 1}
    assert summaries[0]["serving"]["requests"] == summaries[1]["serving"]["requests"] == 2
    metas = [json.loads((d / "run_meta.json").read_text()) for d in (live, free)]
    assert (metas[0]["config"]["max_prompt_tokens_effective"]
            == metas[1]["config"]["max_prompt_tokens_effective"] == 4096 - 64)


def test_serving_requests_one_schema_live_and_model_free(tmp_path):
    """Live runs wrote queue_ms/latency_ms/prompt_tokens (ms), model-free wait_s/service_s/
    prompt_len (s): one schema and one unit (seconds) for both, the same rows on the same
    requests where the schedule does not depend on service times."""
    from kvtier.runners.serving import SERVING_FIELDS, SERVING_FILE

    csv = tmp_path / "b.csv"
    csv.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                   "5,ChatGPT,10,2,12,Conversation log\n5,GPT-4,14,3,17,Conversation log\n"
                   "5,ChatGPT,12,3,15,Conversation log\n")
    common = ["burstgpt", "--burstgpt-csv", str(csv), "--batch-size", "2", "--time-scale", "0"]
    live, free = tmp_path / "live", tmp_path / "free"
    assert launch.launch(_args([*common, "--trace-out", str(live)]), bundle=demo_bundle()) == 0
    assert launch.launch(_args([*common, "--trace-out", str(free), "--model-free",
                                "--decode-base-s", "0.01"])) == 0  # fmt: skip
    rows = {d.name: [json.loads(x) for x in (d / SERVING_FILE).read_text().splitlines()]
            for d in (live, free)}
    for got in rows.values():
        assert [list(r) for r in got] == [list(SERVING_FIELDS)] * 3
        for r in got:
            assert r["queue_s"] == pytest.approx(r["start_s"] - r["arrival_s"])
            assert r["service_s"] == pytest.approx(r["finish_s"] - r["start_s"])
            assert r["latency_s"] == pytest.approx(r["finish_s"] - r["arrival_s"])
    keys = ("arrival_s", "batch", "batch_size", "prompt_tokens", "max_new_tokens")
    assert [[r[k] for k in keys] for r in rows["live"]] == \
        [[r[k] for k in keys] for r in rows["free"]] == \
        [[0.0, 0, 2, 10, 2], [0.0, 0, 2, 14, 3], [0.0, 1, 1, 12, 3]]


@pytest.mark.parametrize("no_warmup", [False, True])
def test_warm_up_runs_before_the_serving_clock(tmp_path, monkeypatch, no_warmup):
    """The first forward's one-time costs (CUDA set-up on a GPU, the tracer's numba kernels
    everywhere) landed in the first request's latency and in the first step time
    --cost-from-trace fits: a throw-away traced forward now runs before the first measured
    batch, and nothing of it reaches the run's trace."""
    import kvtier.model.generate as gen_mod
    import kvtier.runners.run as run_mod

    events = []
    real_generate, real_replay = gen_mod.generate, run_mod.replay

    def generate(model, prompts, *a, tracer=None, **k):
        events.append((type(tracer).__name__, len(prompts)))
        return real_generate(model, prompts, *a, tracer=tracer, **k)

    def replay(*a, **k):
        events.append(("clock",))
        return real_replay(*a, **k)

    monkeypatch.setattr(gen_mod, "generate", generate)
    monkeypatch.setattr(run_mod, "replay", replay)
    csv = tmp_path / "b.csv"
    csv.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                   "5,ChatGPT,10,2,12,Conversation log\n5,GPT-4,14,3,17,Conversation log\n"
                   "9,ChatGPT,12,3,15,Conversation log\n")
    out = tmp_path / "out"
    argv = ["burstgpt", "--burstgpt-csv", str(csv), "--batch-size", "2", "--trace-out", str(out)]
    assert launch.launch(_args(argv + ["--no-warmup"] * no_warmup), bundle=demo_bundle()) == 0
    meta = json.loads((out / "run_meta.json").read_text())
    if no_warmup:
        assert events == [("clock",), ("CappedTracer", 2), ("CappedTracer", 1)]
        assert meta["warmup_s"] is None
    else:  # as many rows as the first batch, its own tracer, before the clock starts
        assert events == [("Tracer", 2), ("clock",), ("CappedTracer", 2), ("CappedTracer", 1)]
        assert meta["warmup_s"] > 0
        assert meta["config"]["warmup"] is True
    from kvtier.trace.validate import validate_trace

    report = validate_trace(out)
    assert report.ok, report.messages
    records = [json.loads(x) for x in (out / "trace_steps.jsonl").read_text().splitlines()]
    # 3 requests generating 2, 3 and 3 tokens: 1 + 2 + 2 decode steps in every layer
    assert len(records) == 5 * demo_bundle().args.n_layers
    assert {r["run_name"] for r in records} == {"out"}


def _step_trace(path, latencies_ms, warm):
    """Records of a batch-1 run, one per decode step (first layer only), with the HBM step
    time the tracer records; run_meta.json as a run with or without a warm-up writes it."""
    path.mkdir()
    lines = [json.dumps({"layer_id": 0, "step_idx": 100 + k, "seq_len_current": 101 + k,
                         "kv_fetch": {"hbm": {"latency_us": ms * 1e3, "batch_size": 1}}})
             for k, ms in enumerate(latencies_ms)]
    (path / "trace_steps.jsonl").write_text("\n".join(lines) + "\n")
    (path / "run_meta.json").write_text(json.dumps({"warmup_s": 0.4} if warm else {}))
    return path


@pytest.mark.skipif(not BURSTGPT.is_file(), reason="shared BurstGPT sample absent")
@pytest.mark.parametrize("warm", [False, True])
def test_cost_fit_leaves_out_a_cold_first_step(tmp_path, capsys, warm):
    """A trace recorded without a warm-up has its start-up cost in its first step (400 ms
    against 17 ms here): fitted as is, it triples the decode step cost."""
    trace = _step_trace(tmp_path / "t", [400.0] + [17.0] * 9, warm)
    out = tmp_path / "out"
    assert launch.launch(_args(["burstgpt", "--burstgpt-csv", str(BURSTGPT), "--limit", "5",
                                "--model-free", "--cost-from-trace", str(trace),
                                "--trace-out", str(out)])) == 0  # fmt: skip
    config = json.loads((out / "summary.json").read_text())["config"]
    err = capsys.readouterr().err
    c = config["cost_model"]
    one_row = c["decode_base_s"] + c["decode_s_per_seq"]  # a 1-row step (ctx term below)
    if warm:  # a warmed-up run's first step is a sample like any other
        assert config["cost_fit"] == {"decode_samples": 10}
        assert one_row == pytest.approx((0.4 + 9 * 0.017) / 10)
    else:
        assert "recorded without a warm-up; its first decode step (400.0 ms" in err
        assert config["cost_fit"] == {"dropped_first_step_s": pytest.approx(0.4),
                                      "decode_samples": 9}
        assert one_row == pytest.approx(0.017)
        assert c["decode_s_per_ctx_token"] == pytest.approx(0, abs=1e-12)


def test_run_help_lists_mooncake_and_azure(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    assert "{ruler,longbench-v2,sharegpt,burstgpt,mooncake,azure}" in text
    assert "--mooncake-jsonl FILE" in text and "--azure-csv FILE" in text


@pytest.mark.skipif(not MOONCAKE.is_file(), reason="shared Mooncake trace absent")
def test_mooncake_live_serving_replay(tmp_path):
    """The first 30 real rows; only the short prompts fit --max-prompt-tokens 64."""
    rows = MOONCAKE.read_text().splitlines()[:30]
    short = sum(json.loads(r)["input_length"] <= 64 for r in rows)
    part = tmp_path / "mooncake30.jsonl"
    part.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    rc = launch.launch(_args(["mooncake", "--mooncake-jsonl", str(part), "--trace-out", str(out),
                              "--max-new-tokens", "2", "--max-prompt-tokens", "64",
                              "--time-scale", "0", "--batch-size", "4"]),
                       bundle=demo_bundle())  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "mooncake" and short == 7
    assert summary["skipped"] == {"prompt_too_long": 30 - short}
    assert summary["serving"]["requests"] == short and summary["records"] > 0
    served = (out / "serving_requests.jsonl").read_text().splitlines()
    assert sorted(json.loads(r)["prompt_tokens"] for r in served) == sorted(
        json.loads(r)["input_length"] for r in rows if json.loads(r)["input_length"] <= 64)


@pytest.mark.skipif(not AZURE.is_file(), reason="shared Azure trace absent")
def test_deprecated_arrivals_spelling_still_runs(tmp_path, capsys):
    common = ["--limit", "100", "--model-free", "--decode-base-s", "0.01", "--batch-size", "4"]
    new, old = tmp_path / "new", tmp_path / "old"
    assert launch.launch(_args(["azure", "--azure-csv", str(AZURE), "--trace-out", str(new),
                                *common])) == 0  # fmt: skip
    assert launch.launch(_args(["burstgpt", "--arrivals", "azure", "--arrivals-file",
                                str(AZURE), "--trace-out", str(old), *common])) == 0
    assert "--arrivals is deprecated; running it as: kvtier run azure --azure-csv" \
        in capsys.readouterr().err
    a, b = (json.loads((d / "summary.json").read_text()) for d in (new, old))
    assert a["dataset"] == b["dataset"] == "azure"
    assert a["serving"] == b["serving"] and a["skipped"] == b["skipped"]
    assert a["serving"]["requests"] + sum(a["skipped"].values()) == 100
    assert (new / "serving_requests.jsonl").read_text() == \
        (old / "serving_requests.jsonl").read_text()


@pytest.mark.skipif(not BURSTGPT.is_file(), reason="shared BurstGPT sample absent")
def test_an_earlier_run_is_never_overwritten_without_force(tmp_path, monkeypatch):
    """A model-free replay wrote over whatever summary.json and serving_requests.jsonl the
    directory held (a live run's included); a live run found the old trace only after the
    model had loaded."""
    import kvtier.runners.model_setup as model_setup

    out = tmp_path / "out"
    free = ["burstgpt", "--burstgpt-csv", str(BURSTGPT), "--limit", "10", "--model-free",
            "--decode-base-s", "0.01", "--trace-out", str(out)]
    assert launch.launch(_args(free)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(launch.RunError, match="already holds a run .*use --force"):
        launch.launch(_args([*free, "--decode-base-s", "0.5"]))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(model_setup, "load_model", no_model)
    with pytest.raises(launch.RunError, match="already holds a run"):
        launch.launch(_args(["burstgpt", "--burstgpt-csv", str(BURSTGPT), "--limit", "10",
                             "--trace-out", str(out)]))  # fmt: skip
    assert launch.launch(_args([*free, "--decode-base-s", "0.5", "--force"])) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["cost_model"][
        "decode_base_s"] == 0.5
