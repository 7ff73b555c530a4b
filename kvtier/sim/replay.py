"""Offline replay: run a recorded trace's selections through any KVBackend and policy.

The input is read twice. First as an access stream (``kvtier.sim.access``: validated numpy
columns) to learn when each request starts and ends and, for offline policies, the exact
future key stream. Then record by record: consecutive records of one (step, layer) form one
``LayerAccess`` (so the key stream is the trace order), the backend serves it, and each record
is written again with ``kv_fetch`` replaced. Requests are admitted at their first record with
``prompt_len = seq_len_current - 1`` and released after their last one. No torch.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from kvtier.backend import HBMOnlyBackend, KVBackend, LayerAccess
from kvtier.schema import (
    META_FILE,
    SUMMARY_FILE,
    TRACE_FILE,
    TokensPerBlock,
    TopkRecord,
    TraceMeta,
)
from kvtier.sim.access import AccessStream, TraceReadError, read_access_stream, rebucket
from kvtier.trace.reader import TraceError, find_trace, iter_records, iter_records_with_lines
from kvtier.trace.summary import SummaryBuilder, backend_sections


class ReplayError(ValueError):
    """Bad input or settings for a replay; one line naming the file, field or flag."""


@dataclass
class ReplaySettings:
    """Everything that selects the backend and policies (recorded in the output's config)."""

    backend: str = "sim"
    tiers: str = "memfabric"
    policy: str = "lru"
    pool_policy: str = "lru"
    placement: str = "local_first"
    prefetch: str = "none"
    migration: str = "none"
    block_size: int | None = None
    fetch_granularity: int | None = None
    write_policy: str | None = None
    hbm_blocks: int | None = None
    on_release: str | None = None
    model_config: str | None = None
    kv_bytes_per_token: int | None = None
    overrides: dict = field(default_factory=dict)


@dataclass
class ReplayResult:
    out_dir: Path
    records: int
    accesses: int
    seconds: float
    summary: dict | None


def _read_meta(trace: Path) -> dict:
    p = trace / META_FILE if trace.is_dir() else trace.parent / META_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_bytes())
    except ValueError as exc:
        raise ReplayError(f"{p}: not valid JSON: {exc}") from None


def build_backend(s: ReplaySettings, stream: AccessStream, block_size: int,
                  future: np.ndarray | None = None, meta: dict | None = None) -> KVBackend:
    """The backend named by ``s`` (errors name the flag or config field). The HBM backend
    defaults to the trace's own ``kv_bytes_per_token``; the tier emulator to its config's."""
    from kvtier.sim.tiers.config import ConfigError, load_tier_config

    if s.backend == "hbm":
        recorded = ((meta or {}).get("config") or {}).get("kv_bytes_per_token")
        return HBMOnlyBackend(int(s.kv_bytes_per_token or recorded or 656))
    if s.backend != "sim":
        raise ReplayError(f"--backend must be 'hbm' or 'sim', got {s.backend!r}")
    from kvtier.sim.tiers.backend import TieredBackend
    from kvtier.sim.tiers.recompute import load_model_dims
    from kvtier.sim.tiers.specs import PolicySpecError

    over = dict(s.overrides)
    for key in ("fetch_granularity", "write_policy", "on_release", "kv_bytes_per_token"):
        if getattr(s, key) is not None:
            over[key] = getattr(s, key)
    over["block_size"] = block_size
    try:
        cfg = load_tier_config(s.tiers, over)
        if s.hbm_blocks is not None:
            over["hbm"] = {"capacity_bytes": s.hbm_blocks * block_size * cfg.kv_bytes_per_token}
            cfg = load_tier_config(s.tiers, over)
        n_layers = int(stream.layer.max()) + 1 if len(stream) else 1
        return TieredBackend(
            cfg, num_layers=n_layers, eviction=s.policy, pool_eviction=s.pool_policy,
            placement=s.placement, prefetch=s.prefetch, migration=s.migration,
            model=load_model_dims(s.model_config), future_keys=future)
    except (ConfigError, PolicySpecError) as exc:
        raise ReplayError(str(exc)) from None


def _needs_future(s: ReplaySettings) -> bool:
    if s.backend != "sim":
        return False
    from kvtier.policies.registry import PolicyNotFound, load_policy
    from kvtier.sim.tiers.specs import parse_spec

    try:
        return bool(getattr(load_policy(parse_spec(s.policy)[0]), "offline", False))
    except PolicyNotFound as exc:
        raise ReplayError(f"--policy {s.policy!r}: {exc}") from None


