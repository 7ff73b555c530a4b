"""A standalone checker of the design note's trace format, written from
``docs/seed/INSTRUMENTATION.md`` alone (§5.2 the record, §5.3 the summary, §3 the meaning of
the fields, §9 step_idx / seq_len_current), with the json module only: it imports nothing of
kvtier, so it checks what a tool written against the note would rely on.

``check_trace_dir(path)`` returns a list of problems (empty: conforming).
"""

from __future__ import annotations

import json
from pathlib import Path

# §5.2, in the note's order; scores_topk only with --trace-store-scores (§3.1)
RECORD_KEYS = ["event", "run_name", "dataset", "rank", "world_size", "request_id", "layer_id",
               "step_idx", "seq_len_current", "unique_token_pos_count", "offset_min",
               "offset_p50", "offset_max", "block_size_tokens", "selected_block_ids",
               "unique_blocks", "tokens_per_touched_block", "kv_fetch", "prefix",
               "selected_token_pos", "scores_stats"]
TIERS = ["hbm", "local_pool", "remote_pool"]
TIER_KEYS = ["hit_blocks", "bytes_read", "read_ops", "latency_us", "batch_size"]
PREFIX_KEYS = ["prefix_cache_hit", "prefix_cached_blocks", "prefix_key", "intersection_ratio",
               "intersection_blocks"]
DIST_KEYS = {"count", "min", "p50", "p95", "max", "mean"}


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _ints(x) -> bool:
    return isinstance(x, list) and all(_int(v) for v in x)


