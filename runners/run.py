"""The common run loop: a loaded ``Workload`` -> tokenized, length-filtered requests ->
``generate`` with the tracer -> ``trace_steps.jsonl`` + ``summary.json`` + ``run_meta.json``.

Offline datasets (RULER, LongBench v2, ShareGPT) run in FIFO batches; BurstGPT runs as a
live serving replay (``serving.py``). Requests get the trace's integer ids (0, 1, 2, ... in
admission order); what identifies each in its dataset goes to ``requests.jsonl``. Ctrl-C stops after the current forward: the tracer is
closed, so the trace and the summary describe the same records, and run_meta.json says the
run was interrupted; the KeyboardInterrupt then propagates (exit 130).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvtier.runners.model_setup import ModelBundle, kv_bytes_per_token
from kvtier.runners.prepare import Prepared, batches, prepare, prompt_budget
from kvtier.runners.provenance import build_meta, utc_now, write_meta
from kvtier.runners.requests import Workload, request_info
from kvtier.runners.serving import SERVING_FILE, CompletedLog, replay, serving_section
from kvtier.schema import Summary


@dataclass(slots=True)
class RunOptions:
    """Everything a run needs besides the workload and the model (all of it lands in
    run_meta.json's ``config``)."""

    dataset: str
    out_dir: Path
    run_name: str
    max_new_tokens: int = 64
    batch_size: int = 1
    max_prompt_tokens: int | None = None
    limit: int | None = 64
    temperature: float = 0.0
    seed: int = 0
    backend: str = "hbm"
    tiers: str | None = None
    policy: str = "lru"
    hbm_blocks: int | None = None
    force: bool = False
    serving: bool = False
    time_scale: float = 1.0
    warmup: bool = True  # one untraced forward pass before the first batch (``warm_up``)
    extra: dict = field(default_factory=dict)  # CLI flags not listed above

    def to_config(self) -> dict[str, Any]:
        cfg = asdict(self)
        cfg["out_dir"] = str(self.out_dir)
        return cfg


@dataclass(slots=True)
class RunResult:
    out_dir: Path
    summary: Summary | None
    requests_done: int
    new_tokens: int
    skipped: Counter
    wall_s: float
    warmup_s: float | None = None  # the untraced warm-up, kept out of every measurement


def default_out_dir(dataset: str, root: Path | str = "outputs") -> Path:
    """``outputs/<dataset>_<UTC timestamp>`` (dataset name made path-safe)."""
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    return Path(root) / f"{dataset.replace('-', '_')}_{stamp}"


class CappedTracer:
    """Forwards to the tracer but marks a row inactive once it has produced its own
    ``max_new_tokens``: ``generate`` takes one cap per batch, BurstGPT has one per request.

    Row i with prompt length L and cap N is decoded at start_pos L .. L+N-2 (the first new
    token comes from the prompt forward), exactly what ``generate`` traces for a lone prompt.
    """

    def __init__(self, inner: Any, prompt_lens: Sequence[int], caps: Sequence[int],
                 info: Sequence[dict] | None = None) -> None:
        self.inner = inner
        self.last_pos = [p + c - 2 for p, c in zip(prompt_lens, caps, strict=True)]
        self.info = info  # per request: its dataset identity, for requests.jsonl

    def begin_batch(self, request_ids, prompt_tokens) -> None:
        self.inner.begin_batch(request_ids, prompt_tokens, self.info)

    def start_step(self, start_pos: int, active: list[bool]) -> None:
        self.inner.start_step(start_pos, [a and start_pos <= last for a, last in zip(active, self.last_pos, strict=True)])

    def on_topk(self, layer_id, indices, scores) -> None:
        self.inner.on_topk(layer_id, indices, scores)

    def end_step(self, wall_s: float) -> None:
        self.inner.end_step(wall_s)

    def end_batch(self) -> None:
        self.inner.end_batch()


class FetchTimer:
    """Wraps a KV backend and adds up the time the pool tiers take to serve fetches.

    Per (step, layer) the batch's rows are fetched together and the pool tiers are read
    concurrently (they contend only where they share a link, which the emulator already
    models), so the step waits for the slowest pool read: the backend's own stall when it
    reports one (``TieredBackend.stall_total``), else ``max`` over rows and pool tiers of
    ``latency_us``. HBM latency is the measured forward itself and is not added again.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.total_us = 0.0

    def admit(self, request_id, prompt_len, prefix_hashes=()) -> None:
        self.inner.admit(request_id, prompt_len, prefix_hashes)

    def append(self, request_id, n_tokens=1) -> None:
        self.inner.append(request_id, n_tokens)

    def release(self, request_id) -> None:
        self.inner.release(request_id)

    def summary(self):
        return self.inner.summary()

    def fetch(self, access):
        before = getattr(self.inner, "stall_total", None)
        out = self.inner.fetch(access)
        if before is not None:
            self.total_us += self.inner.stall_total - before
            return out
        worst = 0.0
        for f in out:
            worst = max(worst, f.local_pool.latency_us or 0.0, f.remote_pool.latency_us or 0.0)
        self.total_us += worst
        return out

    def take_us(self) -> float:
        """Pool fetch time accumulated since the last call."""
        t, self.total_us = self.total_us, 0.0
        return t

    def __getattr__(self, name: str) -> Any:  # anything else the tracer asks the backend
        return getattr(self.inner, name)


def warm_up(model: Any, items: Sequence[Prepared], batch_size: int, eos_id: int,
            settings: Any, kvb: int, rank: int = 0, world_size: int = 1) -> float:
    """One throw-away traced ``generate`` (a prefill and one decode step) on the first prompt,
    as many rows as the first batch, before anything is measured; returns its seconds.
    ``kvb``: KV bytes per token (the throw-away HBM backend's).

    The first forward of a process pays one-time costs: CUDA context, kernel loading,
    cuBLAS/Triton set-up and allocator growth on the GPU (hundreds of ms against a ~17 ms
    decode step), and on every device the tracer's first decode step (its numba kernels
    load or compile: ~0.4 s on the 2-core dev box against a ~25 ms step). Measured inside
    the first batch they land in the first request's latency, in everything queued behind
    it and in the first step time ``--cost-from-trace`` fits. The warm-up traces into a
    temporary directory with an HBM-only backend, so the run's trace and backend never see
    it; it is greedy (the sampling RNG is not advanced) and the KV caches it writes are
    overwritten by the next ``generate``.
    """
    import tempfile

    import msgspec

    from kvtier.backend import HBMOnlyBackend
    from kvtier.model.generate import generate
    from kvtier.trace.tracer import Tracer

    rows = [items[0].tokens] * max(1, min(batch_size, len(items)))
    settings = msgspec.structs.replace(settings, sample_rate=1.0)  # trace its one step
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvtier-warmup-") as tmp:
        tracer = Tracer(settings, tmp, run_name="warmup", dataset="warmup",
                        backend=HBMOnlyBackend(kvb), rank=rank, world_size=world_size,
                        kv_bytes_per_token=kvb)  # fmt: skip
        try:
            generate(model, rows, 2, eos_id, temperature=0.0, tracer=tracer,
                     request_ids=list(range(len(rows))), sync_cuda=settings.sync_cuda)  # fmt: skip
        finally:
            tracer.close()
    if settings.sync_cuda:
        _cuda_sync(model)
    return time.perf_counter() - t0


def _cuda_sync(model: Any) -> None:
    import torch

    param = next(iter(model.parameters()), None)
    if param is not None and param.is_cuda:
        torch.cuda.synchronize(param.device)


def execute(opts: RunOptions, workload: Workload, bundle: ModelBundle, trace_settings: Any,
            items: list[Prepared] | None = None) -> RunResult:  # fmt: skip
    """Run ``workload`` through ``bundle.model`` with tracing; see the module docstring.

    ``items``: the workload already through ``prepare`` (its skips counted in
    ``workload.skipped``), so a caller can filter before it loads the model."""
    from kvtier.model.generate import generate
    from kvtier.trace.tracer import Tracer

    out_dir = Path(opts.out_dir)
    args = bundle.args
    max_prompt = prompt_budget(args.max_seq_len, opts.max_new_tokens, opts.max_prompt_tokens)
    skipped: Counter = Counter(workload.skipped)
    backend = make_backend(opts, bundle, trace_settings)
    timer = FetchTimer(backend) if opts.backend == "sim" else None
    # the tracer refuses a directory holding an old trace (unless --force) before anything
    # of ours is written there
    tracer = Tracer(
        trace_settings, out_dir, run_name=opts.run_name, dataset=opts.dataset,
        backend=timer or backend, rank=bundle.rank, world_size=bundle.world_size,
        kv_bytes_per_token=getattr(backend, "kvb", None) or getattr(backend, "kv_bytes_per_token", None),
        config={"run": opts.to_config(), "random_weights": bundle.random_weights},
        force=opts.force,
    )  # fmt: skip
    meta = build_meta(
        {**opts.to_config(), "max_prompt_tokens_effective": max_prompt,
         "model_config_file": str(bundle.config_path), "model": args.to_dict(),
         "device": bundle.device, "trace": trace_settings.to_dict()},
        workload.source, random_weights=bundle.random_weights,
    )  # fmt: skip
    meta.update(status="running", interrupted=False)
    if bundle.rank == 0:
        write_meta(out_dir, meta)
    tok = bundle.tokenizer
    state = {"done": 0, "tokens": 0, "status": "finished", "warmup_s": None}
    prepared = items
    items = []
    served: list = []  # filled as batches finish, so an interrupted replay keeps its rows
    log = CompletedLog(out_dir / SERVING_FILE) if opts.serving and bundle.rank == 0 else None
    bar = tqdm(unit="req", desc=opts.dataset, disable=bundle.rank != 0)
    t_start = time.perf_counter()

    def run_batch(batch: list[Prepared]) -> float:
        caps = [p.max_new_tokens for p in batch]
        prompts = [p.tokens for p in batch]
        # the trace's request ids: 0, 1, 2, ... in admission order (every rank counts alike)
        first = tracer.next_request_id
        ids = list(range(first, first + len(batch)))
        for p, rid in zip(batch, ids, strict=True):
            p.trace_id = rid
        capped = CappedTracer(tracer, [len(p) for p in prompts], caps,
                              [request_info(p.request, p.max_new_tokens) for p in batch])
        t0 = time.perf_counter()
        outs = generate(
            bundle.model, prompts, max(caps), tok.eos_id, temperature=opts.temperature,
            tracer=capped, request_ids=ids, sync_cuda=trace_settings.sync_cuda,
        )  # fmt: skip
        service = time.perf_counter() - t0
        if timer is not None:
            service += timer.take_us() * 1e-6
        if bundle.world_size > 1:  # every TP rank must form the same next batch
            service = _broadcast_from_rank0(service, bundle.device)
        state["done"] += len(batch)
        state["tokens"] += sum(min(len(o), c) for o, c in zip(outs, caps, strict=True))
        elapsed = time.perf_counter() - t_start
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{state['tokens'] / max(elapsed, 1e-9):.1f}",
                        skipped=sum(skipped.values()))  # fmt: skip
        return service

    def on_done(rows) -> None:
        served.extend(rows)
        if log is not None:
            log.write(rows)

    summary = None
    try:
        items = prepared if prepared is not None else list(
            prepare(
                workload.requests, tok, max_prompt_tokens=max_prompt,
                max_new_tokens=opts.max_new_tokens, limit=opts.limit, seed=opts.seed,
                bos_id=tok.bos_id, vocab_size=args.vocab_size, skipped=skipped,
            )
        )  # fmt: skip
        if opts.warmup and items:  # before the first measured forward (and the clock)
            state["warmup_s"] = warm_up(
                bundle.model, items, opts.batch_size, tok.eos_id, trace_settings,
                trace_settings.kv_bytes_per_token or kv_bytes_per_token(args),
                bundle.rank, bundle.world_size,
            )  # fmt: skip
        bar.reset(total=len(items))
        bar.set_postfix(skipped=sum(skipped.values()))
        if opts.serving:
            replay(items, opts.batch_size, opts.time_scale, run_batch, on_done=on_done)
        else:
            for batch in batches(items, opts.batch_size):
                run_batch(batch)
    except KeyboardInterrupt:
        state["status"] = "interrupted"
        raise
    except BaseException as exc:
        state["status"] = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        bar.close()
        if log is not None:
            log.close()
        summary = tracer.close(
            serving=serving_section(served, opts.batch_size, opts.max_new_tokens)
            if opts.serving else None,
            skipped={k: int(v) for k, v in sorted(skipped.items())},
        )  # fmt: skip
        wall = time.perf_counter() - t_start
        meta.update(
            status=state["status"],
            interrupted=state["status"] == "interrupted",
            finished_utc=utc_now(),
            requests_run=state["done"],
            requests_prepared=len(items),
            new_tokens=state["tokens"],
            wall_s=round(wall, 3),
            warmup_s=None if state["warmup_s"] is None else round(state["warmup_s"], 4),
            skipped=dict(sorted(skipped.items())),
        )
        if bundle.rank == 0:
            write_meta(out_dir, meta)
    return RunResult(out_dir, summary, state["done"], state["tokens"], skipped, wall,
                     state["warmup_s"])


def _broadcast_from_rank0(value: float, device: str) -> float:
    """Rank 0's measurement on every rank (the serving clock decides batch composition)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def make_backend(opts: RunOptions, bundle: ModelBundle, settings: Any) -> Any:
    """``hbm``: every block an HBM hit, bytes from the model's KV size. ``sim``: the simpy
    tiered emulator built as ``kvtier replay`` builds it, so a live sim run and a replay of
    the same selections agree."""
    from kvtier.runners.model_setup import kv_bytes_per_token

    if opts.backend == "hbm":
        from kvtier.backend import HBMOnlyBackend

        return HBMOnlyBackend(settings.kv_bytes_per_token or kv_bytes_per_token(bundle.args))
    if opts.backend != "sim":
        raise ValueError(f"--backend must be 'hbm' or 'sim', got {opts.backend!r}")
    from kvtier.sim.tiers.backend import TieredBackend
    from kvtier.sim.tiers.config import load_tier_config
    from kvtier.sim.tiers.recompute import load_model_dims

    over: dict[str, Any] = {"block_size": settings.kv_block_size}
    if settings.kv_bytes_per_token:
        over["kv_bytes_per_token"] = settings.kv_bytes_per_token
    cfg = load_tier_config(opts.tiers or "memfabric", over)
    if opts.hbm_blocks is not None:
        over["hbm"] = {"capacity_bytes": opts.hbm_blocks * settings.kv_block_size * cfg.kv_bytes_per_token}
        cfg = load_tier_config(opts.tiers or "memfabric", over)
    return TieredBackend(
        cfg, num_layers=bundle.args.n_layers, eviction=opts.policy,
        model=load_model_dims(str(bundle.config_path)),
    )  # fmt: skip
