"""Decode-step time of the DSA model and fp8-vs-exact indexer agreement, random weights.

On a GPU: a few layers of the real 671B shapes (bf16 activations, fp8 weights, YaRN,
max_seq_len 16384), a prefill of ``--context`` tokens, then teacher-forced decode steps.
Reports the sparse (gathered top-k) decode step time against the reference's masked-dense
decode measured in the same run (the baseline), then rebuilds the same weights in
``indexer_exact`` mode and compares the top-k sets of every decode step and layer.

    python benchmarks/model_decode.py --device cuda --layers 4 --context 4096
    python benchmarks/model_decode.py --small          # CPU smoke run on the tiny config
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    from kvtier.model import model as M
    from kvtier.model.args import ModelArgs
    from kvtier.model.random_init import init_random_
except ImportError:  # a bare checkout without the editable install: import model/ directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from model import model as M
    from model.args import ModelArgs
    from model.random_init import init_random_


class TopkRecorder:
    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []

    def on_topk(self, layer_id: int, indices: torch.Tensor, scores: torch.Tensor) -> None:
        if layer_id == 0:
            self.steps.append([])
        self.steps[-1].append(indices.cpu())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(args: ModelArgs, device: str, seed: int) -> M.Transformer:
    with torch.device(device):
        model = M.Transformer(args)
    return init_random_(model, seed=seed).eval()


def run(model, tokens, context, steps, device, time_dense: int):
    """Prefill, then teacher-forced decodes; returns (logits, recorder, times)."""
    rec = TopkRecorder()
    sync(device)
    t0 = time.perf_counter()
    logits = [model(tokens[:, :context], 0)]
    sync(device)
    prefill_s = time.perf_counter() - t0
    model.tracer = rec
    sparse_ms = []
    for p in range(context, context + steps):
        sync(device)
        t0 = time.perf_counter()
        logits.append(model(tokens[:, p : p + 1], p))
        sync(device)
        sparse_ms.append((time.perf_counter() - t0) * 1e3)
    model.tracer = None
    dense_ms = []
    M.MLA.sparse_decode = False
    try:  # the reference's masked-dense decode at the last position (rewrites the same cache row)
        p = context + steps - 1
        for _ in range(time_dense):
            sync(device)
            t0 = time.perf_counter()
            model(tokens[:, p : p + 1], p)
            sync(device)
            dense_ms.append((time.perf_counter() - t0) * 1e3)
    finally:
        M.MLA.sparse_decode = True
    return torch.stack(logits).float().cpu(), rec, prefill_s, sparse_ms, dense_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    ap.add_argument(
        "--layers", type=int, default=4, help="number of layers of the 671B config to build"
    )
    ap.add_argument(
        "--dense-layers", type=int, default=1, help="how many of them are dense (the rest MoE)"
    )
    ap.add_argument(
        "--context", type=int, default=4096, help="prompt length prefilled before decoding"
    )
    ap.add_argument("--steps", type=int, default=32, help="teacher-forced decode steps measured")
    ap.add_argument(
        "--dense-repeats", type=int, default=8, help="masked-dense decode steps timed (baseline)"
    )
    ap.add_argument("--seed", type=int, default=0, help="weight and token seed")
    ap.add_argument("--config", default="671B_v3.2", help="builtin config: 671B_v3.2, demo or tiny")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    ap.add_argument("--small", action="store_true", help="tiny config on CPU (smoke run)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    opts = ap.parse_args()

    if opts.small:
        opts.config, opts.device = "tiny", "cpu"
        opts.context, opts.steps = min(opts.context, 100), min(opts.steps, 8)
    if opts.config == "671B_v3.2":
        cfg = ModelArgs.builtin(opts.config, n_layers=opts.layers, n_dense_layers=opts.dense_layers)
    else:
        cfg = ModelArgs.builtin(opts.config)
    # bf16 as the reference generate.py, fp32 for fp32 configs (the CPU demo)
    torch.set_default_dtype(torch.float32 if cfg.dtype == "fp32" else torch.bfloat16)
    if opts.device == "cpu":
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    tokens = torch.randint(0, cfg.vocab_size, (1, opts.context + opts.steps), device=opts.device)

    t0 = time.perf_counter()
    model = build(cfg, opts.device, opts.seed)
    build_s = time.perf_counter() - t0
    mem_gib = (
        torch.cuda.max_memory_allocated() / 2**30
        if opts.device.startswith("cuda")
        else float("nan")
    )
    la, ra, prefill_s, sparse_ms, dense_ms = run(
        model, tokens, opts.context, opts.steps, opts.device, opts.dense_repeats
    )
    del model
    gc.collect()
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()

    exact_cfg = ModelArgs.from_dict({**cfg.to_dict(), "indexer_exact": True})
    exact = build(exact_cfg, opts.device, opts.seed)
    lb, rb, _, exact_ms, _ = run(exact, tokens, opts.context, opts.steps, opts.device, 0)

    K = ra.steps[0][0].shape[-1]
    overlap = np.array(
        [
            [len(set(a[0].tolist()) & set(b[0].tolist())) / K for a, b in zip(sa, sb, strict=True)]
            for sa, sb in zip(ra.steps, rb.steps, strict=True)
        ]
    )  # [steps, layers]
    rel = ((la - lb).norm(dim=-1) / lb.norm(dim=-1)).flatten()
    sparse = statistics.median(sparse_ms[2:] or sparse_ms)
    dense = statistics.median(dense_ms[1:] or dense_ms) if dense_ms else float("nan")
    res = {
        "device": torch.cuda.get_device_name() if opts.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "config": {
            k: getattr(cfg, k)
            for k in ("n_layers", "n_dense_layers", "dim", "index_topk", "max_seq_len", "dtype")
        },
        "context": opts.context,
        "steps": opts.steps,
        "build_s": round(build_s, 2),
        "weights_mem_gib": round(mem_gib, 2),
        "prefill_s": round(prefill_s, 3),
        "decode_sparse_ms_median": round(sparse, 3),
        "decode_dense_ms_median": round(dense, 3) if dense_ms else None,
        "dense_over_sparse": round(dense / sparse, 3) if dense_ms else None,
        "decode_exact_ms_median": round(statistics.median(exact_ms[2:] or exact_ms), 3),
        "topk_overlap_mean": round(float(overlap.mean()), 4),
        "topk_overlap_min": round(float(overlap.min()), 4),
        "topk_overlap_per_layer": [round(float(x), 4) for x in overlap.mean(0)],
        "logits_rel_err_median": round(float(rel.median()), 4),
        "logits_rel_err_max": round(float(rel.max()), 4),
    }
    for k, v in res.items():
        print(f"{k:28s} {v}")
    if opts.out:
        Path(opts.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
