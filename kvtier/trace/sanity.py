"""A synthetic DSA-like trace without torch or a model: exercises the whole tracer path.

The fake indexer scores every visible position as locality (log-distance decay) + an attention
sink + per-layer noise and takes the top-k with ``np.argpartition``, which is enough to give
realistic-looking records (recent and first blocks hot, a sparse middle). Prompts share a
system prefix so point D sees prefix-cache hits.
"""

from __future__ import annotations

import os

import msgspec
import numpy as np

from kvtier.schema import Summary
from kvtier.trace.settings import TraceSettings
from kvtier.trace.tracer import Tracer


class SanityConfig(msgspec.Struct, frozen=True):
    """Shape of the synthetic run (all of it lands in summary.json's config)."""

    requests: int = 4
    batch_size: int = 2
    layers: int = 4
    prompt_len: int = 300
    shared_prefix: int = 128
    new_tokens: int = 16
    topk: int = 64
    vocab: int = 1000
    seed: int = 0

    def check(self) -> None:
        for name in ("requests", "batch_size", "layers", "prompt_len", "new_tokens", "topk", "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.shared_prefix <= self.prompt_len:
            raise ValueError(f"--shared-prefix must be in [0, --prompt-len], got {self.shared_prefix}")


def fake_topk(rng: np.random.Generator, n_rows: int, seq_len: int, k: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """[n_rows, min(k, seq_len)] indices and scores of a synthetic indexer."""
    pos = np.arange(seq_len)
    base = -np.log1p((seq_len - 1) - pos) * (0.5 + 0.1 * (layer % 4))
    base[:4] += 3.0  # attention sink
    scores = base[None, :] + rng.gumbel(size=(n_rows, seq_len))
    k = min(k, seq_len)
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return idx, np.take_along_axis(scores, idx, axis=1).astype(np.float32)


def run_sanity(out_dir: str | os.PathLike, cfg: SanityConfig, settings: TraceSettings,
               force: bool = False, progress: bool = False) -> Summary:
    """Write a synthetic trace with the real tracer; returns its summary."""
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    shared = rng.integers(0, cfg.vocab, cfg.shared_prefix)
    prompts = [np.concatenate([shared, rng.integers(0, cfg.vocab, cfg.prompt_len - cfg.shared_prefix)]).tolist()
               for _ in range(cfg.requests)]
    bpt = settings.kv_bytes_per_token or 1284
    n_batches = -(-cfg.requests // cfg.batch_size)
    tracer = Tracer(settings, out_dir, run_name="sanity", dataset="synthetic",
                    kv_bytes_per_token=bpt, config={"sanity": msgspec.structs.asdict(cfg)}, force=force)
    from tqdm import tqdm

    with tracer, tqdm(total=n_batches * cfg.new_tokens, desc="sanity", unit="step",
                      disable=not progress) as bar:
        for b in range(n_batches):
            ids = list(range(b * cfg.batch_size, min(cfg.requests, (b + 1) * cfg.batch_size)))
            tracer.begin_batch(ids, [prompts[i] for i in ids],
                               [{"sample_id": f"synthetic-{i}", "shared_prefix": cfg.shared_prefix}
                                for i in ids])
            for t in range(cfg.new_tokens):
                start = cfg.prompt_len + t
                tracer.start_step(start)
                for layer in range(cfg.layers):
                    idx, sc = fake_topk(rng, len(ids), start + 1, cfg.topk, layer)
                    tracer.on_topk(layer, idx, sc)
                tracer.end_step(1e-3)
                bar.update()
            tracer.end_batch()
    assert tracer.summary is not None
    return tracer.summary
