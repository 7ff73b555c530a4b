"""The kvtier trace format: one ``dsa_topk`` record per decode step x request x layer.

Field order and nesting are part of the format (``docs/INSTRUMENTATION.md`` defines every
field). Everything here is plain msgspec, so reading and validating traces never needs torch.
"""

from __future__ import annotations

from typing import Literal

import msgspec

TRACE_FILE = "trace_steps.jsonl"
PARQUET_FILE = "trace_steps.parquet"
SUMMARY_FILE = "summary.json"
META_FILE = "trace_meta.json"
EVENT_DSA_TOPK = "dsa_topk"
#: 2: the design note's §5.2 form (int request_id, block-id lists in kv_fetch.*.hit_blocks
#: and prefix.intersection_blocks, batch_size = blocks of the tier's batch_get); 1: kvtier's
#: earlier form (``kvtier convert --upgrade`` turns it into 2)
SCHEMA_VERSION = 2
REQUESTS_FILE = "requests.jsonl"

TIER_NAMES = ("hbm", "local_pool", "remote_pool")

class TraceError(Exception):
    """A trace directory or file that cannot be read; the message names file and place."""


#: Percentiles everywhere in kvtier use linear interpolation between closest ranks
#: (numpy's default ``method="linear"``, Hyndman & Fan type 7).
PERCENTILE_METHOD = "linear"


class TokensPerBlock(msgspec.Struct, forbid_unknown_fields=True):
    """How many selected tokens fall into each touched block."""

    mean: float
    p50: float
    p95: float


class TierFetch(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """What one tier served for one record (point C).

    ``hit_blocks``: the sorted block ids this tier served; the three tiers' lists partition
    the record's ``selected_block_ids``. ``batch_size``: the blocks this tier's batch_get
    covered (``len(hit_blocks)``). A backend may hand ``hit_blocks`` as any sorted int
    sequence (a numpy array view of ``LayerAccess.block_ids`` costs nothing); kvtier's
    encoders (``record_encoder``) write it as a JSON list. Decoded records hold lists.

    ``gc=False`` (and ``KVFetch``'s): the tracer keeps a whole step of these alive at once;
    untracked by the cyclic GC they trigger no collections (they cannot form cycles), which
    keeps the tracer's numba path at its speed (tests/test_tracer_fast.py, BENCHMARKS.md).
    """

    hit_blocks: list[int]
    bytes_read: int
    read_ops: int
    latency_us: float | None
    batch_size: int


def empty_tier() -> TierFetch:
    """A tier that served nothing (``hit_blocks`` an empty tuple: no allocation to track)."""
    return TierFetch(hit_blocks=(), bytes_read=0, read_ops=0, latency_us=None, batch_size=0)


class KVFetch(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    hbm: TierFetch
    local_pool: TierFetch
    remote_pool: TierFetch


class PrefixInfo(msgspec.Struct, forbid_unknown_fields=True):
    """Overlap of the record's touched blocks with the request's shareable prompt prefix (point D)."""

    prefix_cache_hit: bool
    prefix_cached_blocks: int
    prefix_key: str | None
    intersection_ratio: float
    intersection_blocks: list[int]


class ScoresStats(msgspec.Struct, forbid_unknown_fields=True):
    min: float
    mean: float
    max: float


class TopkRecord(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One decode step x request x layer: the indexer's top-k (A), its blocks (B),
    the per-tier fetch cost (C) and the prefix overlap (D)."""

    event: Literal["dsa_topk"]
    run_name: str
    dataset: str
    rank: int
    world_size: int
    request_id: int
    layer_id: int
    step_idx: int
    seq_len_current: int
    unique_token_pos_count: int
    offset_min: int
    offset_p50: float
    offset_max: int
    block_size_tokens: int
    selected_block_ids: list[int]
    unique_blocks: int
    tokens_per_touched_block: TokensPerBlock
    kv_fetch: KVFetch
    prefix: PrefixInfo
    selected_token_pos: list[int]
    scores_stats: ScoresStats | None
    scores_topk: list[float] | msgspec.UnsetType = msgspec.UNSET


class Distribution(msgspec.Struct, forbid_unknown_fields=True):
    """Summary of a sample; all but ``count`` are null for an empty sample."""

    count: int
    min: float | None
    p50: float | None
    p95: float | None
    max: float | None
    mean: float | None


class LatencyMs(msgspec.Struct, forbid_unknown_fields=True):
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


class Serving(msgspec.Struct, forbid_unknown_fields=True):
    requests: int
    latency_ms: LatencyMs
    batch_size: int
    max_new_tokens_cap: int


class HotBlock(msgspec.Struct, forbid_unknown_fields=True):
    """One touched prefix block of a request in ``summary.prefix_hot_blocks``."""

    block_id: int
    touch_count: int


class Summary(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``summary.json``: the run's settings and the distributions its records show.

    The first block is recomputable from ``trace_steps.jsonl`` + ``trace_meta.json``
    alone (``kvtier summarize``). The optional sections are filled by the producer
    that knows them: ``serving`` by the BurstGPT runner, ``skipped`` by dataset
    runners, ``tiers`` / ``stall`` / ``fetch_vs_recompute`` by the tiered backend.
    """

    run_name: str
    dataset: str
    config: dict
    records: int
    requests: int
    unique_blocks: Distribution
    tokens_per_touched_block: Distribution
    offsets: Distribution
    prefix_intersection_ratio: Distribution
    prefix_hot_blocks: dict[str, list[HotBlock]]
    serving: Serving | None = None
    skipped: dict[str, int] | None = None
    tiers: dict | None = None
    stall: dict | None = None
    fetch_vs_recompute: dict | None = None


class TraceMeta(msgspec.Struct, forbid_unknown_fields=True):
    """``trace_meta.json``: written when a trace is opened, so a trace directory explains itself
    even if the run is killed before ``summary.json`` exists."""

    schema_version: int
    run_name: str
    dataset: str
    config: dict
    format: Literal["jsonl", "parquet"] = "jsonl"
    shards: list[str] = []


def _enc_hook(obj: object) -> object:
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars (hit_blocks)
    if tolist is not None:
        return tolist()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def record_encoder() -> msgspec.json.Encoder:
    """The JSON encoder for records and their parts (numpy ``hit_blocks`` become lists)."""
    return msgspec.json.Encoder(enc_hook=_enc_hook)


def record_decoder() -> msgspec.json.Decoder[TopkRecord]:
    return msgspec.json.Decoder(TopkRecord)
