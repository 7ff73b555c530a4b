"""``kvtier validate``: check a trace directory against the schema and its own arithmetic.

Schema errors come from msgspec and name the field (``$.kv_fetch.hbm.bytes_read``); the
semantic checks recompute what a record claims from its own ``selected_token_pos``. Every
problem is reported as ``file:line: field: message``. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from kvtier.schema import SUMMARY_FILE, TIER_NAMES, Summary, TopkRecord
from kvtier.trace import legacy
from kvtier.trace.reader import (
    TraceError,
    TraceFiles,
    find_trace,
    iter_jsonl_lines,
    location_of,
)

_RTOL = 1e-9


def _pct(sorted_x: np.ndarray, q: float) -> float:
    """Linear-interpolation percentile of a sorted sample, written out (cheaper than
    np.percentile per record; compared with a relative tolerance)."""
    h = (len(sorted_x) - 1) * q / 100.0
    lo = int(h)
    hi = min(lo + 1, len(sorted_x) - 1)
    a = float(sorted_x[lo])
    return a + (float(sorted_x[hi]) - a) * (h - lo)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _RTOL * max(1.0, abs(a), abs(b))


def check_record(rec: TopkRecord) -> list[tuple[str, str]]:
    """Semantic problems of one schema-valid record, as (field path, message)."""
    bad: list[tuple[str, str]] = []
    if rec.seq_len_current != rec.step_idx + 1:
        bad.append(("$.seq_len_current", f"{rec.seq_len_current} != step_idx + 1 = {rec.step_idx + 1}"))
    if rec.rank < 0 or rec.world_size < 1 or rec.rank >= rec.world_size:
        bad.append(("$.rank", f"rank {rec.rank} outside world_size {rec.world_size}"))
    if rec.block_size_tokens <= 0:
        bad.append(("$.block_size_tokens", f"must be > 0, got {rec.block_size_tokens}"))
        return bad
    pos = np.asarray(rec.selected_token_pos, dtype=np.int64)
    if pos.size == 0:
        bad.append(("$.selected_token_pos", "empty"))
        return bad
    if (np.diff(pos) <= 0).any():
        bad.append(("$.selected_token_pos", "not sorted ascending and unique"))
        return bad
    if pos[0] < 0 or pos[-1] >= rec.seq_len_current:
        bad.append(("$.selected_token_pos", f"positions must lie in [0, {rec.seq_len_current}), "
                                            f"got [{pos[0]}, {pos[-1]}]"))
    if rec.unique_token_pos_count != pos.size:
        bad.append(("$.unique_token_pos_count", f"{rec.unique_token_pos_count} != {pos.size} positions"))
    last = rec.seq_len_current - 1
    offsets = last - pos[::-1]
    if rec.offset_min != offsets[0]:
        bad.append(("$.offset_min", f"{rec.offset_min} != {offsets[0]} from the positions"))
    if rec.offset_max != offsets[-1]:
        bad.append(("$.offset_max", f"{rec.offset_max} != {offsets[-1]} from the positions"))
    p50 = _pct(offsets, 50)
    if not _close(rec.offset_p50, p50):
        bad.append(("$.offset_p50", f"{rec.offset_p50} != {p50} from the positions"))
    blocks = pos // rec.block_size_tokens
    edges = np.flatnonzero(np.diff(blocks)) + 1
    uniq = blocks[np.concatenate(([0], edges))]
    counts = np.diff(np.concatenate(([0], edges, [blocks.size])))
    ids = np.asarray(rec.selected_block_ids, dtype=np.int64)
    if ids.shape != uniq.shape or (ids != uniq).any():
        bad.append(("$.selected_block_ids", "!= sorted unique selected_token_pos // block_size_tokens"))
    if rec.unique_blocks != uniq.size:
        bad.append(("$.unique_blocks", f"{rec.unique_blocks} != {uniq.size} blocks"))
    tpb = rec.tokens_per_touched_block
    sorted_counts = np.sort(counts)
    want = (float(counts.mean()), _pct(sorted_counts, 50), _pct(sorted_counts, 95))
    for name, got, exp in zip(("mean", "p50", "p95"), (tpb.mean, tpb.p50, tpb.p95), want, strict=True):
        if not _close(got, exp):
            bad.append((f"$.tokens_per_touched_block.{name}", f"{got} != {exp} from the positions"))
    pre = rec.prefix
    inter = pre.intersection_blocks
    if inter != rec.selected_block_ids[:len(inter)]:
        bad.append(("$.prefix.intersection_blocks",
                    "must be the touched blocks inside the prefix (block ids 0 .. n-1): a "
                    "leading run of selected_block_ids"))
    elif not _close(pre.intersection_ratio, len(inter) / uniq.size):
        bad.append(("$.prefix.intersection_ratio",
                    f"{pre.intersection_ratio} != len(intersection_blocks) / unique_blocks "
                    f"= {len(inter) / uniq.size}"))
    if pre.prefix_cache_hit != (pre.prefix_cached_blocks > 0):
        bad.append(("$.prefix.prefix_cache_hit", "must equal prefix_cached_blocks > 0"))
    if pre.prefix_key is None and (pre.prefix_cached_blocks or inter):
        bad.append(("$.prefix.prefix_key", "null (no full prefix block) but prefix blocks are counted"))
    served: list[int] = []
    for tier in TIER_NAMES:
        t = getattr(rec.kv_fetch, tier)
        hits = t.hit_blocks
        if any(b >= a for a, b in zip(hits[1:], hits, strict=False)):
            bad.append((f"$.kv_fetch.{tier}.hit_blocks", "not sorted ascending and unique"))
        served.extend(hits)
        if t.batch_size != len(hits):
            bad.append((f"$.kv_fetch.{tier}.batch_size",
                        f"{t.batch_size} != len(hit_blocks) = {len(hits)}"))
        for name in ("bytes_read", "read_ops"):
            if getattr(t, name) < 0:
                bad.append((f"$.kv_fetch.{tier}.{name}", f"must be >= 0, got {getattr(t, name)}"))
        if t.latency_us is not None and t.latency_us < 0:
            bad.append((f"$.kv_fetch.{tier}.latency_us", f"must be >= 0 or null, got {t.latency_us}"))
    if sorted(served) != rec.selected_block_ids:
        bad.append(("$.kv_fetch", "the tiers' hit_blocks do not partition selected_block_ids"))
    if rec.scores_topk is not msgspec.UNSET:
        if len(rec.scores_topk) != pos.size:
            bad.append(("$.scores_topk", f"{len(rec.scores_topk)} scores for {pos.size} positions"))
        elif rec.scores_stats is None:
            bad.append(("$.scores_stats", "null although scores_topk is stored"))
        else:
            sc = np.asarray(rec.scores_topk, dtype=np.float64)
            for name, exp in (("min", sc.min()), ("mean", sc.mean()), ("max", sc.max())):
                got = getattr(rec.scores_stats, name)
                if abs(got - exp) > 1e-6 * max(1.0, abs(exp)):
                    bad.append((f"$.scores_stats.{name}", f"{got} != {exp} from scores_topk"))
    return bad


@dataclass
class Report:
    records: int = 0
    errors: int = 0
    messages: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def add(self, msg: str, limit: int) -> None:
        self.errors += 1
        if len(self.messages) < limit:
            self.messages.append(msg)

    @property
    def ok(self) -> bool:
        return self.errors == 0


def _records_with_location(tf: TraceFiles) -> Iterator[tuple[str, TopkRecord | None, str | None]]:
    """(location, record or None, error or None) for every record of the trace."""
    if tf.format == "parquet":
        from kvtier.trace.parquet import iter_parquet_records

        for path in tf.files:
            for row, rec in iter_parquet_records(path):
                loc = f"{path}:row {row}"
                if isinstance(rec, msgspec.ValidationError):
                    fld, msg = location_of(rec)
                    yield loc, None, f"{fld}: {msg}"
                else:
                    yield loc, rec, None
        return
    dec = msgspec.json.Decoder(TopkRecord)
    for path in tf.files:
        for lineno, line, complete in iter_jsonl_lines(path):
            loc = f"{path}:{lineno}"
            if not complete:
                yield loc, None, "$: truncated final line (no newline); the lines before it are intact"
                continue
            if not line.strip():
                yield loc, None, "$: empty line"
                continue
            try:
                yield loc, dec.decode(line), None
            except msgspec.ValidationError as exc:
                fld, msg = location_of(exc)
                yield loc, None, f"{fld}: {msg}"
            except msgspec.DecodeError as exc:
                yield loc, None, f"$: malformed JSON: {exc}"


def old_form(tf: TraceFiles, where: str | Path) -> str | None:
    """One line naming the earlier-form fields of a trace's first record, else None."""
    path = tf.files[0] if tf.files else None
    if path is None:
        return None
    if tf.format == "parquet":
        import pyarrow.parquet as pq

        try:
            return legacy.describe_parquet_schema(pq.read_schema(path), where)
        except Exception:  # unreadable: the record loop reports it
            return None
    for _lineno, line, _complete in iter_jsonl_lines(path):
        if line.strip():
            return legacy.describe(line, where)
    return None