def check_record(r: dict) -> list[str]:
    bad = []
    keys = list(r)
    want = RECORD_KEYS + (["scores_topk"] if "scores_topk" in r else [])
    if keys != want:
        return [f"keys {keys} != §5.2 {want}"]
    if r["event"] != "dsa_topk":
        bad.append("event != dsa_topk")
    for k in ("run_name", "dataset"):
        if not isinstance(r[k], str):
            bad.append(f"{k} not a string")
    for k in ("rank", "world_size", "request_id", "layer_id", "step_idx", "seq_len_current",
              "unique_token_pos_count", "offset_min", "offset_max", "block_size_tokens",
              "unique_blocks"):
        if not _int(r[k]):
            bad.append(f"{k} not an int: {r[k]!r}")
    if bad:
        return bad
    if r["request_id"] < 0:
        bad.append("request_id < 0")
    if not _num(r["offset_p50"]):
        bad.append("offset_p50 not a number")
    # §9: step_idx = start_pos, seq_len_current = end_pos = start_pos + 1
    if r["seq_len_current"] != r["step_idx"] + 1:
        bad.append("seq_len_current != step_idx + 1")
    pos, blocks = r["selected_token_pos"], r["selected_block_ids"]
    if not _ints(pos) or not _ints(blocks):
        return bad + ["selected_token_pos / selected_block_ids not int lists"]
    bs = r["block_size_tokens"]
    # §3.1/§3.2: unique positions, block_id = pos // block_size, deduplicated blocks
    if r["unique_token_pos_count"] != len(set(pos)):
        bad.append("unique_token_pos_count != distinct positions")
    if any(p < 0 or p >= r["seq_len_current"] for p in pos):
        bad.append("a position outside [0, seq_len_current)")
    if sorted(set(blocks)) != sorted(blocks) or set(blocks) != {p // bs for p in pos}:
        bad.append("selected_block_ids != deduplicated pos // block_size_tokens")
    if r["unique_blocks"] != len(blocks):
        bad.append("unique_blocks != |selected_block_ids|")
    if pos:
        offsets = [(r["seq_len_current"] - 1) - p for p in pos]
        if (r["offset_min"], r["offset_max"]) != (min(offsets), max(offsets)):
            bad.append("offset_min/max != min/max of (end_pos - 1) - pos")
    tpb = r["tokens_per_touched_block"]
    if not isinstance(tpb, dict) or set(tpb) != {"mean", "p50", "p95"} \
            or not all(_num(v) for v in tpb.values()):
        bad.append("tokens_per_touched_block not {mean, p50, p95}")
    elif blocks and abs(tpb["mean"] - len(set(pos)) / len(blocks)) > 1e-9 * max(1, tpb["mean"]):
        bad.append("tokens_per_touched_block.mean != positions / blocks")
    # §3.3: kv_fetch keeps the three tiers; each lists the blocks it served
    kv = r["kv_fetch"]
    if not isinstance(kv, dict) or list(kv) != TIERS:
        return bad + [f"kv_fetch tiers {list(kv) if isinstance(kv, dict) else kv} != {TIERS}"]
    served: list[int] = []
    for t in TIERS:
        f = kv[t]
        if not isinstance(f, dict) or list(f) != TIER_KEYS:
            bad.append(f"kv_fetch.{t} keys != {TIER_KEYS}")
            continue
        if not _ints(f["hit_blocks"]):
            bad.append(f"kv_fetch.{t}.hit_blocks not a list of block ids")
            continue
        served += f["hit_blocks"]
        for k in ("bytes_read", "read_ops", "batch_size"):
            if not _int(f[k]) or f[k] < 0:
                bad.append(f"kv_fetch.{t}.{k} not an int >= 0")
        if f["latency_us"] is not None and not _num(f["latency_us"]):
            bad.append(f"kv_fetch.{t}.latency_us neither a number nor null")
        # "一次 batch_get 覆盖的 block 数": the blocks this tier's batch_get covered
        if f["batch_size"] != len(f["hit_blocks"]):
            bad.append(f"kv_fetch.{t}.batch_size != len(hit_blocks)")
    if sorted(served) != sorted(blocks):
        bad.append("the tiers' hit_blocks do not partition selected_block_ids")
    # §3.4: intersection = touched blocks ∩ prefix blocks; ratio = |∩| / |touched|
    pre = r["prefix"]
    if not isinstance(pre, dict) or list(pre) != PREFIX_KEYS:
        return bad + [f"prefix keys != {PREFIX_KEYS}"]
    if not isinstance(pre["prefix_cache_hit"], bool):
        bad.append("prefix.prefix_cache_hit not a bool")
    if not _int(pre["prefix_cached_blocks"]):
        bad.append("prefix.prefix_cached_blocks not an int")
    if pre["prefix_key"] is not None and not isinstance(pre["prefix_key"], str):
        bad.append("prefix.prefix_key neither a string nor null")
    inter = pre["intersection_blocks"]
    if not _ints(inter) or not set(inter) <= set(blocks) or len(set(inter)) != len(inter):
        bad.append("prefix.intersection_blocks not a list of distinct touched blocks")
    elif blocks and abs(pre["intersection_ratio"] - len(inter) / len(blocks)) > 1e-12:
        bad.append("prefix.intersection_ratio != |intersection_blocks| / unique_blocks")
    ss = r["scores_stats"]
    if ss is not None and (not isinstance(ss, dict) or set(ss) != {"min", "mean", "max"}):
        bad.append("scores_stats neither {min, mean, max} nor null")
    if "scores_topk" in r and (not isinstance(r["scores_topk"], list)
                               or len(r["scores_topk"]) != len(pos)):
        bad.append("scores_topk not one score per selected position")
    return bad


def check_summary(s: dict) -> list[str]:
    """§5.3 (the extra fields kvtier adds are allowed)."""
    bad = []
    for k in ("run_name", "dataset", "config", "unique_blocks", "tokens_per_touched_block",
              "offsets", "prefix_intersection_ratio", "prefix_hot_blocks"):
        if k not in s:
            bad.append(f"summary lacks {k}")
    if bad:
        return bad
    if not isinstance(s["config"], dict) or not _int(s["config"].get("kv_block_size_tokens")):
        bad.append("summary.config.kv_block_size_tokens missing")
    for k in ("unique_blocks", "tokens_per_touched_block", "offsets", "prefix_intersection_ratio"):
        if not isinstance(s[k], dict) or set(s[k]) != DIST_KEYS:
            bad.append(f"summary.{k} keys != {sorted(DIST_KEYS)}")
    hot = s["prefix_hot_blocks"]
    if not isinstance(hot, dict):
        return bad + ["summary.prefix_hot_blocks not an object"]
    for rid, rows in hot.items():
        if not rid.isdigit():
            bad.append(f"prefix_hot_blocks key {rid!r} is not a request id")
        for row in rows:
            if not isinstance(row, dict) or list(row) != ["block_id", "touch_count"] \
                    or not _int(row["block_id"]) or not _int(row["touch_count"]):
                bad.append(f"prefix_hot_blocks[{rid!r}] entry {row!r} != "
                           "{block_id: int, touch_count: int}")
                break
    if "serving" in s:
        sv = s["serving"]
        if set(sv) != {"requests", "latency_ms", "batch_size", "max_new_tokens_cap"} \
                or set(sv["latency_ms"]) != {"p50", "p95", "p99", "max"}:
            bad.append("summary.serving keys differ from §5.3")
    return bad


def check_trace_dir(path: str | Path, min_records: int = 1) -> list[str]:
    """Every record line of ``trace_steps*.jsonl`` in ``path`` and its ``summary.json``."""
    path = Path(path)
    files = sorted(path.glob("trace_steps*.jsonl"))
    bad: list[str] = []
    n = 0
    for f in files:
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            n += 1
            rec = json.loads(line)
            bad += [f"{f.name}:{lineno}: {m}" for m in check_record(rec)]
    if n < min_records:
        bad.append(f"{n} records")
    if (path / "summary.json").is_file():
        bad += [f"summary.json: {m}" for m in check_summary(json.loads((path / "summary.json").read_text()))]
    return bad