def token_columns(stream: AccessStream, blocked) -> tuple[np.ndarray, np.ndarray]:
    """Per selected token its offset from the newest token (``seq_len - 1 - pos``), and per
    touched block (``blocked`` order) its number of selected tokens: the summary's inputs,
    computed for the whole trace in a few numpy passes instead of once per batch."""
    lens = np.diff(stream.offsets)
    offsets = np.repeat(stream.seq_len - 1, lens) - stream.pos
    n = stream.pos.shape[0]
    if n == 0:
        return offsets, np.zeros(0, dtype=np.int64)
    blk = stream.pos // blocked.block_size
    start = np.ones(n, dtype=bool)
    start[1:] = blk[1:] != blk[:-1]
    start[stream.offsets[:-1][lens > 0]] = True  # a record's first token starts a block
    edges = np.flatnonzero(start)
    return offsets, np.diff(np.append(edges, n))


def _summarize_batch(builder: SummaryBuilder, batch: list, a: int, stream: AccessStream,
                     blocked, tok_off: np.ndarray, tpb: np.ndarray) -> None:
    """``builder.add_records(batch)`` from the access-stream columns of records a.. (the same
    numbers for a valid trace, without per-record array building; tested against it)."""
    b = a + len(batch)
    boff = blocked.offsets
    k = np.array([r.prefix.intersection_blocks for r in batch], dtype=np.int64)
    k = np.clip(k, 0, np.diff(boff[a:b + 1]))
    first = boff[a:b]
    take = np.repeat(first, k) + (np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k))
    builder.add([r.request_id for r in batch],
                np.array([r.unique_blocks for r in batch], dtype=np.int64),
                tpb[boff[a]:boff[b]], tok_off[stream.offsets[a]:stream.offsets[b]],
                np.array([r.prefix.intersection_ratio for r in batch], dtype=np.float64),
                np.repeat(np.arange(len(batch), dtype=np.int64), k), blocked.blocks[take])


