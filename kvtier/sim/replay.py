"""Offline replay: run a recorded trace's selections through any KVBackend and policy.

The input is read once, as columns (``kvtier.trace.columnar``: parsed on the first read of a
JSONL trace, then taken from its columnar twin): the access stream (when each request starts
and ends, the positions and blocks and, for offline policies, the exact future key stream)
plus the few record fields the summary needs. Consecutive records of one (step, layer) form
one ``LayerAccess`` (so the key stream is the trace order), the backend serves it, and each
input line is written again with its ``kv_fetch`` value replaced (every other byte kept; a
Parquet input or another block size re-encodes the record). Requests are admitted at their
first record with ``prompt_len = seq_len_current - 1`` and released after their last one.
No torch.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgspec
import numpy as np

from kvtier.backend import HBMOnlyBackend, KVBackend, LayerAccess
from kvtier.schema import (
    META_FILE,
    REQUESTS_FILE,
    SCHEMA_VERSION,
    SUMMARY_FILE,
    TRACE_FILE,
    TokensPerBlock,
    TopkRecord,
    TraceMeta,
    record_encoder,
)
from kvtier.sim.access import (
    ACCESS_COLUMNS,
    AccessStream,
    BlockStream,
    TraceReadError,
    _int_column,
    rebucket,
    stream_from_columns,
)
from kvtier.sim.capacity import parse_capacity, working_set_blocks
from kvtier.trace.arrays import as_numpy, list_parts
from kvtier.trace.columnar import read_columns
from kvtier.trace.reader import SkippedLines, TraceError, find_trace, iter_records, warn_skipped
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
    hbm_blocks: int | str | None = None  # blocks, or a capacity text (25%, 1k)
    on_release: str | None = None
    model_config: str | None = None
    kv_bytes_per_token: int | None = None
    overrides: dict = field(default_factory=dict)


@dataclass
class ReplayResult:
    """What a replay did: ``seconds`` from the call to the summary written (reading the
    trace included), ``loop_seconds`` the part after reading (fetches, output, summary)."""

    out_dir: Path
    records: int
    accesses: int
    seconds: float
    summary: dict | None
    loop_seconds: float = 0.0
    working_set: int = 0  # distinct (request, layer, block) keys at the replay block size
    #: input lines that are not records (a killed run's half line, a malformed line): skipped
    skipped: SkippedLines = field(default_factory=SkippedLines)


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
    offsets = np.repeat(stream.seq_len - 1, lens)
    offsets -= stream.pos
    n = stream.pos.shape[0]
    if n == 0:
        return offsets, np.zeros(0, dtype=np.int64)
    bs = blocked.block_size
    blk = stream.pos >> (bs.bit_length() - 1) if bs & (bs - 1) == 0 else stream.pos // bs
    start = np.empty(n, dtype=bool)
    start[0] = True
    np.not_equal(blk[1:], blk[:-1], out=start[1:])
    start[stream.offsets[:-1][lens > 0]] = True  # a record's first token starts a block
    edges = np.flatnonzero(start)
    return offsets, np.diff(edges, append=n)


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


# ``"kv_fetch": {...}`` with its value: an object of objects of scalars (KVFetch of TierFetch)
_KV_FETCH = re.compile(rb'"kv_fetch"\s*:\s*\{(?:[^{}]|\{[^{}]*\})*\}')
_KV_KEY = b'"kv_fetch"'


def kv_fetch_span(buf, lo: int = 0, hi: int | None = None) -> tuple[int, int] | None:
    """(start, end) of the top-level ``"kv_fetch": {...}`` member in ``buf[lo:hi]`` (bytes or
    any buffer with ``find``, such as an mmap), or None. Only for lines that decoded as a
    valid record: nested objects of a record have no ``kv_fetch`` key and a string value
    cannot be followed by ``:``, so the first match is the field."""
    hi = len(buf) if hi is None else hi
    start = buf.find(_KV_KEY, lo, hi)
    while start >= 0:
        m = _KV_FETCH.match(buf, start, hi)
        if m is not None:
            return start, m.end()
        start = buf.find(_KV_KEY, start + 1, hi)
    return None


def splice_kv_fetch(line: bytes, kv_json: bytes) -> bytes | None:
    """``line`` with its top-level ``kv_fetch`` value replaced by ``kv_json``, every other byte
    kept; None if the span cannot be located (the caller re-encodes the record then)."""
    span = kv_fetch_span(line)
    if span is None:
        return None
    return b"".join((line[:span[0]], b'"kv_fetch":', kv_json, line[span[1]:]))


def _rebucket_record(rec, pos: np.ndarray, blocks: np.ndarray, bs: int, n_prefix: int,
                     cached: int) -> None:
    """Rewrite a record's block fields for another block size (points B and D at ``bs``):
    ``n_prefix`` / ``cached`` are the request's prefix and cached-prefix blocks at ``bs``."""
    per = np.unique(pos // bs, return_counts=True)[1] if pos.size else np.zeros(1, np.int64)
    rec.block_size_tokens = bs
    rec.selected_block_ids = blocks.tolist()
    rec.unique_blocks = int(blocks.shape[0])
    p50, p95 = np.percentile(per, [50, 95])
    rec.tokens_per_touched_block = TokensPerBlock(mean=float(per.mean()), p50=float(p50),
                                                  p95=float(p95))
    inter = rec.selected_block_ids[:int(np.searchsorted(blocks, n_prefix))]
    rec.prefix.intersection_blocks = inter
    rec.prefix.intersection_ratio = len(inter) / max(len(blocks), 1)
    rec.prefix.prefix_cached_blocks = cached
    rec.prefix.prefix_cache_hit = cached > 0


#: the columns replay reads (besides the record lines it copies)
_COLUMNS = (*ACCESS_COLUMNS, "selected_block_ids", "unique_blocks", "prefix.prefix_key",
            "prefix.prefix_cached_blocks", "prefix.intersection_ratio",
            "prefix.intersection_blocks", "kv_fetch.hbm.latency_us")
#: records per chunk of the summary's column passes (small arrays: no fresh memory per pass)
_SUMMARY_CHUNK = 512


class _Lines:
    """The record lines of a JSONL trace, memory-mapped: record i is ``bufs[f][lo:hi]``.
    Records hold no raw newline, so line boundaries are exact; blank lines (which readers
    skip) are skipped, and so are ``skip``'s lines (file name -> 1-based line numbers, as in
    ``SkippedLines.lines``: what the columnar read did not take as records). ``n`` (the
    records the columns hold) is checked."""

    def __init__(self, tf, n: int, skip: dict[str, list[int]] | None = None) -> None:
        import mmap

        self.bufs: list = []
        self.spans: list[tuple[int, int, int]] = []
        for path in tf.files:
            with open(path, "rb") as fh:
                size = path.stat().st_size
                buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            f = len(self.bufs)
            self.bufs.append(buf)
            drop = set((skip or {}).get(path.name, ()))
            lo, find, lineno = 0, buf.find, 0
            while lo < size:
                hi = find(b"\n", lo)
                end = size if hi < 0 else hi
                lineno += 1
                if (end - lo > 64 or buf[lo:end].strip()) and lineno not in drop:
                    self.spans.append((f, lo, end))
                lo = end + 1
        if len(self.spans) != n:
            raise ReplayError(f"{tf.root}: {len(self.spans)} record lines but {n} records were "
                              "read (was the trace modified during the replay?)")

    def line(self, i: int) -> bytes:
        f, lo, hi = self.spans[i]
        return bytes(self.bufs[f][lo:hi])

    def spliced(self, i: int, kv_json: bytes) -> list | None:
        """Record i's line with its kv_fetch value replaced, as pieces (memoryviews of the
        mapped file around the new value), or None where the span is not found."""
        f, lo, hi = self.spans[i]
        buf = self.bufs[f]
        span = kv_fetch_span(buf, lo, hi)
        if span is None:
            return None
        mv = memoryview(buf)
        return [mv[lo:span[0]], b'"kv_fetch":', kv_json, mv[span[1]:hi]]

    def close(self) -> None:
        for buf in self.bufs:
            if hasattr(buf, "close"):
                buf.close()


def _add_summary(builder: SummaryBuilder, stream: AccessStream, blocked, table, bs: int,
                 n_prefix: np.ndarray) -> None:
    """Feed ``builder`` every record from columns, ``_SUMMARY_CHUNK`` records at a time:
    unique blocks, tokens per touched block, offsets, intersection ratios and the touched
    prefix blocks, at block size ``bs`` (``n_prefix``: prefix blocks per record at ``bs``).
    The same numbers as ``add_records`` over the output records (tested)."""
    n = len(stream)
    ids = np.asarray(stream.request_ids, dtype=np.int64)[stream.req]
    boff = blocked.offsets
    counts = np.diff(boff)
    if bs == stream.block_size:
        inter_off, inter = list_parts(table.column("prefix.intersection_blocks"))
        ratios = as_numpy(table.column("prefix.intersection_ratio"))
        unique = _int_column(table, "unique_blocks")
    for a in range(0, n, _SUMMARY_CHUNK):
        b = min(n, a + _SUMMARY_CHUNK)
        part = AccessStream(stream.request_ids, stream.req[a:b], stream.layer[a:b],
                            stream.step[a:b], stream.seq_len[a:b],
                            stream.offsets[a:b + 1] - stream.offsets[a],
                            stream.pos[stream.offsets[a]:stream.offsets[b]], stream.block_size)
        tok_off, tpb = token_columns(part, blocked)
        if bs == stream.block_size:
            rows = np.repeat(np.arange(b - a, dtype=np.int64), np.diff(inter_off[a:b + 1]))
            blocks = inter[inter_off[a]:inter_off[b]]
            add = (unique[a:b], ratios[a:b])
        else:
            rec_of_block = np.repeat(np.arange(b - a, dtype=np.int64), counts[a:b])
            blk = blocked.blocks[boff[a]:boff[b]]
            inside = blk < n_prefix[a:b][rec_of_block]
            rows, blocks = rec_of_block[inside], blk[inside]
            add = (counts[a:b], np.bincount(rows, minlength=b - a) / np.maximum(counts[a:b], 1))
        builder.add(ids[a:b].tolist(), add[0], tpb, tok_off, add[1], rows, blocks)


def replay(trace: str | Path, out_dir: str | Path, settings: ReplaySettings, *,
           force: bool = False, progress: bool = False) -> ReplayResult:
    """Replay ``trace`` into ``out_dir`` (trace, meta, requests and summary); see the module
    doc. The trace is read from its columnar twin (``kvtier.trace.columnar``), so only the
    first replay of a JSONL trace parses it."""
    import time

    t_start = time.perf_counter()
    trace, out = Path(trace), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ReplayError(f"{out}: exists and is not empty (use --force to overwrite)")
        if out.resolve() == trace.resolve() or out.resolve() in trace.resolve().parents:
            raise ReplayError(f"{out}: refusing to overwrite the input trace")
    try:
        tf = find_trace(trace)
        skipped = SkippedLines()
        table = read_columns(trace, _COLUMNS, skipped=skipped)
        stream = stream_from_columns(table, trace)
    except (TraceReadError, TraceError) as exc:
        raise ReplayError(str(exc)) from None
    n = len(stream)
    warn_skipped(skipped, trace, n)
    bs = settings.block_size or stream.block_size
    meta_in = _read_meta(trace)
    trace_cfg = (meta_in.get("config") or {}).get("trace") or {}
    prefix_tokens = int(trace_cfg.get("prefix_key_tokens", 256))
    share = settings.backend == "sim" and bs == stream.block_size

    # per request: first / last record, prompt length, prefix key and blocks at bs
    n_req = len(stream.request_ids)
    order = np.arange(n, dtype=np.int64)
    first = np.full(n_req, n, dtype=np.int64)
    np.minimum.at(first, stream.req, order)
    last = np.full(n_req, -1, dtype=np.int64)
    np.maximum.at(last, stream.req, order)
    prompt = np.maximum(stream.seq_len[first] - 1, 0) if n else np.zeros(0, np.int64)
    keys = table.column("prefix.prefix_key").to_pylist() if n else []
    key_of = [keys[i] for i in first.tolist()]
    old_bs = stream.block_size
    has_key = np.array([k is not None for k in key_of], dtype=bool)
    pre_tokens = np.where(has_key, np.minimum(prompt, prefix_tokens) // old_bs * old_bs, 0)
    cached_old = (_int_column(table, "prefix.prefix_cached_blocks")[first]
                  if n else np.zeros(0, np.int64))
    n_prefix_req = pre_tokens // bs
    cached_req = cached_old * old_bs // bs

    def hashes_for(r: int) -> list[int]:
        return prefix_hashes(key_of[r], int(prompt[r]), prefix_tokens, bs) if share else []

    if bs == stream.block_size:  # the recorded selected_block_ids (validate checks them)
        boff, blk = list_parts(table.column("selected_block_ids"))
        blocked = BlockStream(stream, bs, boff, blk.astype(np.int64, copy=False))
    else:
        blocked = rebucket(stream, bs)
    # HBM's working set: shared prefix blocks (requests with one prefix key) count once
    keyed = [k for k in key_of if k]
    aliased = (aliased_key_stream(stream, bs, [hashes_for(r) for r in range(n_req)])
               if share and len(set(keyed)) < len(keyed) else None)
    working_set = (int(np.unique(aliased).shape[0]) if aliased is not None
                   else working_set_blocks(blocked))
    hbm_blocks = hbm_capacity_blocks(settings.hbm_blocks, working_set)

    future = None
    if _needs_future(settings):
        future = (aliased if aliased is not None else
                  aliased_key_stream(stream, bs, [hashes_for(r) for r in range(n_req)]))
    backend = build_backend(replace(settings, hbm_blocks=hbm_blocks), stream, bs, future,
                            meta_in)
    use_wall = (meta_in.get("config") or {}).get("backend", "hbm") == "hbm"
    lines = (_Lines(tf, n, skipped.lines) if bs == stream.block_size and tf.format == "jsonl"
             else None)

    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(meta_in.get("config") or {})
    config["backend"] = getattr(backend, "name", settings.backend)
    config["replay"] = {"source": str(trace), **{k: v for k, v in vars(settings).items() if v}}
    if bs != stream.block_size:
        config["trace"] = {**trace_cfg, "kv_block_size": bs}
        config["kv_block_size_tokens"] = bs
    run_name, dataset = meta_in.get("run_name"), meta_in.get("dataset")
    if (run_name is None or dataset is None) and n:  # no trace_meta.json: the records say
        head = read_columns(trace, ["run_name", "dataset"], skipped=SkippedLines()).slice(0, 1).to_pylist()[0]
        run_name = head["run_name"] if run_name is None else run_name
        dataset = head["dataset"] if dataset is None else dataset
    run_name, dataset = str(run_name or "replay"), str(dataset or "unknown")
    meta = TraceMeta(schema_version=SCHEMA_VERSION, run_name=run_name, dataset=dataset,
                     config=config, format="jsonl", shards=[TRACE_FILE])
    (out / META_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(meta)))
    if (tf.root / REQUESTS_FILE).is_file():
        shutil.copyfile(tf.root / REQUESTS_FILE, out / REQUESTS_FILE)
    builder = SummaryBuilder(run_name, dataset, config)
    enc = record_encoder()

    pos, poff, blk, boff = stream.pos, stream.offsets, blocked.blocks, blocked.offsets
    rids = np.asarray(stream.request_ids, dtype=np.int64)
    rec_ids = rids[stream.req].tolist() if n else []
    walls = (table.column("kv_fetch.hbm.latency_us").to_pylist() if use_wall and n else None)
    change = np.flatnonzero((np.diff(stream.step) != 0) | (np.diff(stream.layer) != 0)) + 1
    bounds = np.concatenate(([0], change, [n])).tolist() if n else [0]
    batch_of = np.searchsorted(np.asarray(bounds), order, side="right") - 1
    admit_at: dict[int, list[int]] = {}
    release_at: dict[int, list[int]] = {}
    for r in range(n_req):
        admit_at.setdefault(int(batch_of[first[r]]), []).append(r)
        release_at.setdefault(int(batch_of[last[r]]), []).append(r)
    records = None if lines is not None else iter_records(tf, skipped=SkippedLines())
    step, layer = stream.step.tolist(), stream.layer.tolist()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="rec", desc="replay")
    t_loop = time.perf_counter()
    with open(out / TRACE_FILE, "wb") as fh:
        chunk: list = []
        size = 0
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            for r in admit_at.get(k, ()):
                backend.admit(int(rids[r]), int(prompt[r]), hashes_for(r))
            tps = [pos[poff[i]:poff[i + 1]] for i in range(a, b)]  # sorted, unique
            bls = [blk[boff[i]:boff[i + 1]] for i in range(a, b)]
            access = LayerAccess(step_idx=step[a], layer_id=layer[a], request_ids=rec_ids[a:b],
                                 token_pos=tps, block_ids=bls, block_size=bs,
                                 step_wall_us=walls[a] if walls is not None else None)
            got = backend.fetch(access)
            if len(got) != b - a:
                raise ReplayError(f"backend {backend.name!r} returned {len(got)} results for "
                                  f"{b - a} rows")
            for j, kv in enumerate(got):
                i = a + j
                pieces: list | None = None
                if lines is not None:
                    pieces = lines.spliced(i, enc.encode(kv))
                if pieces is None:  # Parquet input, another block size, or no span found
                    rec = next(records) if records is not None else _decode(lines.line(i), tf, i)
                    if bs != rec.block_size_tokens:
                        r = int(stream.req[i])
                        _rebucket_record(rec, tps[j], bls[j], bs, int(n_prefix_req[r]),
                                         int(cached_req[r]))
                    rec.kv_fetch = kv
                    pieces = [enc.encode(rec)]
                chunk.extend(pieces)
                chunk.append(b"\n")
                size += len(pieces[0])
            for r in release_at.get(k, ()):
                backend.release(int(rids[r]))
            if size > 1 << 22:
                fh.write(b"".join(chunk))
                chunk, size = [], 0
            if bar is not None:
                bar.update(b - a)
        if chunk:
            fh.write(b"".join(chunk))
        chunk = pieces = None  # release the views of the mapped input before closing it
    if lines is not None:
        lines.close()
    if bar is not None:
        bar.close()
    _add_summary(builder, stream, blocked, table, bs,
                 n_prefix_req[stream.req] if n else np.zeros(0, np.int64))
    back = backend.summary()
    _add_working_set(back, working_set)
    summary = builder.build(**backend_sections(back))
    (out / SUMMARY_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(summary)))
    accesses = int(getattr(backend, "accesses", len(blocked)))  # HBM-only: every block read
    t_end = time.perf_counter()
    return ReplayResult(out_dir=out, records=n, accesses=accesses, seconds=t_end - t_start,
                        summary=back, loop_seconds=t_end - t_loop, working_set=working_set,
                        skipped=skipped)


