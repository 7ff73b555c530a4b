"""The tracer's records against a per-record pure-Python reference, plus its contract."""

from __future__ import annotations

import math
import subprocess
import sys

import msgspec
import numpy as np
import pytest
from trace_ref import ref_fields

from kvtier.backend import HBMOnlyBackend
from kvtier.schema import TopkRecord
from kvtier.trace.prefix import chained_block_hashes
from kvtier.trace.reader import find_trace, iter_records
from kvtier.trace.settings import TraceSettings
from kvtier.trace.tracer import Tracer, kv_bytes_per_token, sample_uniform


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def read(out) -> list[TopkRecord]:
    return list(iter_records(find_trace(out)))


def check_against_ref(rec: TopkRecord, idx_row, step, bs, n_prefix, scores_row=None) -> None:
    ref = ref_fields(list(map(int, idx_row)), step, bs, n_prefix,
                     None if scores_row is None else list(map(float, scores_row)))
    assert rec.step_idx == ref["step_idx"]
    assert rec.seq_len_current == ref["seq_len_current"]
    assert rec.selected_token_pos == ref["selected_token_pos"]
    assert rec.unique_token_pos_count == ref["unique_token_pos_count"]
    assert rec.offset_min == ref["offset_min"] and rec.offset_max == ref["offset_max"]
    assert close(rec.offset_p50, ref["offset_p50"])
    assert rec.selected_block_ids == ref["selected_block_ids"]
    assert rec.unique_blocks == ref["unique_blocks"]
    t = rec.tokens_per_touched_block
    for got, want in zip((t.mean, t.p50, t.p95), ref["tpb"], strict=True):
        assert close(got, want)
    assert rec.prefix.intersection_blocks == ref["selected_block_ids"][:ref["intersection_blocks"]]
    assert close(rec.prefix.intersection_ratio, ref["intersection_ratio"])
    assert rec.block_size_tokens == bs
    if scores_row is not None:
        s = rec.scores_stats
        assert s is not None
        for got, want in zip((s.min, s.mean, s.max), ref["scores_stats"], strict=True):
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
        if rec.scores_topk is not msgspec.UNSET:
            assert rec.scores_topk == pytest.approx(ref["scores"], rel=1e-7)


@pytest.mark.parametrize("bs", [16, 7])
@pytest.mark.parametrize("store_scores", [False, True])
@pytest.mark.parametrize("with_scores", [True, False])
@pytest.mark.parametrize("no_numba", ["0", "1"])  # numba path (where installed) and numpy path
def test_records_match_reference(tmp_path, monkeypatch, bs, store_scores, with_scores, no_numba):
    monkeypatch.setenv("KVTIER_NO_NUMBA", no_numba)
    rng = np.random.default_rng(bs + store_scores)
    settings = TraceSettings(kv_block_size=bs, store_scores=store_scores, prefix_key_tokens=64)
    prompts = [rng.integers(0, 50, 70).tolist(), rng.integers(0, 50, 33).tolist(),
               rng.integers(0, 50, 5).tolist()]
    ids = [0, 1, 2]
    n_prefix = [len(chained_block_hashes(p, bs, 64)) for p in prompts]
    expected = []
    with Tracer(settings, tmp_path / "t", run_name="r", dataset="d", kv_bytes_per_token=100) as tr:
        tr.begin_batch(ids, prompts)
        for step in (70, 71, 72):
            active = [True, step != 71, True]
            tr.start_step(step, active)
            for layer in (0, 3):
                k = 12
                idx = np.stack([rng.choice(step + 1, k, replace=False) for _ in ids])
                if step == 72:  # padding and duplicates take the general path
                    idx[0, :3] = -1
                    idx[1, 5] = idx[1, 6]
                sc = rng.normal(size=idx.shape).astype(np.float32)
                tr.on_topk(layer, idx, sc if with_scores else None)
                for r in range(3):
                    if active[r]:
                        expected.append((ids[r], layer, step, idx[r], sc[r], n_prefix[r]))
            tr.end_step(0.002)
        tr.end_batch()
    recs = read(tmp_path / "t")
    # layer-major within a step: sort expected the same way
    assert len(recs) == len(expected)
    order = sorted(range(len(expected)), key=lambda i: (expected[i][2], expected[i][1], ids.index(expected[i][0])))
    for rec, i in zip(recs, order, strict=True):
        rid, layer, step, idx, sc, npref = expected[i]
        assert (rec.request_id, rec.layer_id) == (rid, layer)
        check_against_ref(rec, idx, step, bs, npref, sc if with_scores else None)
        assert (rec.scores_topk is not msgspec.UNSET) == (store_scores and with_scores)
        assert (rec.scores_stats is None) != with_scores
        hbm = rec.kv_fetch.hbm
        assert hbm.hit_blocks == rec.selected_block_ids and hbm.batch_size == rec.unique_blocks
        assert hbm.bytes_read == rec.unique_blocks * bs * 100
        assert hbm.read_ops == 1 and hbm.latency_us == pytest.approx(2000.0)
        for pool in (rec.kv_fetch.local_pool, rec.kv_fetch.remote_pool):
            assert pool.latency_us is None and pool.hit_blocks == [] and pool.batch_size == 0


