"""``kvtier run`` behind the argparse layer: flags -> workload -> model run or model-free
serving replay, with every expected failure turned into one ``RunError`` line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

#: the datasets ``kvtier run`` replays as a server would see them (arrivals, FIFO, batches)
SERVING_DATASETS = ("burstgpt", "mooncake", "azure")


class RunError(Exception):
    """An expected failure of ``kvtier run`` (missing dataset, bad flag or config)."""


def _csv_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def load_workload(args: argparse.Namespace) -> Any:
    """The ``Workload`` the flags name (local files only; never the network)."""
    from kvtier.runners import datasets as ds

    limit = args.limit or None
    data_dir = args.data_dir
    if args.dataset == "ruler":
        tgz = args.ruler_tgz
        path, name = None, "data_debug.tgz"
        if tgz is not None:
            if Path(tgz).exists():
                path = tgz
            else:
                name = tgz
        lengths = _csv_list(args.ruler_lengths)
        try:
            lens = [int(x) for x in lengths] if lengths else None
        except ValueError:
            raise RunError(f"--ruler-lengths: not a list of integers: {args.ruler_lengths!r}") from None
        return ds.load_ruler(path, limit, tgz_name=name, data_dir=data_dir,
                             tasks=_csv_list(args.ruler_tasks), lengths=lens, progress=True)  # fmt: skip
    if args.dataset == "longbench-v2":
        return ds.load_longbench_v2(args.lbv2_json or data_dir, limit, length=args.lbv2_length,
                                    template=args.lbv2_template, progress=True)  # fmt: skip
    if args.dataset == "sharegpt":
        return ds.load_sharegpt(args.sharegpt_json or data_dir, limit,
                                turn_mode=args.sharegpt_turn_mode, progress=True)  # fmt: skip
    if args.dataset == "burstgpt":
        return ds.load_burstgpt(args.burstgpt_csv or data_dir, limit,
                                model=args.burstgpt_model, progress=True)  # fmt: skip
    if args.dataset == "mooncake":
        return ds.load_mooncake(args.mooncake_jsonl or data_dir, limit, progress=True)
    if args.dataset == "azure":
        return ds.load_azure(args.azure_csv or data_dir, limit, progress=True)
    raise RunError(f"unknown dataset {args.dataset!r}")


#: dataset flags (default None) and the one dataset each belongs to
_DATASET_FLAGS = {
    "ruler_tgz": "ruler", "ruler_tasks": "ruler", "ruler_lengths": "ruler",
    "lbv2_json": "longbench-v2", "lbv2_length": "longbench-v2",
    "sharegpt_json": "sharegpt",
    "burstgpt_csv": "burstgpt", "burstgpt_model": "burstgpt",
    "mooncake_jsonl": "mooncake",
    "azure_csv": "azure",
}


def check_dataset_flags(args: argparse.Namespace) -> None:
    """A file flag of another dataset (``kvtier run burstgpt --mooncake-jsonl F``) would be
    ignored while the run looks for its own file: one line naming the right command."""
    for key, dataset in _DATASET_FLAGS.items():
        if getattr(args, key, None) is not None and args.dataset != dataset:
            flag = "--" + key.replace("_", "-")
            raise RunError(f"{flag} applies to kvtier run {dataset}, not {args.dataset}")


def _deprecated_arrivals(args: argparse.Namespace) -> None:
    """``burstgpt --arrivals mooncake|azure --arrivals-file F`` (the old spelling) becomes
    ``mooncake --mooncake-jsonl F`` / ``azure --azure-csv F``, with a note on stderr."""
    if args.arrivals == "burstgpt" and args.arrivals_file is None:
        return
    if args.dataset != "burstgpt":
        raise RunError("--arrivals/--arrivals-file apply to burstgpt only (and are deprecated: "
                       "use kvtier run mooncake --mooncake-jsonl FILE or kvtier run azure "
                       "--azure-csv FILE)")
    if args.arrivals == "burstgpt":
        raise RunError("--arrivals-file needs --arrivals mooncake|azure (deprecated: use "
                       "kvtier run mooncake --mooncake-jsonl FILE or kvtier run azure "
                       "--azure-csv FILE)")
    flag = "--mooncake-jsonl" if args.arrivals == "mooncake" else "--azure-csv"
    if args.arrivals_file is None and args.data_dir is None:
        raise RunError(f"--arrivals {args.arrivals} needs a file: kvtier run {args.arrivals} "
                       f"{flag} FILE")
    print(f"kvtier run: --arrivals is deprecated; running it as: kvtier run {args.arrivals} "
          f"{flag} {args.arrivals_file or '(from --data-dir)'}", file=sys.stderr)
    args.dataset = args.arrivals
    setattr(args, flag[2:].replace("-", "_"), args.arrivals_file)
    args.arrivals, args.arrivals_file = "burstgpt", None


#: what to try when a reason skipped every row
_SKIP_HINTS = {
    "prompt_too_long": "raise --max-seq-len or --max-prompt-tokens",
    "filtered_model": "no row has the --burstgpt-model value",
    "filtered_length": "no item has the --lbv2-length category",
    "invalid_json": "is the file JSON (an array or JSON Lines)?",
    "not_an_object": "is the file JSON (an array or JSON Lines)?",
    "bad_utf8": "the rows are not UTF-8 text (a binary or re-encoded file?)",
    "missing_field": "rows lack fields {name} needs: is it a {name} file?",
    "wrong_type": "fields have the wrong type: is it a {name} file?",
}


def nothing_to_run(workload: Any) -> RunError:
    """The error of a run that keeps no request: how many rows were read and every skip
    reason with its count (a run that keeps nothing must say why, loudly)."""
    file = workload.source.get("file") or workload.name
    skipped = Counter({k: v for k, v in workload.skipped.items() if v})
    total = sum(skipped.values())
    if not total:
        return RunError(f"no request to run: {file} has no rows")
    reasons = ", ".join(f"{k} {v}" for k, v in skipped.most_common())
    hints = [h.format(name=workload.name) for k, h in _SKIP_HINTS.items() if k in skipped]
    hint = f"; {'; '.join(dict.fromkeys(hints))}" if hints else ""
    return RunError(f"no request to run: all {total} rows read from {file} were skipped "
                    f"({reasons}){hint}; the reasons are listed in docs/WORKLOADS.md and "
                    "docs/RUNNERS.md; nothing was written")


def _out_dir(args: argparse.Namespace, dataset: str) -> Path:
    from kvtier.runners.run import default_out_dir

    return Path(args.trace_out) if args.trace_out else default_out_dir(dataset)


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse an output directory that holds an earlier run (its trace, summary.json,
    run_meta.json or serving_requests.jsonl) unless ``--force``: a model-free replay would
    otherwise overwrite a live run's summary, and a live run would find out only after the
    model has loaded."""
    from kvtier.runners.serving import SERVING_FILE
    from kvtier.trace.writer import existing_trace_files

    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"{out_dir} exists and is not a directory")
    old = existing_trace_files(out_dir) + [p for p in (out_dir / "run_meta.json",
                                                        out_dir / SERVING_FILE) if p.is_file()]
    if old and not force:
        raise RunError(f"{out_dir} already holds a run ({old[0].name}); use --force to "
                       "overwrite it or --trace-out another directory")


