"""The tracer's CUDA path (pinned non-blocking copies, events, the background builder, the
reuse of pinned buffer sets across steps in flight) run on the CPU with a stand-in CUDA
tensor: it must write the same trace as host arrays. (benchmarks/check_tracer_cuda.py checks
the real thing on a GPU.)"""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.trace.settings import TraceSettings
from kvtier.trace.tracer import Tracer

torch = pytest.importorskip("torch")


class FakeCudaTensor:
    """What the tracer sees of a CUDA tensor: a torch type, ``is_cuda``, shape, dtype, detach."""

    __module__ = "torch.fake"
    is_cuda = True

    def __init__(self, arr: np.ndarray) -> None:
        self._t = torch.from_numpy(arr)
        self.shape, self.dtype = self._t.shape, self._t.dtype

    def detach(self):
        return self._t


class FakeEvent:
    recorded = synchronized = 0

    def record(self) -> None:
        FakeEvent.recorded += 1

    def synchronize(self) -> None:
        FakeEvent.synchronized += 1


@pytest.fixture
def fake_cuda(monkeypatch):
    empty = torch.empty

    def cpu_empty(*args, pin_memory=False, **kw):  # no pinned memory without a GPU
        return empty(*args, **kw)

    monkeypatch.setattr(torch, "empty", cpu_empty)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.recorded = FakeEvent.synchronized = 0


def _run(out, device: bool, scores: bool, mode: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    st = TraceSettings(kv_block_size=16, store_scores=scores, sample_rate=0.8, prefix_key_tokens=32)
    with Tracer(st, out, run_name="r", dataset="d", kv_bytes_per_token=10,
                build_in_background=mode, max_pending_steps=2) as tr:
        for _ in range(2):
            prompts = [rng.integers(0, 9, int(rng.integers(40, 90))).tolist() for _ in range(3)]
            tr.begin_batch(None, prompts)
            for step in range(100, 108):
                tr.start_step(step, (rng.random(3) < 0.8).tolist())
                for layer in range(3):
                    idx = np.stack([rng.choice(step + 1, 24, replace=False) for _ in range(3)])
                    sc = rng.normal(size=idx.shape).astype(np.float32) if scores else None
                    if device:
                        idx, sc = FakeCudaTensor(idx), None if sc is None else FakeCudaTensor(sc)
                    tr.on_topk(layer, idx, sc)
                tr.end_step(1e-3)
            tr.end_batch()
    assert tr.build_stats["caller_steps" if mode == "never" else "background_steps"] == 16
    return (out / "trace_steps.jsonl").read_bytes() + (out / "summary.json").read_bytes()


@pytest.mark.filterwarnings("ignore:trace. the model waited")  # a queue of 2 may fill up
@pytest.mark.parametrize("scores", [False, True])
@pytest.mark.parametrize("mode", ["cuda", "never"])
def test_cuda_path_writes_the_host_trace(tmp_path, fake_cuda, scores, mode):
    host = _run(tmp_path / "host", False, scores, "never", 7)
    dev = _run(tmp_path / "dev", True, scores, mode, 7)
    assert dev == host
    # one event per copy; the step waits on each layer's last one before reading it
    assert FakeEvent.synchronized == 2 * 8 * 3
    assert FakeEvent.recorded == FakeEvent.synchronized * (2 if scores else 1)