def test_kv_bytes_per_token_figures():
    assert kv_bytes_per_token(512, 64, 128) == 1284
    assert kv_bytes_per_token(512, 64, 128) * 61 == 78_324
    assert kv_bytes_per_token(512, 64, 128, fp8_mla=True) == 788
    assert kv_bytes_per_token(512, 64, 0, indexer_scale_bytes=0) == 1152
    with pytest.raises(ValueError, match="kv_lora_rank"):
        kv_bytes_per_token(-1, 64, 128)


class RecordingBackend(HBMOnlyBackend):
    name = "recording"

    def __init__(self) -> None:
        super().__init__(10)
        self.calls: list[tuple] = []

    def admit(self, request_id, prompt_len, prefix_hashes=()):
        self.calls.append(("admit", request_id, prompt_len, tuple(prefix_hashes)))

    def append(self, request_id, n_tokens=1):
        self.calls.append(("append", request_id, n_tokens))

    def release(self, request_id):
        self.calls.append(("release", request_id))

    def fetch(self, access):
        self.calls.append(("fetch", access.step_idx, access.layer_id, tuple(access.request_ids),
                           [b.tolist() for b in access.block_ids]))
        return super().fetch(access)

    def summary(self):
        return {"tiers": {"hbm": {"hits": 1}}}


def test_backend_lifecycle_and_sections(tmp_path):
    be = RecordingBackend()
    prompt = list(range(40))
    with Tracer(TraceSettings(kv_block_size=16), tmp_path / "t", run_name="r", dataset="d", backend=be) as tr:
        tr.begin_batch([0, 1], [prompt, prompt[:20]])
        tr.start_step(40, [True, False])
        tr.on_topk(0, np.array([[0, 17, 39], [1, 2, 3]]))
        tr.end_step(None)
        tr.end_batch()
    kinds = [c[0] for c in be.calls]
    assert kinds == ["admit", "admit", "fetch", "append", "release", "release"]
    assert be.calls[0][3] == tuple(chained_block_hashes(prompt, 16, 256))
    assert be.calls[2][3] == (0,) and be.calls[2][4] == [[0, 1, 2]]
    assert tr.summary is not None and tr.summary.tiers == {"hbm": {"hits": 1}}
    (rec,) = read(tmp_path / "t")
    assert rec.kv_fetch.hbm.latency_us is None


def test_sampling_is_independent_of_batching(tmp_path):
    settings = TraceSettings(sample_rate=0.4, sample_seed=3)
    rng = np.random.default_rng(0)
    ids = list(range(6))
    prompts = [rng.integers(0, 9, 20).tolist() for _ in ids]

    def run(out, batches):
        with Tracer(settings, out, run_name="r", dataset="d", kv_bytes_per_token=1) as tr:
            for b in batches:
                tr.begin_batch([ids[i] for i in b], [prompts[i] for i in b])
                for step in range(20, 30):
                    tr.start_step(step)
                    idx = np.tile(np.arange(8), (len(b), 1))
                    tr.on_topk(0, idx)
                    tr.end_step(0.0)
                tr.end_batch()
        return sorted((r.request_id, r.step_idx) for r in read(out))

    a = run(tmp_path / "a", [[0, 1, 2, 3, 4, 5]])
    b = run(tmp_path / "b", [[0, 1], [2], [3, 4, 5]])
    assert a == b
    assert 0 < len(a) < 60  # some but not all of the 60 (request, step) pairs
    u = sample_uniform(np.arange(1000, dtype=np.uint64), 7)
    assert (u >= 0).all() and (u < 1).all() and 0.4 < u.mean() < 0.6


def test_other_ranks_are_noops(tmp_path):
    tr = Tracer(TraceSettings(), tmp_path / "t", run_name="r", dataset="d", rank=1, world_size=2)
    tr.begin_batch([0], [[1, 2]])
    tr.start_step(2)
    tr.on_topk(0, np.array([[0, 1]]))
    tr.end_step(0.1)
    tr.end_batch()
    assert tr.close() is None
    assert not (tmp_path / "t").exists()


