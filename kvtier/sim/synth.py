"""Synthetic DSA-like access streams for policy tests, benchmarks and policy design.

Real traces need the model; policies need realistic streams now. This mimics what the DSA
indexer selects (``dsa_model.md`` §6): the attention-sink prefix, the most recent window,
and the rest drawn from a per-request, per-layer importance field (contiguous "topic" bumps
shared across layers plus layer-specific noise), re-sampled every step with Gumbel noise so
selections are persistent but volatile. Records come in trace order: step, layer, request.
No torch; vectorised per record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from kvtier.schema import (
    REQUESTS_FILE,
    KVFetch,
    PrefixInfo,
    TierFetch,
    TokensPerBlock,
    TopkRecord,
    empty_tier,
)
from kvtier.sim.access import AccessStream


@dataclass(frozen=True, slots=True)
class SynthConfig:
    """Shape of the synthetic workload (defaults: small enough for tests)."""

    requests: int = 4
    layers: int = 4
    steps: int = 32
    prompt_len: int = 2048
    prompt_jitter: int = 512  # prompt lengths vary in [prompt_len - j, prompt_len + j]
    topk: int = 256
    sink: int = 4  # attention-sink tokens always selected
    window: int = 32  # most recent tokens always selected
    topics: int = 12  # contiguous important spans per request
    topic_width: int = 48  # tokens per span (Gaussian bump sigma)
    layer_noise: float = 1.0  # per-layer deviation from the shared field
    temperature: float = 0.6  # Gumbel noise scale: higher = more volatile selections
    stagger: int = 4  # request r starts decoding at step r * stagger
    block_size: int = 64
    seed: int = 0


def _fields(cfg: SynthConfig, rng: np.random.Generator, length: int) -> np.ndarray:
    """Importance log-field per layer, shape [layers, length]."""
    x = np.arange(length, dtype=np.float64)
    centers = rng.uniform(0, length, cfg.topics)
    heights = rng.exponential(3.0, cfg.topics)
    base = np.zeros(length)
    for c, h in zip(centers, heights, strict=True):
        base += h * np.exp(-0.5 * ((x - c) / cfg.topic_width) ** 2)
    noise = rng.normal(0.0, cfg.layer_noise, (cfg.layers, length))
    return base[None, :] + noise


def synth_stream(cfg: SynthConfig = SynthConfig()) -> AccessStream:
    """Generate an ``AccessStream`` (positions sorted per record)."""
    rng = np.random.default_rng(cfg.seed)
    jit = rng.integers(-cfg.prompt_jitter, cfg.prompt_jitter + 1, cfg.requests)
    prompts = np.maximum(cfg.prompt_len + jit, cfg.topk // 2 + cfg.sink + cfg.window + 1)
    fields = [_fields(cfg, rng, int(p) + cfg.steps + 1) for p in prompts]
    req, layer, step, seq_len, chunks = [], [], [], [], []
    total_steps = cfg.steps + cfg.stagger * (cfg.requests - 1)
    for t in range(total_steps):
        for li in range(cfg.layers):
            for r in range(cfg.requests):
                s = t - r * cfg.stagger
                if s < 0 or s >= cfg.steps:
                    continue
                n = int(prompts[r]) + s + 1
                k = min(cfg.topk, n)
                fixed = np.unique(np.concatenate([
                    np.arange(min(cfg.sink, n)), np.arange(max(0, n - cfg.window), n)]))
                m = k - fixed.shape[0]
                if m > 0:
                    score = fields[r][li, :n] + cfg.temperature * rng.gumbel(size=n)
                    score[fixed] = -np.inf
                    pick = np.argpartition(score, n - m)[n - m:]
                    sel = np.union1d(fixed, pick)
                else:
                    sel = fixed[:k]
                req.append(r)
                layer.append(li)
                step.append(s)
                seq_len.append(n)
                chunks.append(sel.astype(np.int64))
    lens = np.array([c.shape[0] for c in chunks], dtype=np.int64)
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return AccessStream(
        request_ids=list(range(cfg.requests)),
        req=np.array(req, dtype=np.int64), layer=np.array(layer, dtype=np.int64),
        step=np.array(step, dtype=np.int64), seq_len=np.array(seq_len, dtype=np.int64),
        offsets=offsets,
        pos=np.concatenate(chunks) if chunks else np.zeros(0, np.int64),
        block_size=cfg.block_size)


def write_trace(stream: AccessStream, out_dir: str | Path, run_name: str = "synth") -> Path:
    """Write ``stream`` as a schema-valid ``trace_steps.jsonl`` (HBM-only ``kv_fetch``) and
    its ``requests.jsonl`` (one line per request: its id, ``sample_id`` and prompt length),
    so the CLI and readers can be exercised without the model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc = msgspec.json.Encoder()
    first: dict[int, int] = {}
    for i, r in enumerate(stream.req.tolist()):
        first.setdefault(r, i)
    lines = [enc.encode({"request_id": int(rid), "sample_id": f"synth-{rid}",
                         "prompt_len": int(stream.seq_len[first[r]]) - 1 if r in first else None})
             for r, rid in enumerate(stream.request_ids)]
    (out / REQUESTS_FILE).write_bytes(b"".join(x + b"\n" for x in lines))
    bs = stream.block_size
    buf = bytearray()
    for i in range(len(stream)):
        pos = stream.pos[stream.offsets[i]:stream.offsets[i + 1]]
        cur = int(stream.seq_len[i]) - 1
        blocks, per = np.unique(pos // bs, return_counts=True)
        off = cur - pos if pos.shape[0] else np.zeros(1, np.int64)
        rec = TopkRecord(
            event="dsa_topk", run_name=run_name, dataset="synthetic", rank=0, world_size=1,
            request_id=stream.request_ids[int(stream.req[i])], layer_id=int(stream.layer[i]),
            step_idx=int(stream.step[i]), seq_len_current=int(stream.seq_len[i]),
            unique_token_pos_count=int(pos.shape[0]), offset_min=int(off.min()),
            offset_p50=float(np.percentile(off, 50)), offset_max=int(off.max()),
            block_size_tokens=bs, selected_block_ids=blocks.tolist(),
            unique_blocks=int(blocks.shape[0]),
            tokens_per_touched_block=TokensPerBlock(
                mean=float(per.mean()) if per.size else 0.0,
                p50=float(np.percentile(per, 50)) if per.size else 0.0,
                p95=float(np.percentile(per, 95)) if per.size else 0.0),
            kv_fetch=KVFetch(
                hbm=TierFetch(hit_blocks=blocks.tolist(), bytes_read=0, read_ops=1,
                              latency_us=None, batch_size=int(blocks.shape[0])),
                local_pool=empty_tier(), remote_pool=empty_tier()),
            prefix=PrefixInfo(prefix_cache_hit=False, prefix_cached_blocks=0, prefix_key=None,
                              intersection_ratio=0.0, intersection_blocks=[]),
            selected_token_pos=pos.tolist(), scores_stats=None)
        buf += enc.encode(rec)
        buf += b"\n"
    path = out / "trace_steps.jsonl"
    path.write_bytes(bytes(buf))
    return path
