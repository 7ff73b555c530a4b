"""What tracing costs the model: decode-step wall time with the tracer attached vs without.

Builds a few layers of a builtin config with random weights, prefills ``--context`` tokens,
then times teacher-forced decode steps alternately without a tracer (the baseline) and with
``kvtier.trace.tracer.Tracer`` (HBM-only backend, full ``selected_token_pos``, JSONL on disk), and
prints both with their ratio. On CUDA the tracer's pinned non-blocking copies are exercised;
the recorded positions are checked against a sorted host copy of the same top-k, and the
trace is validated.

    python benchmarks/bench_trace_overhead.py --device cuda --layers 4 --context 8192
    python benchmarks/bench_trace_overhead.py --config demo --device cpu --context 1500
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from kvtier.model import model as M
from kvtier.model.args import ModelArgs
from kvtier.model.random_init import init_random_
from kvtier.trace.reader import find_trace, iter_records
from kvtier.trace.settings import TraceSettings
from kvtier.trace.tracer import Tracer, kv_bytes_per_token
from kvtier.trace.validate import validate_trace


class _Tee:
    """Forwards top-k to the tracer and keeps a device-side clone (no sync, so the timing is
    not disturbed) for the equality check after the run."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.clones: list[torch.Tensor] = []

    def on_topk(self, layer_id, indices, scores=None) -> None:
        self.tracer.on_topk(layer_id, indices)  # positions only: the bitmap fast path
        self.clones.append(indices.detach().clone())

    def sorted_copies(self) -> list[np.ndarray]:
        return [np.sort(c.cpu().numpy(), axis=1) for c in self.clones]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device")
    ap.add_argument("--config", default="671B_v3.2", help="builtin config (671B_v3.2, demo, tiny)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the 671B config to build")
    ap.add_argument("--context", type=int, default=8192, help="prompt length prefilled first")
    ap.add_argument("--steps", type=int, default=24, help="decode steps timed per mode")
    ap.add_argument("--seed", type=int, default=0, help="weight and token seed")
    opts = ap.parse_args()

    if opts.config == "671B_v3.2":
        cfg = ModelArgs.builtin(opts.config, n_layers=opts.layers, n_dense_layers=1)
    else:
        cfg = ModelArgs.builtin(opts.config)
    torch.set_default_dtype(torch.float32 if cfg.dtype == "fp32" else torch.bfloat16)
    if opts.device == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(opts.seed)
    n_tok = opts.context + 3 + 2 * opts.steps  # 3 warm-up decodes, then alternating steps
    if n_tok > cfg.max_seq_len:
        raise SystemExit(f"--context + 2*--steps must stay below max_seq_len {cfg.max_seq_len}")
    tokens = torch.randint(0, cfg.vocab_size, (1, n_tok), device=opts.device)
    with torch.device(opts.device):
        model = M.Transformer(cfg)
    init_random_(model, seed=opts.seed).eval()

    out = tempfile.mkdtemp(prefix="kvtier-overhead-") + "/trace"
    bpt = kv_bytes_per_token(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim)
    tracer = Tracer(TraceSettings(), out, run_name="overhead", dataset="random",
                    kv_bytes_per_token=bpt)
    tee = _Tee(tracer)
    tracer.begin_batch([0], [tokens[0, : opts.context].tolist()])
    with torch.inference_mode():
        model(tokens[:, : opts.context], 0)
        for p in range(opts.context, opts.context + 3):  # warm-up (last one traced: JIT), untimed
            model.tracer = tee if p == opts.context + 2 else None
            if model.tracer is not None:
                tracer.start_step(p)
            model(tokens[:, p : p + 1], p)
            if model.tracer is not None:
                tracer.end_step(None)
        plain_ms, traced_ms, end_ms = [], [], []
        p = opts.context + 3
        for _ in range(opts.steps):  # alternate so drift hits both modes alike
            model.tracer = None
            _sync(opts.device)
            t0 = time.perf_counter()
            model(tokens[:, p : p + 1], p)
            _sync(opts.device)
            plain_ms.append((time.perf_counter() - t0) * 1e3)
            p += 1
            model.tracer = tee
            tracer.start_step(p)
            _sync(opts.device)
            t0 = time.perf_counter()
            model(tokens[:, p : p + 1], p)
            _sync(opts.device)
            wall = time.perf_counter() - t0
            t1 = time.perf_counter()
            tracer.end_step(wall)  # record building happens here, after the forward
            end_ms.append((time.perf_counter() - t1) * 1e3)
            traced_ms.append(wall * 1e3)
            p += 1
    tracer.end_batch()
    tracer.close()

    records = list(iter_records(find_trace(out)))
    got = [np.asarray(r.selected_token_pos) for r in records]
    want = [row[0] for row in tee.sorted_copies()]
    same = len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    report = validate_trace(out)
    plain, traced = statistics.median(plain_ms), statistics.median(traced_ms)
    name = torch.cuda.get_device_name() if opts.device.startswith("cuda") else "cpu"
    print(f"device {name}; config {opts.config}, {cfg.n_layers} layers, context {opts.context}, "
          f"index_topk {cfg.index_topk}; {opts.steps} decode steps per mode (median)")
    print("| mode | decode step ms (median) | min | max |")
    print("|---|---:|---:|---:|")
    print(f"| no tracer (baseline) | {plain:.3f} | {min(plain_ms):.3f} | {max(plain_ms):.3f} |")
    print(f"| tracer attached (forward only) | {traced:.3f} | {min(traced_ms):.3f} | {max(traced_ms):.3f} |")
    end = statistics.median(end_ms)
    print(f"| tracer end_step (records of all layers, after the forward) | {end:.3f} | "
          f"{min(end_ms):.3f} | {max(end_ms):.3f} |")
    print(f"ratio traced/plain (forward): {traced / plain:.3f}; "
          f"(forward + end_step)/plain: {(traced + end) / plain:.3f}; records {len(records)}; "
          f"positions equal to a sorted host copy: {same}; validate errors: {report.errors}")
    return 0 if same and not report.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