def _trace_settings(args: argparse.Namespace) -> Any:
    from kvtier.trace.settings import TraceSettings

    try:
        return TraceSettings.from_args(args)
    except (ValueError, msgspec.ValidationError) as exc:
        raise RunError(str(exc)) from None


def launch(args: argparse.Namespace, bundle: Any = None) -> int:
    """Run ``kvtier run`` for parsed ``args``; returns the exit status. ``bundle``: an
    already loaded model to use instead of ``--ckpt-path``/``--config`` (tests, the demo)."""
    from kvtier.runners.datasets import DatasetFormatError, DatasetNotFound

    if args.data_dir:
        os.environ["DATAS_DIR"] = str(Path(args.data_dir).expanduser())
    _deprecated_arrivals(args)
    check_dataset_flags(args)
    if args.model_free and args.dataset not in SERVING_DATASETS:
        raise RunError("--model-free applies to the serving replays only "
                       f"({', '.join(SERVING_DATASETS)})")
    settings = _trace_settings(args)
    check_backend_flags(args)
    cost = cost_model(args) if args.model_free else None  # refuse before reading the data
    try:
        workload = load_workload(args)
    except (DatasetNotFound, DatasetFormatError) as exc:
        raise RunError(str(exc)) from None
    except ValueError as exc:
        raise RunError(str(exc)) from None
    dataset = args.dataset
    out_dir = _out_dir(args, dataset)
    check_out_dir(out_dir, args.force)  # before the model loads, not after
    if cost is not None:
        return _model_free(args, workload, dataset, out_dir, cost)
    return _live(args, workload, dataset, out_dir, settings, bundle)