def test_bad_input_fails_clearly(tmp_path):
    tr = Tracer(TraceSettings(), tmp_path / "t", run_name="r", dataset="d", kv_bytes_per_token=1)
    with pytest.raises(ValueError, match=r"request ids are ints .*got 'a'"):
        tr.begin_batch(["a"], [[1]])
    with pytest.raises(ValueError, match=r"admission order: expected \[0, 1\], got \[1, 0\]"):
        tr.begin_batch([1, 0], [[1], [2]])
    with pytest.raises(ValueError, match="ints"):
        tr.begin_batch([True], [[1]])
    tr.begin_batch([0, 1], [[1, 2, 3], [4, 5]])
    tr.start_step(3)
    with pytest.raises(ValueError, match="layer 0: selected position 4 >= seq_len_current 4"):
        tr.on_topk(0, np.array([[0, 4], [1, 2]]))
    with pytest.raises(ValueError, match="layer 1: indices must have shape"):
        tr.on_topk(1, np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="integers"):
        tr.on_topk(1, np.array([[0.0], [1.0]]))
    tr.on_topk(2, np.array([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="differs from the step's first layer"):
        tr.on_topk(3, np.array([[0, 1, 2], [1, 2, 3]]))
    tr.end_step(0.1)
    with pytest.raises(ValueError, match=r"expected \[2\], got \[0\]"):
        tr.begin_batch([0], [[1]])  # already traced
    assert tr.begin_batch(None, [[1]]) == [2]  # numbered by the tracer
    with pytest.raises(ValueError, match="kv_bytes_per_token"):
        Tracer(TraceSettings(), tmp_path / "u", run_name="r", dataset="d")
    with pytest.raises(ValueError, match="--trace-sample-rate"):
        TraceSettings(sample_rate=0)
    tr.close()


def test_torch_cpu_tensors_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    with Tracer(TraceSettings(store_scores=True), tmp_path / "t", run_name="r", dataset="d",
                kv_bytes_per_token=1) as tr:
        tr.begin_batch([0], [[1, 2, 3, 4]])
        tr.start_step(4)
        idx = torch.tensor([[4, 0, 2]])
        tr.on_topk(0, idx, torch.tensor([[0.5, 0.25, 1.0]], dtype=torch.bfloat16))
        idx[0, 0] = 1  # the tracer copied at on_topk
        tr.end_step(0.0)
    (rec,) = read(tmp_path / "t")
    assert rec.selected_token_pos == [0, 2, 4]
    assert rec.scores_topk == [0.25, 1.0, 0.5]


def test_numpy_tracing_never_imports_torch(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from kvtier.trace.tracer import Tracer\nfrom kvtier.trace.settings import TraceSettings\n"
        f"with Tracer(TraceSettings(), {str(tmp_path / 't')!r}, run_name='r', dataset='d', kv_bytes_per_token=1) as tr:\n"
        "    tr.begin_batch([0], [[1, 2]]); tr.start_step(2); tr.on_topk(0, np.array([[0, 2]])); tr.end_step(0.0)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_requests_jsonl_lists_every_admitted_request(tmp_path):
    """One line per admitted request, keyed by its int id, with the caller's dataset identity
    and the tracer's own facts, including requests that never reach a decode step."""
    with Tracer(TraceSettings(kv_block_size=4, prefix_key_tokens=8), tmp_path / "t",
                run_name="r", dataset="d", kv_bytes_per_token=1) as tr:
        tr.begin_batch([0, 1], [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9]],
                       [{"sample_id": "ruler-a", "request_id": "ignored"}, {"sample_id": "b"}])
        tr.start_step(9)
        tr.on_topk(0, np.array([[0, 8], [1, 2]]))
        tr.end_step(None)
        tr.end_batch()
        tr.begin_batch(None, [[5]], [{"sample_id": "c", "turn": 2}])
        tr.end_batch()
    lines = [msgspec.json.decode(x) for x in (tmp_path / "t" / "requests.jsonl").read_bytes().splitlines()]
    assert [x["request_id"] for x in lines] == [0, 1, 2]
    assert lines[0]["sample_id"] == "ruler-a" and lines[2]["turn"] == 2
    assert [x["prompt_len"] for x in lines] == [9, 5, 1]
    assert [x["batch"] for x in lines] == [0, 0, 1]
    assert [x["prefix_blocks"] for x in lines] == [2, 1, 0]
    assert lines[1]["prefix_cached_blocks"] == 1 and lines[2]["prefix_key"] is None
    assert {r.request_id for r in read(tmp_path / "t")} == {0, 1}
