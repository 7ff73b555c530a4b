"""Tensor parallelism on CPU: two gloo processes loading an MP=2 conversion agree with MP=1.

Each worker loads its own shard ``model{rank}-mp2.safetensors`` through ``build_model`` (the
rank comes from the process group), runs a prefill plus teacher-forced decode steps past
``index_topk`` and records the decode top-k of every layer through the ``tracer`` attribute.
Expected: the top-k sets of both ranks and of the MP=1 model are equal at every step and
layer, and the logits agree within ``LOGIT_ATOL`` (fp32; the row-parallel all-reduce sums the
partial products in another order, so only rounding differs: ~1e-6 measured).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from hf_utils import converted, model_args

from kvtier.model.loading import build_model

LOGIT_ATOL = 1e-4
PROMPT, TOTAL = 10, 30

WORKER = textwrap.dedent(
    """
    import datetime, json, sys
    import torch, torch.distributed as dist
    from kvtier.model.loading import build_model

    rank, store, ckpt, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    prompt, tokens = int(sys.argv[5]), torch.tensor(json.loads(sys.argv[6]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    model = build_model(ckpt + "/kvtier_config.json", ckpt)
    assert (model.rank, model.world_size) == (rank, 2)

    class Rec:
        def __init__(self):
            self.calls = []

        def on_topk(self, layer, idx, sc):
            self.calls.append(idx.tolist())

    model.tracer = rec = Rec()
    logits = [model(tokens[:, :prompt], 0)]
    for pos in range(prompt, tokens.shape[1]):
        logits.append(model(tokens[:, pos : pos + 1], pos))
    json.dump({"logits": torch.stack(logits).tolist(), "topk": rec.calls}, open(out, "w"))
    dist.destroy_process_group()
    """
)


def test_mp2_gloo_matches_mp1(tmp_path):
    args = model_args("exact")
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, args.vocab_size, (2, TOTAL), generator=g)
    ckpt = converted("exact", 2)
    store = tmp_path / "pg_store"
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(r), str(store), str(ckpt), str(outs[r]), str(PROMPT),
             json.dumps(tokens.tolist())],  # fmt: skip
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"
    ranks = [json.loads(o.read_text()) for o in outs]

    prev = torch.get_default_dtype()
    try:
        model = build_model(args, converted("exact", 1))
        rec = []
        model.tracer = type("Rec", (), {"on_topk": lambda self, layer, idx, sc: rec.append(idx.tolist())})()
        ref = [model(tokens[:, :PROMPT], 0)]
        ref += [model(tokens[:, p : p + 1], p) for p in range(PROMPT, TOTAL)]
    finally:
        torch.set_default_dtype(prev)
    ref_logits = torch.stack(ref)

    n_calls = (TOTAL - PROMPT) * args.n_layers
    assert len(rec) == n_calls and all(len(r["topk"]) == n_calls for r in ranks)
    for i in range(n_calls):
        step, layer = PROMPT + i // args.n_layers, i % args.n_layers
        for row in range(tokens.shape[0]):
            want = set(rec[i][row])
            assert len(want) == args.index_topk
            for r in range(2):
                assert set(ranks[r]["topk"][i][row]) == want, f"rank {r} layer {layer} step {step} row {row}"
    for r in range(2):
        diff = (torch.tensor(ranks[r]["logits"]) - ref_logits).abs().max().item()
        assert diff <= LOGIT_ATOL, f"rank {r}: max |logit diff| vs MP=1 {diff:.3g}"
    assert ranks[0]["logits"] == ranks[1]["logits"]  # all-gathered: identical on both ranks