def _cli_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Every parsed flag (the full config for run_meta.json)."""
    return {k: v for k, v in sorted(vars(args).items()) if not callable(v)}


def check_backend_flags(args: argparse.Namespace) -> None:
    """Fail before the model loads on a bad --tiers/--policy (one line naming the flag)."""
    if args.backend != "sim":
        return
    from kvtier.policies.registry import PolicyNotFound, load_policy
    from kvtier.sim.tiers.config import load_tier_config
    from kvtier.sim.tiers.specs import eviction_factory, parse_spec

    try:
        load_tier_config(args.tiers)
        eviction_factory(args.policy)
        offline = getattr(load_policy(parse_spec(args.policy)[0]), "offline", False)
    except (ValueError, PolicyNotFound) as exc:
        raise RunError(f"--tiers/--policy: {exc}") from None
    if offline:
        raise RunError(f"--policy {args.policy}: an offline policy needs the future access "
                       "stream; record with --backend hbm, then kvtier replay the trace")  # fmt: skip


def _live(args: argparse.Namespace, workload: Any, dataset: str, out_dir: Path, settings: Any,
          bundle: Any = None) -> int:  # fmt: skip
    from kvtier.model.args import ConfigError
    from kvtier.model.tokenizer import TokenizerError
    from kvtier.runners.model_setup import load_model
    from kvtier.runners.run import RunOptions, execute

    opts = RunOptions(
        dataset=dataset, out_dir=out_dir, run_name=args.run_name or out_dir.name,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        max_prompt_tokens=args.max_prompt_tokens, limit=args.limit or None,
        temperature=args.temperature, seed=args.seed, backend=args.backend, tiers=args.tiers,
        policy=args.policy, hbm_blocks=args.hbm_blocks, force=args.force,
        serving=args.dataset in SERVING_DATASETS, time_scale=args.time_scale,
        warmup=not args.no_warmup, extra={"cli": _cli_flags(args)},
    )  # fmt: skip
    try:
        # filter before the model loads (seconds to minutes): the length filter needs only
        # the config's max_seq_len and the tokenizer
        if bundle is None:
            margs, tok = _model_args(args), _tokenizer(args.ckpt_path)
        else:
            margs, tok = bundle.args, bundle.tokenizer
        loaded_skips = Counter(workload.skipped)
        items = _admit(opts, workload, margs, tok)
        if not items:
            raise nothing_to_run(workload)
        if bundle is None:
            bundle = load_model(args.config, args.ckpt_path, device=args.device, seed=args.seed,
                                max_batch_size=args.batch_size, max_seq_len=args.max_seq_len)  # fmt: skip
            if (bundle.args.max_seq_len, bundle.args.vocab_size) != (margs.max_seq_len,
                                                                     margs.vocab_size):
                workload.skipped = loaded_skips  # the checkpoint changed the shape: refilter
                items = _admit(opts, workload, bundle.args, bundle.tokenizer)
                if not items:
                    raise nothing_to_run(workload)
    except (ConfigError, FileNotFoundError, ValueError, TokenizerError) as exc:
        raise RunError(str(exc)) from None
    if args.batch_size > bundle.args.max_batch_size:
        raise RunError(f"--batch-size {args.batch_size} exceeds the model's max_batch_size")
    try:
        res = execute(opts, workload, bundle, settings, items=items)
    except FileExistsError as exc:
        raise RunError(str(exc)) from None
    if bundle.rank == 0:
        _report(res.out_dir, res.summary, res.requests_done, res.new_tokens, res.skipped,
                res.wall_s, bundle.random_weights)  # fmt: skip
        if res.warmup_s is not None:
            print(f"warm-up: a throw-away traced prefill + decode step took {res.warmup_s:.3f} s "
                  "before the first batch (in no latency or trace record; --no-warmup to "
                  "measure it)")
        if res.summary is not None and res.summary.records == 0:
            _warn_no_records(res.requests_done, items, settings)
    return 0


def _warn_no_records(done: int, items: list, settings: Any) -> None:
    """A run that ran requests but recorded no decode step says why, on stderr."""
    if items and max(p.max_new_tokens for p in items) <= 1:
        why = ("every request's generation cap is 1 token (min(its own cap, "
               "--max-new-tokens)): the prompt forward makes that token, and only decode "
               "steps (from the 2nd token on) are traced")
    elif settings.sample_rate < 1:
        why = f"--trace-sample-rate {settings.sample_rate} sampled none of the decode steps"
    else:
        why = "no request reached a decode step"
    print(f"WARNING: 0 trace records for {done} requests: {why}", file=sys.stderr)


def _model_args(args: argparse.Namespace) -> Any:
    """The model config the run will load (``--config``, ``--max-seq-len``), from its json
    alone: no weights, no torch."""
    from kvtier.model.args import ModelArgs
    from kvtier.runners.model_setup import resolve_config

    over = {"max_seq_len": args.max_seq_len} if args.max_seq_len is not None else {}
    return ModelArgs.from_json(resolve_config(args.config, args.ckpt_path), **over)


def _tokenizer(ckpt_path: str | None) -> Any:
    from kvtier.model.tokenizer import Tokenizer

    return Tokenizer(ckpt_path)


def _admit(opts: Any, workload: Any, margs: Any, tok: Any) -> list:
    """Tokenize and length-filter the workload as the run will (``prepare``); the skips are
    added to ``workload.skipped``."""
    from kvtier.runners.prepare import prepare, prompt_budget

    budget = prompt_budget(margs.max_seq_len, opts.max_new_tokens, opts.max_prompt_tokens)
    return list(prepare(workload.requests, tok, max_prompt_tokens=budget,
                        max_new_tokens=opts.max_new_tokens, limit=opts.limit, seed=opts.seed,
                        bos_id=tok.bos_id, vocab_size=margs.vocab_size,
                        skipped=workload.skipped))  # fmt: skip


def _report(out_dir: Path, summary: Any, done: int, tokens: int, skipped: Counter, wall: float,
            random_weights: bool) -> None:  # fmt: skip
    skips = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
    print(f"{done} requests, {tokens} new tokens in {wall:.1f} s; skipped: {skips}")
    if summary is not None:
        print(f"{summary.records} trace records -> {out_dir}")
        if summary.serving is not None:
            lat = summary.serving.latency_ms
            if lat.p50 is not None:
                print(f"serving latency ms: p50 {lat.p50:.1f}  p95 {lat.p95:.1f}  "
                      f"p99 {lat.p99:.1f}  max {lat.max:.1f}")  # fmt: skip
    if random_weights:
        print("NOTE: seeded random weights (no --ckpt-path): selections are not DeepSeek's")


COST_FLAGS = ("--prefill-base-s", "--prefill-s-per-token", "--decode-base-s",
              "--decode-s-per-seq", "--decode-s-per-ctx-token")


def cost_model(args: argparse.Namespace) -> tuple[Any, dict]:
    """The model-free replay's step cost model: the cost flags, with the decode terms fitted
    to a recorded trace's step times under ``--cost-from-trace``, and how it was fitted
    (``{}`` without a trace). There is no default: with every term 0 each latency would be 0,
    so that is refused."""
    from kvtier.runners.serving_sim import StepCostModel, decode_samples_from_trace

    fit: dict = {}
    try:
        cost = StepCostModel(
            prefill_base_s=args.prefill_base_s, prefill_s_per_token=args.prefill_s_per_token,
            decode_base_s=args.decode_base_s, decode_s_per_seq=args.decode_s_per_seq,
            decode_s_per_ctx_token=args.decode_s_per_ctx_token,
        )  # fmt: skip
        if args.cost_from_trace:
            # the trace holds decode step times only; prefill terms stay as given
            samples = decode_samples_from_trace(args.cost_from_trace)
            if not samples:
                raise RunError(f"--cost-from-trace {args.cost_from_trace}: the trace has no "
                               "decode step with a measured latency to fit")
            if len(samples) > 1 and not _recorded_warm(args.cost_from_trace):
                # its first forward paid the process's one-time start-up costs
                first, samples = samples[0], samples[1:]
                median = sorted(s[2] for s in samples)[len(samples) // 2]
                print(f"--cost-from-trace: the trace was recorded without a warm-up; its first "
                      f"decode step ({first[2] * 1e3:.1f} ms, median {median * 1e3:.1f} ms) "
                      "is left out of the fit", file=sys.stderr)
                fit["dropped_first_step_s"] = first[2]
            fit["decode_samples"] = len(samples)
            fitted = StepCostModel.calibrate(decode=samples)
            decode = {k: v for k, v in fitted.to_dict().items() if k.startswith("decode")}
            cost = StepCostModel(**{**cost.to_dict(), **decode})
    except (ValueError, OSError) as exc:
        raise RunError(str(exc)) from None
    if not any(cost.to_dict().values()):
        raise RunError("--model-free needs a cost model, else every latency is 0: pass "
                       "--cost-from-trace DIR (decode costs fitted to a recorded trace) and/or "
                       f"the per-step costs {', '.join(COST_FLAGS)} (e.g. --decode-base-s "
                       "0.02 --prefill-s-per-token 2e-5)")
    return cost, fit


def _recorded_warm(trace: str) -> bool:
    """Whether the run that recorded ``trace`` warmed up before its first measured forward
    (``warmup_s`` in its run_meta.json; traces from before the warm-up have none)."""
    path = Path(trace)
    meta = (path if path.is_dir() else path.parent) / "run_meta.json"
    try:
        return json.loads(meta.read_text()).get("warmup_s") is not None
    except (OSError, ValueError, AttributeError):
        return False


def describe_cost(cost: Any) -> str:
    """The cost model in one line, as the replay uses it."""
    return (f"prefill {cost.prefill_base_s:g} s + {cost.prefill_s_per_token:g} s/token; decode "
            f"step {cost.decode_base_s:g} s + {cost.decode_s_per_seq:g} s/seq + "
            f"{cost.decode_s_per_ctx_token:g} s/context token")


def _model_free(args: argparse.Namespace, workload: Any, dataset: str, out_dir: Path,
                cost_fit: tuple[Any, dict]) -> int:  # fmt: skip
    """Serving replay in simpy virtual time from a step cost model; no model, no trace."""
    from kvtier.model.args import ConfigError
    from kvtier.runners.prepare import admit_length_only, prompt_budget
    from kvtier.runners.provenance import build_meta, write_meta
    from kvtier.runners.serving_sim import simulate
    from kvtier.trace.summary import SummaryBuilder, backend_sections
    from kvtier.trace.writer import prepare_out_dir, write_json_atomic

    cost, fit = cost_fit

    # the live run's filter: prompts over max_seq_len - max_new_tokens (of the --config
    # model) or --max-prompt-tokens are skipped, and the model's cache caps total_len
    try:
        margs = _model_args(args)
        budget = prompt_budget(margs.max_seq_len, args.max_new_tokens, args.max_prompt_tokens)
    except (ConfigError, ValueError) as exc:
        raise RunError(str(exc)) from None
    skipped: Counter = Counter(workload.skipped)
    requests = admit_length_only(workload.requests, max_prompt_tokens=budget,
                                 max_new_tokens=args.max_new_tokens, skipped=skipped)  # fmt: skip
    if not requests:
        workload.skipped = skipped
        raise nothing_to_run(workload)
    prepare_out_dir(out_dir, force=args.force)  # --force: an old trace goes, as live runs do
    config = {"mode": "model_free", "kv_block_size_tokens": _trace_settings(args).kv_block_size,
              "cli": _cli_flags(args), "cost_model": cost.to_dict(), "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "time_scale": args.time_scale,
              "limit": args.limit, "cost_from_trace": args.cost_from_trace,
              "max_prompt_tokens_effective": budget, "max_seq_len": margs.max_seq_len,
              "cost_fit": fit}  # fmt: skip
    hook, sections = None, {}
    if args.backend == "sim":
        hook = _synthetic_kv(args, requests, config)
    try:
        res = simulate(requests, cost, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, time_scale=args.time_scale,
                       extra_step_time=hook, on_finish=hook.release if hook else None,
                       max_seq_len=margs.max_seq_len, progress=True)  # fmt: skip
    except ValueError as exc:
        raise RunError(str(exc)) from None
    if hook is not None:
        sections = backend_sections(hook.backend.summary())
        config["kv_fetch_s_total"] = hook.total_us * 1e-6
    run_name = args.run_name or out_dir.name
    summary = SummaryBuilder(run_name, dataset, config).build(
        serving=res.serving(), skipped={k: int(v) for k, v in sorted(skipped.items())},
        **sections,
    )
    write_json_atomic(out_dir / "summary.json", summary)
    with open(out_dir / "serving_requests.jsonl", "wb") as fh:
        enc = msgspec.json.Encoder()
        for row in res.per_request():
            fh.write(enc.encode(row) + b"\n")
    _write_requests(out_dir, requests, res)
    meta = build_meta(config, workload.source, random_weights=False)
    meta.update(status="finished", model_free=True, requests_run=len(requests),
                skipped=dict(sorted(skipped.items())))  # fmt: skip
    write_meta(out_dir, meta)
    lat = summary.serving.latency_ms
    skips = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
    print(f"model-free replay of {len(requests)} requests in {res.batches} batches -> {out_dir}; "
          f"skipped: {skips}")
    fitted = f" (decode terms fitted to {args.cost_from_trace})" if args.cost_from_trace else ""
    print(f"cost model{fitted}: {describe_cost(cost)}")
    if lat.p50 is not None:
        print(f"latency ms: p50 {lat.p50:.1f}  p95 {lat.p95:.1f}  p99 {lat.p99:.1f}  "
              f"max {lat.max:.1f}")  # fmt: skip
    return 0


def _write_requests(out_dir: Path, requests: list, res: Any) -> None:
    """requests.jsonl of a model-free replay: one line per request, its integer id being its
    FIFO admission position (as ``serving_requests.jsonl`` and the backend number it)."""
    from kvtier.runners.requests import request_info
    from kvtier.runners.serving_sim import fifo_order
    from kvtier.trace.writer import RequestLog

    log = RequestLog(out_dir)
    try:
        log.write([{"request_id": k, **request_info(requests[i], int(res.gen_tokens[k])),
                    "prompt_len": int(res.prompt_len[k]), "batch": int(res.batch_index[k])}
                   for k, i in enumerate(fifo_order(requests).tolist())])
    finally:
        log.close()


def _synthetic_kv(args: argparse.Namespace, requests: list, config: dict) -> Any:
    """The ``--backend sim`` hook of the model-free replay: synthetic DSA-like selections of
    the ``--config`` model's shape, fetched through the tiered backend (runners/synthetic_kv)."""
    from kvtier.model.args import ConfigError, ModelArgs
    from kvtier.runners.model_setup import resolve_config
    from kvtier.runners.synthetic_kv import SelectionShape, SyntheticFetchTime
    from kvtier.sim.tiers.backend import TieredBackend
    from kvtier.sim.tiers.config import load_tier_config
    from kvtier.sim.tiers.recompute import load_model_dims
    from kvtier.trace.settings import TraceSettings

    try:
        path = resolve_config(args.config, args.ckpt_path)
        margs = ModelArgs.from_json(path)
    except ConfigError as exc:
        raise RunError(str(exc)) from None
    block = TraceSettings.from_args(args).kv_block_size
    over: dict[str, Any] = {"block_size": block}
    if args.kv_bytes_per_token:
        over["kv_bytes_per_token"] = args.kv_bytes_per_token
    cfg = load_tier_config(args.tiers, over)
    if args.hbm_blocks is not None:
        over["hbm"] = {"capacity_bytes": args.hbm_blocks * block * cfg.kv_bytes_per_token}
        cfg = load_tier_config(args.tiers, over)
    backend = TieredBackend(cfg, num_layers=margs.n_layers, eviction=args.policy,
                            model=load_model_dims(str(path)))  # fmt: skip
    caps = {r.request_id: min(r.max_new_tokens or args.max_new_tokens, args.max_new_tokens)
            for r in requests}  # fmt: skip
    shape = SelectionShape(topk=margs.index_topk)
    config.update(kv_selections="synthetic", model_config_file=str(path), backend="sim",
                  tiers=args.tiers, policy=args.policy, hbm_blocks=args.hbm_blocks,
                  kv_block_size=block, selection_shape=dataclasses.asdict(shape))  # fmt: skip
    from kvtier.runners.serving_sim import fifo_order

    ids = {requests[i].request_id: k for k, i in enumerate(fifo_order(requests).tolist())}
    return SyntheticFetchTime(backend, {r.request_id: r.prompt_len for r in requests}, caps,
                              margs.n_layers, block, shape, seed=args.seed, ids=ids)  # fmt: skip