def prefix_hashes(prefix_key: str | None, prompt_len: int, prefix_tokens: int, bs: int
                  ) -> list[int]:
    """Per-block hashes standing in for the tracer's chained prefix hashes, which records do
    not carry: equal ``prefix_key`` means equal first ``n`` blocks (n = full blocks in the
    first ``prefix_tokens`` tokens), so requests with one key share those blocks. Partial
    matches (``prefix_cached_blocks`` < n) are not reconstructed."""
    if not prefix_key:
        return []
    n = min(prompt_len, prefix_tokens) // bs
    base = int(prefix_key, 16)
    return [(base ^ (i * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF for i in range(n)]


class _PrefixKey(msgspec.Struct):
    prefix_key: str | None = None


class _FirstPrefix(msgspec.Struct):
    """The two fields the offline pre-pass needs (msgspec skips the rest of each line)."""

    request_id: str
    prefix: _PrefixKey


def _iter_first_prefix(tf) -> Iterator[tuple[str, str | None]]:
    """(request id, prefix_key) of every record; only read for offline policies."""
    for rec in iter_records(tf, _FirstPrefix):
        yield rec.request_id, rec.prefix.prefix_key


def aliased_key_stream(stream: AccessStream, bs: int, hashes: list[list[int]]) -> np.ndarray:
    """The HBM key stream the tiered backend will see: ``key_stream`` with shared prefix
    blocks read under their first owner's keys (``hashes`` per request, admission order)."""
    from kvtier.sim.tiers.keyspace import KeySpace

    blocked = rebucket(stream, bs)
    keys = blocked.keys()
    ks = KeySpace()
    for name, h in zip(stream.request_ids, hashes, strict=True):
        ks.admit(name, h)
    if not any(ks.shared_blocks(i) for i in range(len(hashes))):
        return keys
    off = blocked.offsets
    for i in range(len(stream)):
        r = int(stream.req[i])
        if ks.shared_blocks(r):
            keys[off[i]:off[i + 1]] = ks.keys(r, int(stream.layer[i]), blocked.blocks[off[i]:off[i + 1]])
    return keys


def _pass_record_type() -> type:
    """``TopkRecord`` with ``selected_token_pos`` kept as raw JSON bytes: the replay rewrites
    ``kv_fetch`` only, and the positions were already validated by the access-stream read,
    so the longest field is neither parsed nor re-encoded."""
    spec = []
    for f in msgspec.structs.fields(TopkRecord):
        typ = msgspec.Raw if f.name == "selected_token_pos" else f.type
        spec.append((f.name, typ) if f.default is msgspec.NODEFAULT else (f.name, typ, f.default))
    return msgspec.defstruct("PassRecord", spec, forbid_unknown_fields=True, omit_defaults=True)


_PassRecord = _pass_record_type()


# ``"kv_fetch": {...}`` with its value: an object of objects of scalars (KVFetch of TierFetch)
_KV_FETCH = re.compile(rb'"kv_fetch"\s*:\s*\{(?:[^{}]|\{[^{}]*\})*\}')
_KV_KEY = b'"kv_fetch"'


def splice_kv_fetch(line: bytes, kv_json: bytes) -> bytes | None:
    """``line`` with its top-level ``kv_fetch`` value replaced by ``kv_json``, every other byte
    kept; None if the span cannot be located (the caller re-encodes the record then). Only for
    lines that decoded as a valid record: nested objects of a record have no ``kv_fetch`` key
    and a string value cannot be followed by ``:``, so the first match is the field."""
    start = line.find(_KV_KEY)
    while start >= 0:
        m = _KV_FETCH.match(line, start)
        if m is not None:
            return b"".join((line[:start], b'"kv_fetch":', kv_json, line[m.end():]))
        start = line.find(_KV_KEY, start + 1)
    return None


def _rebucket_record(rec, pos: np.ndarray, blocks: np.ndarray, bs: int) -> None:
    """Rewrite a record's block fields for another block size (point B at ``bs``)."""
    per = np.unique(pos // bs, return_counts=True)[1] if pos.size else np.zeros(1, np.int64)
    rec.block_size_tokens = bs
    rec.selected_block_ids = blocks.tolist()
    rec.unique_blocks = int(blocks.shape[0])
    p50, p95 = np.percentile(per, [50, 95])
    rec.tokens_per_touched_block = TokensPerBlock(mean=float(per.mean()), p50=float(p50),
                                                  p95=float(p95))


def replay(trace: str | Path, out_dir: str | Path, settings: ReplaySettings, *,
           force: bool = False, progress: bool = False) -> ReplayResult:
    """Replay ``trace`` into ``out_dir`` (trace, meta and summary); see the module doc."""
    import time

    trace, out = Path(trace), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ReplayError(f"{out}: exists and is not empty (use --force to overwrite)")
        if out.resolve() == trace.resolve() or out.resolve() in trace.resolve().parents:
            raise ReplayError(f"{out}: refusing to overwrite the input trace")
    try:
        stream = read_access_stream(trace)
        tf = find_trace(trace)
    except (TraceReadError, TraceError) as exc:
        raise ReplayError(str(exc)) from None
    bs = settings.block_size or stream.block_size
    meta_in = _read_meta(trace)
    trace_cfg = (meta_in.get("config") or {}).get("trace") or {}
    prefix_tokens = int(trace_cfg.get("prefix_key_tokens", 256))
    share = settings.backend == "sim" and bs == stream.block_size

    def hashes_for(prompt_len: int, key: str | None) -> list[int]:
        return prefix_hashes(key, prompt_len, prefix_tokens, bs) if share else []

    future = None
    if _needs_future(settings):
        keys_of = {}
        for rec in _iter_first_prefix(tf):
            keys_of.setdefault(rec[0], rec[1])
        prompt = {r: max(int(stream.seq_len[i]) - 1, 0) for i, r in
                  reversed(list(enumerate(stream.req.tolist())))}
        future = aliased_key_stream(stream, bs, [
            hashes_for(prompt[i], keys_of.get(name)) for i, name in enumerate(stream.request_ids)])
    backend = build_backend(settings, stream, bs, future, meta_in)

    n = len(stream)
    last_rec = np.full(len(stream.request_ids), -1, dtype=np.int64)
    np.maximum.at(last_rec, stream.req, np.arange(n, dtype=np.int64))
    ends_at: dict[int, list[str]] = {}
    for r, i in enumerate(last_rec.tolist()):
        ends_at.setdefault(i, []).append(stream.request_ids[r])
    use_wall = (meta_in.get("config") or {}).get("backend", "hbm") == "hbm"

    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(meta_in.get("config") or {})
    config["backend"] = getattr(backend, "name", settings.backend)
    config["replay"] = {"source": str(trace), **{k: v for k, v in vars(settings).items() if v}}
    run_name = str(meta_in.get("run_name") or "replay")
    dataset = str(meta_in.get("dataset") or "unknown")
    meta = TraceMeta(schema_version=int(meta_in.get("schema_version", 1)), run_name=run_name,
                     dataset=dataset, config=config, format="jsonl", shards=[])
    (out / META_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(meta)))
    builder = SummaryBuilder(run_name, dataset, config)
    enc = msgspec.json.Encoder()

    admitted: set[str] = set()
    seen = 0
    names, req, layer = stream.request_ids, stream.req.tolist(), stream.layer.tolist()
    blocked = rebucket(stream, bs)
    pos, poff, blk, boff = stream.pos, stream.offsets, blocked.blocks, blocked.offsets
    tok_off, tpb = token_columns(stream, blocked)
    t_start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="rec", desc="replay")
    with open(out / TRACE_FILE, "wb") as fh:
        batch: list = []
        lines: list[bytes | None] = []

        def flush() -> None:
            nonlocal seen
            if not batch:
                return
            ids, tps, bls = [], [], []
            for i, rec in enumerate(batch, start=seen):
                rid = rec.request_id
                if i >= n or rid != names[req[i]] or rec.layer_id != layer[i]:
                    raise ReplayError(f"{trace}: record {i + 1} differs between the two reads "
                                      "(was the trace modified during the replay?)")
                if rid not in admitted:
                    admitted.add(rid)
                    plen = max(int(rec.seq_len_current) - 1, 0)
                    backend.admit(rid, plen, hashes_for(plen, rec.prefix.prefix_key))
                ids.append(rid)
                tps.append(pos[poff[i]:poff[i + 1]])  # sorted, unique (kvtier.sim.access)
                bls.append(blk[boff[i]:boff[i + 1]])
            wall = batch[0].kv_fetch.hbm.latency_us if use_wall else None
            access = LayerAccess(step_idx=batch[0].step_idx, layer_id=batch[0].layer_id,
                                 request_ids=ids, token_pos=tps, block_ids=bls, block_size=bs,
                                 step_wall_us=wall)
            got = backend.fetch(access)
            out_lines = []
            for rec, line, kv, p, blocks in zip(batch, lines, got, tps, bls, strict=True):
                new = None
                if line is not None and bs == rec.block_size_tokens:
                    new = splice_kv_fetch(line, enc.encode(kv))
                if new is None:  # Parquet input, another block size, or no span found
                    if bs != rec.block_size_tokens:
                        _rebucket_record(rec, p, blocks, bs)
                    rec.kv_fetch = kv
                    new = enc.encode(rec)
                out_lines.append(new)
            out_lines.append(b"")
            fh.write(b"\n".join(out_lines))
            _summarize_batch(builder, batch, seen, stream, blocked, tok_off, tpb)
            for i in range(seen, seen + len(batch)):
                for rid in ends_at.get(i, ()):
                    backend.release(rid)
            seen += len(batch)
            if bar is not None:
                bar.update(len(batch))
            batch.clear()
            lines.clear()

        try:
            for rec, line in iter_records_with_lines(tf, _PassRecord):
                if batch and (rec.step_idx != batch[0].step_idx
                              or rec.layer_id != batch[0].layer_id):
                    flush()
                batch.append(rec)
                lines.append(line)
        except TraceError as exc:
            raise ReplayError(f"{exc} (records before it were written to {out})") from None
        flush()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t_start
    back = backend.summary()
    summary = builder.build(**backend_sections(back))
    (out / SUMMARY_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(summary)))
    accesses = int(getattr(backend, "accesses", 0))
    return ReplayResult(out_dir=out, records=seen, accesses=accesses, seconds=seconds,
                        summary=back)


