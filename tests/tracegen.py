"""Small synthetic traces for the trace tests (the real tracer, a fake indexer)."""

from __future__ import annotations

from pathlib import Path

from kvtier.schema import Summary
from kvtier.trace.sanity import SanityConfig, run_sanity
from kvtier.trace.settings import TraceSettings


def make_trace(out: Path, store_scores: bool = False, shard_records: int = 0, **cfg) -> Summary:
    base = {"requests": 3, "batch_size": 2, "layers": 3, "prompt_len": 100, "shared_prefix": 48,
            "new_tokens": 5, "topk": 32}
    base.update(cfg)
    settings = TraceSettings(store_scores=store_scores, prefix_key_tokens=64, shard_records=shard_records)
    return run_sanity(out, SanityConfig(**base), settings)