def validate_trace(path: str | Path, max_messages: int = 50) -> Report:
    """Validate every record (and ``summary.json`` if present) of a trace directory or file."""
    rep = Report()
    try:
        tf = find_trace(path)
    except TraceError as exc:
        rep.add(str(exc), max_messages)
        return rep
    rep.files = list(tf.files)
    old = old_form(tf, path)
    if old is not None:
        rep.add(old, max_messages)
        return rep
    if tf.meta is None and Path(path).is_dir():
        rep.add(f"{Path(path) / 'trace_meta.json'}: missing", max_messages)
    try:
        for loc, rec, err in _records_with_location(tf):
            if err is not None:
                rep.add(f"{loc}: {err}", max_messages)
                continue
            rep.records += 1
            if tf.meta is not None:
                if rec.run_name != tf.meta.run_name:
                    rep.add(f"{loc}: $.run_name: {rec.run_name!r} != {tf.meta.run_name!r} in trace_meta.json", max_messages)
                if rec.dataset != tf.meta.dataset:
                    rep.add(f"{loc}: $.dataset: {rec.dataset!r} != {tf.meta.dataset!r} in trace_meta.json", max_messages)
            for fld, msg in check_record(rec):
                rep.add(f"{loc}: {fld}: {msg}", max_messages)
    except TraceError as exc:
        rep.add(str(exc), max_messages)
    summary = tf.root / SUMMARY_FILE
    if summary.is_file():
        try:
            msgspec.json.decode(summary.read_bytes(), type=Summary)
        except msgspec.ValidationError as exc:
            fld, msg = location_of(exc)
            rep.add(f"{summary}: {fld}: {msg}", max_messages)
        except msgspec.DecodeError as exc:
            rep.add(f"{summary}: $: malformed JSON: {exc}", max_messages)
    return rep