def iter_batches(stream: AccessStream, block_size: int | None = None
                 ) -> Iterator[tuple[int, int, LayerAccess]]:
    """``(first record, end record, LayerAccess)`` for each run of consecutive records with
    one (step, layer), from an access stream (no record objects: the fast path)."""
    bs = block_size or stream.block_size
    n = len(stream)
    if n == 0:
        return
    blocked = rebucket(stream, bs)
    change = np.flatnonzero((np.diff(stream.step) != 0) | (np.diff(stream.layer) != 0)) + 1
    bounds = np.concatenate(([0], change, [n])).tolist()
    pos, poff = stream.pos, stream.offsets
    blk, boff = blocked.blocks, blocked.offsets
    names = stream.request_ids
    req = stream.req.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        yield a, b, LayerAccess(
            step_idx=int(stream.step[a]), layer_id=int(stream.layer[a]),
            request_ids=[names[r] for r in req[a:b]],
            token_pos=[pos[poff[i]:poff[i + 1]] for i in range(a, b)],
            block_ids=[blk[boff[i]:boff[i + 1]] for i in range(a, b)],
            block_size=bs)


def drive_stream(backend: KVBackend, stream: AccessStream, block_size: int | None = None
                 ) -> list:
    """Run a whole access stream through ``backend`` with replay's lifecycle (admit at the
    first record with ``seq_len_current - 1`` tokens, release after the last); returns the
    ``KVFetch`` of every record in order."""
    n = len(stream)
    last = np.full(len(stream.request_ids), -1, dtype=np.int64)
    np.maximum.at(last, stream.req, np.arange(n, dtype=np.int64))
    first = np.full(len(stream.request_ids), n, dtype=np.int64)
    np.minimum.at(first, stream.req, np.arange(n, dtype=np.int64))
    seq = stream.seq_len
    out: list = []
    for a, b, access in iter_batches(stream, block_size):
        for i in range(a, b):
            r = int(stream.req[i])
            if first[r] == i:
                backend.admit(stream.request_ids[r], max(int(seq[i]) - 1, 0))
        out.extend(backend.fetch(access))
        for i in range(a, b):
            r = int(stream.req[i])
            if last[r] == i:
                backend.release(stream.request_ids[r])
    return out
