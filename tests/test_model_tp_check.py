"""Tensor parallelism of the model core on two gloo CPU processes: MP=2 (random weights cut
from the same global tensors) gives MP=1's logits and top-k, and a cross-rank top-k mismatch
raises TopkMismatchError naming layer and step on every rank (nobody hangs): at the next
forward or at ``check_ranks()``, since the check runs asynchronously."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from kvtier.model import model as M  # noqa: E402
from kvtier.model.args import ModelArgs  # noqa: E402
from kvtier.model.random_init import init_random_  # noqa: E402

PROMPT, STEPS = 24, 6  # tokens: PROMPT + STEPS + 2

WORKER = textwrap.dedent(
    """
    import json, sys, datetime
    import torch, torch.distributed as dist
    from kvtier.model import model as M
    from kvtier.model.args import ModelArgs
    from kvtier.model.random_init import init_random_

    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    P, N = int(sys.argv[5]), int(sys.argv[6])
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    tokens = torch.tensor(json.loads(sys.argv[4]))
    model = init_random_(M.Transformer(ModelArgs.builtin("tiny", dtype="fp32")), seed=0)
    assert M.world_size == 2 and M.rank == rank and model.layers[0].attn.n_local_heads == 2
    assert sum(e is not None for e in model.layers[1].ffn.experts) == 4

    class Rec:
        def __init__(self): self.calls = []
        def on_topk(self, layer, idx, sc): self.calls.append(idx.tolist())

    rec = Rec()
    model.tracer = rec
    logits = [model(tokens[:, :P], 0)]
    for p in range(P, P + N):
        logits.append(model(tokens[:, p : p + 1], p))
    result = {"logits": torch.stack(logits).tolist(), "topk": rec.calls}
    model.tracer = None
    # now break the indexer of layer 1 on rank 1 only: a decode step must fail on both ranks
    if rank == 1:
        with torch.no_grad():
            model.layers[1].attn.indexer.wk.weight.mul_(-1)
    # the check is asynchronous: the forward returns, the next forward (or check_ranks) raises
    model(tokens[:, P + N : P + N + 1], P + N)
    try:
        model(tokens[:, P + N + 1 : P + N + 2], P + N + 1)
        result["error"] = None
    except M.TopkMismatchError as exc:
        result["error"] = str(exc)
    model(tokens[:, P + N : P + N + 1], P + N)  # planted again; found by an explicit check
    try:
        model.check_ranks()
        result["error2"] = None
    except M.TopkMismatchError as exc:
        result["error2"] = str(exc)
    json.dump(result, open(out, "w"))
    dist.destroy_process_group()
    """
)


def _sets(calls):
    return [[sorted(row) for row in layer] for layer in calls]


def test_mp2_matches_mp1_and_mismatch_raises(tmp_path):
    tokens = torch.randint(
        0, 1024, (2, PROMPT + STEPS + 2), generator=torch.Generator().manual_seed(0)
    )
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(r),
                str(tmp_path / "store"),
                str(outs[r]),
                json.dumps(tokens.tolist()),
                str(PROMPT),
                str(STEPS),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    res = [json.loads(o.read_text()) for o in outs]

    # MP=1 reference in this process
    prev, prev_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    try:
        model = init_random_(M.Transformer(ModelArgs.builtin("tiny", dtype="fp32")), seed=0)
        calls = []

        class Rec:
            def on_topk(self, layer, idx, sc):
                calls.append(idx.tolist())

        model.tracer = Rec()
        ref = [model(tokens[:, :PROMPT], 0)]
        for p in range(PROMPT, PROMPT + STEPS):
            ref.append(model(tokens[:, p : p + 1], p))
        ref = torch.stack(ref)
    finally:
        torch.set_default_dtype(prev)
        torch.set_num_threads(prev_threads)

    for r in range(2):
        # the same sets (row-parallel all-reduces sum in another order, so two scores that
        # agree to ~1e-7 may swap places inside the sorted top-k)
        assert _sets(res[r]["topk"]) == _sets(calls), f"rank {r} top-k differs from MP=1"
        torch.testing.assert_close(torch.tensor(res[r]["logits"]), ref, rtol=1e-4, atol=1e-4)
        for key in ("error", "error2"):
            err = res[r][key]
            assert err is not None and "layer 1" in err and f"step {PROMPT + STEPS}" in err
