"""Synthetic DSA-like access streams and traces, with the temporal locality policies need.

Real traces need the model; policy design and tests need realistic streams now. This mimics
what the DSA indexer selects (``dsa_model.md`` §6): the attention-sink prefix, the most recent
window, and the rest drawn from a per-request, per-layer importance field (contiguous "topic"
bumps shared across layers plus layer-specific noise) that stays fixed while the request
decodes; only a Gumbel perturbation (``temperature``) is redrawn every step, so selections
are persistent but volatile. (``kvtier sanity``'s fake indexer has no such field: its
selections are redrawn every step and carry no reuse beyond the recent window.)

Requests decode concurrently: request ``r`` starts ``r * stagger`` decode steps after request
0 and decodes ``steps`` tokens. Records come in trace order: decode step, layer, request.
``step_idx`` is the position of the token being decoded (``seq_len_current - 1``; a request's
first record has ``step_idx`` = its prompt length), as the design note defines it, so rows
share one (step, layer) fetch only where they share a position (``stagger = 0`` and
``prompt_jitter = 0``), as the rows of one tracer batch do. ``write_trace`` writes a stream as
a trace directory that ``kvtier validate`` accepts; ``kvtier synth`` is the command.
No torch; vectorised per record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtier.policies.base import MAX_LAYER
from kvtier.schema import (
    EVENT_DSA_TOPK,
    SCHEMA_VERSION,
    SUMMARY_FILE,
    TRACE_FILE,
    PrefixInfo,
    TokensPerBlock,
    TopkRecord,
    TraceMeta,
    record_encoder,
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

    def check(self) -> None:
        """Raise ValueError naming the first invalid field (as its ``kvtier synth`` flag)."""
        flag = {"block_size": "kv-block-size"}
        for name in ("requests", "layers", "steps", "prompt_len", "topk", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{flag.get(name, name.replace('_', '-'))} must be > 0, "
                                 f"got {getattr(self, name)}")
        for name in ("prompt_jitter", "sink", "window", "topics", "layer_noise", "temperature",
                     "stagger"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, "
                                 f"got {getattr(self, name)}")
        if not self.topic_width > 0:
            raise ValueError(f"--topic-width must be > 0, got {self.topic_width}")
        if self.layers - 1 > MAX_LAYER:
            raise ValueError(f"--layers must be at most {MAX_LAYER + 1}, got {self.layers}")


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


def synth_stream(cfg: SynthConfig = SynthConfig(), progress: bool = False) -> AccessStream:
    """Generate an ``AccessStream`` (positions sorted per record; ``step`` = position);
    ``progress`` shows a tqdm bar over decode steps."""
    from tqdm import tqdm

    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    jit = rng.integers(-cfg.prompt_jitter, cfg.prompt_jitter + 1, cfg.requests)
    prompts = np.maximum(cfg.prompt_len + jit, cfg.topk // 2 + cfg.sink + cfg.window + 1)
    fields = [_fields(cfg, rng, int(p) + cfg.steps + 1) for p in prompts]
    req, layer, step, seq_len, chunks = [], [], [], [], []
    total_steps = cfg.steps + cfg.stagger * (cfg.requests - 1)
    for t in tqdm(range(total_steps), desc="synth", unit="step", disable=not progress):
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
                step.append(n - 1)  # the position of the token being decoded
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


def write_trace(stream: AccessStream, out_dir: str | Path, run_name: str = "synth", *,
                dataset: str = "synthetic", kv_bytes_per_token: int = 656,
                config: dict | None = None, force: bool = False, progress: bool = False
                ) -> Path:
    """Write ``stream`` as a trace directory that ``kvtier validate`` accepts and every reader
    takes: ``trace_meta.json`` (``config`` merged into the tracer's keys), ``requests.jsonl``
    (per request its id, ``sample_id`` and prompt length), ``trace_steps.jsonl`` and
    ``summary.json``. ``kv_fetch`` is what the default ``HBMOnlyBackend`` answers (every block
    an HBM hit, whole blocks of ``kv_bytes_per_token`` bytes per token read, no latency: there
    is no wall time); ``prefix`` is empty (synthetic prompts have no token ids to hash).

    ``stream.step`` must be the position of the token being decoded
    (``seq_len - 1``, the schema's ``step_idx``), else ``ValueError``; an existing trace in
    ``out_dir`` is refused (``FileExistsError``) unless ``force``; ``progress`` shows a tqdm
    bar over records. Returns the JSONL path.
    """
    from tqdm import tqdm

    from kvtier.backend import HBMOnlyBackend
    from kvtier.sim.replay import iter_batches
    from kvtier.trace.settings import TraceSettings
    from kvtier.trace.summary import SummaryBuilder
    from kvtier.trace.writer import RequestLog, TraceWriter, write_json_atomic

    bad = np.flatnonzero(stream.step != stream.seq_len - 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"record {i + 1}: step_idx {int(stream.step[i])} is not the position of "
                         f"the token being decoded (seq_len_current - 1 = "
                         f"{int(stream.seq_len[i]) - 1})")
    bs = stream.block_size
    settings = TraceSettings(kv_block_size=bs, kv_bytes_per_token=kv_bytes_per_token)
    full_config = {"kv_block_size_tokens": bs, "trace": settings.to_dict(),
                   "kv_bytes_per_token": kv_bytes_per_token, "backend": HBMOnlyBackend.name,
                   "rank": 0, "world_size": 1, **(config or {})}
    out = Path(out_dir)
    meta = TraceMeta(schema_version=SCHEMA_VERSION, run_name=run_name, dataset=dataset,
                     config=full_config)
    writer = TraceWriter(out, meta, force=force, background=False)
    n = len(stream)
    first = np.full(len(stream.request_ids), n, dtype=np.int64)
    np.minimum.at(first, stream.req, np.arange(n, dtype=np.int64))
    log = RequestLog(out)
    log.write([{"request_id": int(rid), "sample_id": f"synth-{rid}",
                "prompt_len": int(stream.step[first[r]]) if first[r] < n else None,
                "prefix_key": None, "prefix_blocks": 0, "prefix_cached_blocks": 0}
               for r, rid in enumerate(stream.request_ids)])
    log.close()
    backend = HBMOnlyBackend(kv_bytes_per_token)
    builder = SummaryBuilder(run_name, dataset, full_config)
    enc = record_encoder()
    no_prefix = PrefixInfo(prefix_cache_hit=False, prefix_cached_blocks=0, prefix_key=None,
                           intersection_ratio=0.0, intersection_blocks=[])
    bar = tqdm(total=n, desc="write", unit="rec", disable=not progress)
    try:
        for a, _b, access in iter_batches(stream):
            recs = []
            for j, kv in enumerate(backend.fetch(access)):
                i = a + j
                pos, blocks = access.token_pos[j], access.block_ids[j]
                per = np.diff(np.flatnonzero(np.r_[True, np.diff(pos // bs) != 0, True]))
                off = int(stream.step[i]) - pos
                p50, p95 = np.percentile(per, [50, 95])
                recs.append(TopkRecord(
                    event=EVENT_DSA_TOPK, run_name=run_name, dataset=dataset, rank=0,
                    world_size=1, request_id=int(access.request_ids[j]),
                    layer_id=access.layer_id, step_idx=access.step_idx,
                    seq_len_current=int(stream.seq_len[i]),
                    unique_token_pos_count=int(pos.shape[0]), offset_min=int(off.min()),
                    offset_p50=float(np.percentile(off, 50)), offset_max=int(off.max()),
                    block_size_tokens=bs, selected_block_ids=blocks.tolist(),
                    unique_blocks=int(blocks.shape[0]),
                    tokens_per_touched_block=TokensPerBlock(
                        mean=float(per.mean()), p50=float(p50), p95=float(p95)),
                    kv_fetch=kv, prefix=no_prefix, selected_token_pos=pos.tolist(),
                    scores_stats=None))
            builder.add_records(recs)
            writer.write(b"".join(enc.encode(r) + b"\n" for r in recs), len(recs))
            bar.update(len(recs))
    finally:
        writer.close()
        bar.close()
    write_json_atomic(out / SUMMARY_FILE, builder.build())
    return out / TRACE_FILE
