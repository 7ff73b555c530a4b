"""``kvtier run`` behind the argparse layer: flags -> workload -> model run or model-free
serving replay, with every expected failure turned into one ``RunError`` line."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec


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
        if args.arrivals == "burstgpt":
            return ds.load_burstgpt(args.burstgpt_csv or data_dir, limit,
                                    model=args.burstgpt_model, progress=True)  # fmt: skip
        if args.arrivals_file is None and data_dir is None:
            raise RunError(f"--arrivals {args.arrivals} needs --arrivals-file FILE")
        loader = ds.load_mooncake if args.arrivals == "mooncake" else ds.load_azure
        return loader(args.arrivals_file or data_dir, limit, progress=True)
    raise RunError(f"unknown dataset {args.dataset!r}")


def _out_dir(args: argparse.Namespace, dataset: str) -> Path:
    from kvtier.runners.run import default_out_dir

    return Path(args.trace_out) if args.trace_out else default_out_dir(dataset)


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
    if args.dataset != "burstgpt" and (args.model_free or args.arrivals != "burstgpt"):
        raise RunError("--model-free and --arrivals apply to the burstgpt serving replay only")
    settings = _trace_settings(args)
    check_backend_flags(args)
    try:
        workload = load_workload(args)
    except (DatasetNotFound, DatasetFormatError) as exc:
        raise RunError(str(exc)) from None
    except ValueError as exc:
        raise RunError(str(exc)) from None
    dataset = workload.name if args.dataset == "burstgpt" else args.dataset
    out_dir = _out_dir(args, dataset)
    if args.model_free:
        return _model_free(args, workload, dataset, out_dir)
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
        serving=args.dataset == "burstgpt", time_scale=args.time_scale,
        extra={"cli": _cli_flags(args)},
    )  # fmt: skip
    try:
        if bundle is None:
            bundle = load_model(args.config, args.ckpt_path, device=args.device, seed=args.seed,
                                max_batch_size=args.batch_size, max_seq_len=args.max_seq_len)  # fmt: skip
    except (ConfigError, FileNotFoundError, ValueError, TokenizerError) as exc:
        raise RunError(str(exc)) from None
    if args.batch_size > bundle.args.max_batch_size:
        raise RunError(f"--batch-size {args.batch_size} exceeds the model's max_batch_size")
    try:
        res = execute(opts, workload, bundle, settings)
    except FileExistsError as exc:
        raise RunError(str(exc)) from None
    if bundle.rank == 0:
        _report(res.out_dir, res.summary, res.requests_done, res.new_tokens, res.skipped,
                res.wall_s, bundle.random_weights)  # fmt: skip
    return 0


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


def _model_free(args: argparse.Namespace, workload: Any, dataset: str, out_dir: Path) -> int:
    """Serving replay in simpy virtual time from a step cost model; no model, no trace."""
    from kvtier.runners.provenance import build_meta, write_meta
    from kvtier.runners.serving_sim import StepCostModel, decode_samples_from_trace, simulate
    from kvtier.trace.summary import SummaryBuilder, backend_sections
    from kvtier.trace.writer import write_json_atomic

    try:
        cost = StepCostModel(
            prefill_base_s=args.prefill_base_s, prefill_s_per_token=args.prefill_s_per_token,
            decode_base_s=args.decode_base_s, decode_s_per_seq=args.decode_s_per_seq,
            decode_s_per_ctx_token=args.decode_s_per_ctx_token,
        )  # fmt: skip
        if args.cost_from_trace:
            # the trace holds decode step times only; prefill terms stay as given
            fitted = StepCostModel.calibrate(decode=decode_samples_from_trace(args.cost_from_trace))
            decode = {k: v for k, v in fitted.to_dict().items() if k.startswith("decode")}
            cost = StepCostModel(**{**cost.to_dict(), **decode})
    except (ValueError, OSError) as exc:
        raise RunError(str(exc)) from None
    skipped: Counter = Counter(workload.skipped)
    requests = []
    for req in workload.requests:
        if req.prompt_len is None:
            skipped["no_prompt_len"] += 1
        elif args.max_prompt_tokens is not None and req.prompt_len > args.max_prompt_tokens:
            skipped["prompt_too_long"] += 1
        else:
            requests.append(req)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"mode": "model_free", "kv_block_size_tokens": _trace_settings(args).kv_block_size,
              "cli": _cli_flags(args), "cost_model": cost.to_dict(), "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "time_scale": args.time_scale,
              "limit": args.limit, "cost_from_trace": args.cost_from_trace}  # fmt: skip
    hook, sections = None, {}
    if args.backend == "sim":
        hook = _synthetic_kv(args, requests, config)
    try:
        res = simulate(requests, cost, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, time_scale=args.time_scale,
                       extra_step_time=hook, on_finish=hook.release if hook else None,
                       progress=True)  # fmt: skip
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
    print(f"model-free replay of {len(requests)} requests in {res.batches} batches -> {out_dir}")
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
