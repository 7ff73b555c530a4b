"""Full-size traced run of the DeepSeek-V3.2-Exp model under torchrun tensor parallelism.

The 671B configuration (61 layers, 256 routed experts; ``--layers``/``--experts`` shrink it to
fit fewer GPUs) with fp8 random weights generated on the GPUs, the fast path (Triton kernels,
grouped MoE, chunked sparse prefill, CUDA-graph decode), tracing on with the HBM-only backend
(rank 0 writes the trace and summary; they are validated), the cross-rank top-k check on.
Synthetic RULER-like prompts (needles in a haystack, built from token ids: no tokenizer
needed) of ``--contexts`` tokens at batch 1 plus ``--batch8-context`` at batch 8; each run is
one prefill and ``--steps`` greedy decode steps.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 8 benchmarks/full_model_tp.py --out runs/tp8
    torchrun --nproc-per-node 1 benchmarks/full_model_tp.py --layers 61 --experts 32 --out runs/1gpu

Prints one row per run (prefill s, decode step ms median/p90, peak GiB per GPU) and writes
``full_model_tp.json`` and ``trace_<context>_b<batch>/`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

# NVLink multicast off (the lent machines require it), before NCCL is loaded
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from kvtier.model import model as M  # noqa: E402
from kvtier.model.args import ModelArgs  # noqa: E402
from kvtier.model.random_init import init_random_  # noqa: E402


def ruler_like_prompt(n_tokens: int, vocab: int, seed: int) -> list[int]:
    """A RULER NIAH-shaped prompt: an instruction, a haystack of filler sentences drawn from
    64 fixed sentences, 4 needles ("key k: value v") at 10-90 % depth, and a question naming
    one key. Token ids only (random weights need no real text)."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(12345)  # the same sentences and template for every prompt
    lo, hi = min(1000, vocab // 8), vocab - min(1000, vocab // 8)  # clear of special ids
    sentences = [base.integers(lo, hi, int(base.integers(12, 30))).tolist()
                 for _ in range(64)]  # fmt: skip
    instruction = base.integers(lo, hi, 40).tolist()
    question = base.integers(lo, hi, 24).tolist()
    needle_tpl = base.integers(lo, hi, 10).tolist()
    keys = [rng.integers(100, 1000, 3).tolist() for _ in range(4)]
    values = [rng.integers(100, 1000, 6).tolist() for _ in range(4)]
    depths = sorted(rng.uniform(0.1, 0.9, 4))
    body_len = n_tokens - len(instruction) - len(question) - 4 - 4 * (len(needle_tpl) + 9)
    hay: list[int] = []
    while len(hay) < body_len:
        hay.extend(sentences[int(rng.integers(0, 64))])
    hay = hay[:body_len]
    out = [0] + instruction  # BOS
    last = 0
    for d, k, v in zip(depths, keys, values, strict=True):
        cut = int(d * body_len)
        out += hay[last:cut] + needle_tpl[:5] + k + needle_tpl[5:] + v
        last = cut
    out += hay[last:] + question + keys[int(rng.integers(0, 4))]
    return out[:n_tokens] + [1] * (n_tokens - len(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="full_model_tp", help="output directory (rank 0)")
    ap.add_argument("--layers", type=int, default=61, help="transformer layers (671B: 61)")
    ap.add_argument("--experts", type=int, default=256,
                    help="routed experts per MoE layer (671B: 256; a multiple of 8 and of the "
                         "number of GPUs, >= 16)")  # fmt: skip
    ap.add_argument("--contexts", default="16384,65536,131072",
                    help="batch-1 prompt lengths, comma-separated")
    ap.add_argument("--batch8-context", type=int, default=16384,
                    help="prompt length of the batch-8 run (0: none)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per run")
    ap.add_argument("--prefill-tokens", type=int, default=8192,
                    help="tokens per prefill chunk over the whole batch")
    ap.add_argument("--seed", type=int, default=0, help="weights and prompts seed")
    ap.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graphs)")
    ap.add_argument("--config", default="671B_v3.2",
                    help="builtin config (tiny: a CPU smoke run with --device cpu)")
    ap.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    opts = ap.parse_args()

    from kvtier.trace.settings import TraceSettings
    from kvtier.trace.tracer import Tracer, kv_bytes_per_token
    from kvtier.trace.validate import validate_trace

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = opts.device == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    if world > 1:
        if cuda:
            dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=20),
                                    device_id=torch.device("cuda", local))  # fmt: skip
        else:
            dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=20))
            torch.set_num_threads(1)
    rank = dist.get_rank() if world > 1 else 0
    torch.set_default_dtype(torch.bfloat16)
    M.Transformer.cuda_graphs = not opts.no_graphs
    out = Path(opts.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    def log(*a):
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)

    contexts = [int(c) for c in opts.contexts.split(",") if c]
    runs = [(c, 1) for c in contexts]
    if opts.batch8_context:
        runs.insert(1 if contexts and contexts[0] <= opts.batch8_context else 0,
                    (opts.batch8_context, 8))  # fmt: skip
    # caches: two shapes so that batch 8 and 128K never coexist (resize_caches between)
    pad = opts.steps + 64

    def cache_shape(ctx, bsz):
        return (8 if bsz == 8 or ctx <= opts.batch8_context else 1), ctx + pad

    groups = {}
    for ctx, bsz in runs:
        b, _ = cache_shape(ctx, bsz)
        groups.setdefault(b, []).append((ctx, bsz))
    first_b = next(iter(groups))
    first_len = max(c for c, _ in groups[first_b]) + pad
    cfg = ModelArgs.builtin(opts.config, n_layers=opts.layers, n_routed_experts=opts.experts,
                            max_batch_size=first_b, max_seq_len=first_len)  # fmt: skip

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    with torch.device(opts.device):
        model = M.Transformer(cfg)
    init_random_(model, seed=opts.seed).eval()
    with torch.no_grad():  # the checkpoints store the head in bf16: values exactly bf16
        model.head.weight.copy_(model.head.weight.to(torch.bfloat16).float())
    sync()
    build_s = time.perf_counter() - t0
    mem = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    log(f"built {opts.layers} layers, {opts.experts} experts on {world} process(es) in "
        f"{build_s:.0f} s; {mem:.1f} GiB per GPU")
    bpt = kv_bytes_per_token(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim)
    results = []
    for b, group in groups.items():
        need = max(c for c, _ in group) + pad
        if (model.max_batch_size, model.max_seq_len) != (b, need):
            model.resize_caches(b, need)
        for ctx, bsz in group:
            prompts = [ruler_like_prompt(ctx, cfg.vocab_size, opts.seed * 100 + i) for i in range(bsz)]
            tokens = torch.tensor(prompts, device=opts.device)
            name = f"trace_{ctx}_b{bsz}"
            tracer = Tracer(TraceSettings(), out / name, run_name=name, dataset="ruler-like-synthetic",
                            kv_bytes_per_token=bpt, rank=rank, world_size=world, force=True,
                            config={"layers": opts.layers, "experts": opts.experts,
                                    "random_weights": True})  # fmt: skip
            M.Transformer.prefill_chunk = max(256, opts.prefill_tokens // bsz)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            logits = model(tokens, 0)
            sync()
            prefill_s = time.perf_counter() - t0
            tracer.begin_batch(None, prompts)
            model.tracer = tracer
            step_ms = []
            nxt = logits.argmax(-1)
            for step in range(opts.steps):
                pos = ctx + step
                tracer.start_step(pos)
                sync()
                t1 = time.perf_counter()
                logits = model(nxt[:, None], pos)
                nxt = logits.argmax(-1)
                sync()
                wall = time.perf_counter() - t1
                tracer.end_step(wall)
                step_ms.append(wall * 1e3)
            model.tracer = None
            tracer.end_batch()
            model.check_ranks()  # raises on every rank if any layer's top-k differed
            summary = tracer.close()
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            peaks = [peak]
            if world > 1:
                peaks = [None] * world
                dist.all_gather_object(peaks, peak)
            steady = step_ms[2:] or step_ms  # the first steps capture CUDA graphs
            row = dict(context=ctx, batch=bsz, prefill_s=round(prefill_s, 2),
                       decode_ms_median=round(statistics.median(steady), 2),
                       decode_ms_p90=round(float(np.percentile(steady, 90)), 2),
                       first_steps_ms=[round(x, 1) for x in step_ms[:2]],
                       peak_gib_per_gpu=[round(p, 2) for p in peaks],
                       tracer=tracer.build_stats)  # fmt: skip
            if rank == 0:
                rep = validate_trace(out / name)
                row.update(records=summary.records if summary is not None else None,
                           validate_ok=rep.ok, validate_errors=rep.errors,
                           summary_written=(out / name / "summary.json").is_file())  # fmt: skip
            results.append(row)
            log(row)
            if rank == 0:  # after every run, so a run cut short keeps what finished
                (out / "full_model_tp.json").write_text(json.dumps(
                    dict(gpus=world, layers=opts.layers, experts=opts.experts, steps=opts.steps,
                         build_s=round(build_s, 1), command=" ".join(sys.argv), runs=results),
                    indent=1, default=str))  # fmt: skip
            del tokens, logits
            if cuda:
                torch.cuda.empty_cache()
    if rank == 0:
        meta = dict(gpus=world, device=torch.cuda.get_device_name() if cuda else "cpu",
                    torch=torch.__version__,
                    layers=opts.layers, experts=opts.experts, steps=opts.steps,
                    build_s=round(build_s, 1), command=" ".join(sys.argv), runs=results)  # fmt: skip
        (out / "full_model_tp.json").write_text(json.dumps(meta, indent=1, default=str))
        print(f"\n# {world} x {meta['device']}, torch {meta['torch']}: {opts.layers} layers, "
              f"{opts.experts} experts, {opts.steps} decode steps, tracing on (HBM backend)")
        print("| context | batch | prefill s | decode ms (median) | p90 | peak GiB per GPU | records | valid |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['context']} | {r['batch']} | {r['prefill_s']} | {r['decode_ms_median']} | "
                  f"{r['decode_ms_p90']} | {max(r['peak_gib_per_gpu'])} | {r.get('records')} | "
                  f"{r.get('validate_ok')} |")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