def hbm_capacity_blocks(spec: int | str | None, working_set: int) -> int | None:
    """``ReplaySettings.hbm_blocks`` in blocks: an int as is, a text in the capacity grammar
    (``4096``, ``1k``, ``30blocks``, ``25%`` of ``working_set``; a bare number is blocks)."""
    if spec is None or isinstance(spec, int):
        return spec
    try:
        cap = parse_capacity(str(spec), bare="blocks")
    except ValueError as exc:
        raise ReplayError(f"--hbm-blocks: {exc}") from None
    return cap.resolve(working_set)


def _add_working_set(back: dict | None, working_set: int) -> None:
    """Put the working set next to the tiered backend's HBM capacity in its summary: HBM's
    ``working_set_share`` (capacity / working set; above 1, nothing is ever evicted) and
    ``_totals.working_set_blocks``."""
    tiers = (back or {}).get("tiers")
    if not isinstance(tiers, dict) or "hbm" not in tiers:
        return
    hbm = tiers["hbm"]
    hbm["working_set_share"] = (hbm["capacity_blocks"] / working_set if working_set else None)
    tiers.setdefault("_totals", {})["working_set_blocks"] = working_set


def _decode(line: bytes, tf, i: int):
    """The record of a line whose kv_fetch span could not be located (a foreign producer's
    layout): decoded in full."""
    try:
        return _RECORD.decode(line)
    except msgspec.MsgspecError as exc:
        raise ReplayError(f"{tf.root}: record {i + 1}: {exc}") from None


_RECORD = msgspec.json.Decoder(TopkRecord)


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
