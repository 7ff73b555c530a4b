"""Device check of the tracer's CUDA path: top-k tensors on the GPU go through pinned,
non-blocking copies + CUDA events, and the records must equal a sorted CPU copy.

Needs a CUDA GPU (so it is not part of the CPU test suite):
    PYTHONPATH=. python3 benchmarks/check_tracer_cuda.py
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch

from kvtier.trace.reader import find_trace, iter_records
from kvtier.trace.settings import TraceSettings
from kvtier.trace.tracer import Tracer
from kvtier.trace.validate import validate_trace


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    out = tempfile.mkdtemp(prefix="kvtier-cuda-") + "/t"
    batch, layers, k, ctx = 4, 8, 256, 2000
    want = []
    with Tracer(TraceSettings(store_scores=True), out, run_name="cuda", dataset="check",
                kv_bytes_per_token=1284) as tr:
        tr.begin_batch(list(range(batch)), [[1] * ctx] * batch)
        for step in range(3):
            tr.start_step(ctx + step)
            for layer in range(layers):
                scores = torch.randn(batch, ctx + step + 1, device="cuda")
                val, idx = scores.topk(k, dim=-1)
                tr.on_topk(layer, idx, val)
                order = torch.argsort(idx, dim=-1)
                want.append((torch.gather(idx, 1, order).cpu().numpy(),
                             torch.gather(val, 1, order).cpu().numpy()))
            tr.end_step(1e-3)
    recs = list(iter_records(find_trace(out)))
    rows = [(p[r], v[r]) for p, v in want for r in range(batch)]
    ok_pos = all(rec.selected_token_pos == p.tolist() for rec, (p, _) in zip(recs, rows, strict=True))
    ok_sc = all(np.allclose(rec.scores_topk, v) for rec, (_, v) in zip(recs, rows, strict=True))
    ok_val = validate_trace(out).ok
    print(f"records {len(recs)}; positions match {ok_pos}; scores match {ok_sc}; validate {ok_val}")
    return 0 if ok_pos and ok_sc and ok_val else 1


if __name__ == "__main__":
    sys.exit(main())
