"""Trace directories for the analysis tests: random ones (several shapes, both field forms of
the schema, malformed lines) and ones whose metrics are known by construction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TIERS = ("hbm", "local_pool", "remote_pool")


def write_meta(out: Path, block_size: int, backend: str = "hbm", kvb: int = 656) -> None:
    meta = {"schema_version": 1, "run_name": out.name, "dataset": "synthetic",
            "config": {"trace": {"kv_block_size": block_size, "prefix_key_tokens": 64},
                       "kv_bytes_per_token": kvb, "backend": backend},
            "format": "jsonl", "shards": []}
    (out / "trace_meta.json").write_text(json.dumps(meta))


def record(req, layer, step, seq_len, pos, bs, *, new_form=True, kv=None, prefix=None):
    """A record with every field the analysis reads (the rest of the schema is irrelevant to
    it and omitted)."""
    blocks = sorted({p // bs for p in pos})
    kv = kv or {t: {"hit_blocks": blocks if t == "hbm" else [], "bytes_read": 0, "read_ops": 0,
                    "latency_us": None, "batch_size": len(blocks) if t == "hbm" else 0}
                for t in TIERS}
    if not new_form:  # the earlier form: counts, and batch_size = requests decoded together
        kv = {t: {**v, "hit_blocks": len(v["hit_blocks"]), "batch_size": 4}
              for t, v in kv.items()}
    pre = prefix or {"prefix_cache_hit": False, "prefix_cached_blocks": 0, "prefix_key": None,
                     "intersection_ratio": 0.0, "intersection_blocks": []}
    if not new_form:
        pre = {**pre, "intersection_blocks": len(pre["intersection_blocks"])}
    return {"event": "dsa_topk", "request_id": req if new_form else f"req-{req}",
            "layer_id": layer, "step_idx": step, "seq_len_current": seq_len,
            "block_size_tokens": bs, "selected_block_ids": blocks, "unique_blocks": len(blocks),
            "kv_fetch": kv, "prefix": pre, "selected_token_pos": list(pos)}


def write_records(out: Path, recs: list[dict], block_size: int, extra_lines=(), **meta) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_meta(out, block_size, **meta)
    lines = [json.dumps(r) for r in recs]
    for at, text in extra_lines:
        lines.insert(at, text)
    (out / "trace_steps.jsonl").write_text("\n".join(lines) + "\n")
    return out


def random_trace(out: Path, seed: int, *, new_form: bool = True, requests: int = 5,
                 layers: int = 4, steps: int = 10, bs: int = 16, k: int = 48,
                 prompt: int = 200, malformed: bool = True) -> Path:
    """Decode-order records (step, layer, request) of staggered requests with sampled steps,
    sticky random selections (so reuse, Jaccard and LRU hits happen), shared prefixes, tier
    fields as a replay writes them, unsorted/duplicated positions now and then, a few records
    that cannot be analysed and (optionally) malformed lines."""
    rng = np.random.default_rng(seed)
    recs = []
    prompts = rng.integers(prompt // 2, prompt * 2, requests)
    start = rng.integers(0, 4, requests)
    n_steps = rng.integers(max(2, steps // 2), steps + 1, requests)
    prev: dict[tuple[int, int], np.ndarray] = {}
    cached = rng.integers(0, 3, requests) * (rng.random(requests) < 0.6)
    for t in range(int((start + n_steps).max())):
        for lv in range(layers):
            for r in range(requests):
                s = t - int(start[r])
                if s < 0 or s >= n_steps[r] or rng.random() < 0.1 and s > 0:
                    continue  # not started, done, or a sampled-out step
                seq = int(prompts[r]) + s + 1
                kk = min(k, seq)
                old = prev.get((r, lv))
                if old is not None and rng.random() < 0.8:
                    keep = old[rng.random(old.shape[0]) < 0.7]
                    fresh = rng.choice(seq, kk, replace=False)
                    pos = np.unique(np.concatenate([keep, fresh]))[:kk]
                    if pos.shape[0] < kk:
                        pos = np.unique(np.concatenate([pos, rng.choice(seq, kk, replace=False)]))[:kk]
                else:
                    pos = np.sort(rng.choice(seq, kk, replace=False))
                pos = np.unique(np.concatenate([pos, [seq - 1]]))  # the token itself
                prev[(r, lv)] = pos
                listed = pos.tolist()
                if rng.random() < 0.1:  # unsorted with a duplicate: the analysis normalises
                    listed = listed[::-1] + listed[:1]
                blocks = sorted({p // bs for p in pos.tolist()})
                cb = int(cached[r])
                nprefix = 64 // bs
                inter = [b for b in blocks if b < nprefix]
                split = rng.random()
                hit_local = [b for b in blocks if rng.random() < split * 0.5]
                rest = [b for b in blocks if b not in hit_local]
                kv = {"hbm": {"hit_blocks": rest, "bytes_read": len(rest) * bs * 656,
                              "read_ops": len(rest), "latency_us": float(rng.integers(1, 500)),
                              "batch_size": len(rest)},
                      "local_pool": {"hit_blocks": hit_local,
                                     "bytes_read": len(hit_local) * bs * 656,
                                     "read_ops": len(hit_local),
                                     "latency_us": float(rng.random() * 40) if hit_local else None,
                                     "batch_size": len(hit_local)},
                      "remote_pool": {"hit_blocks": [], "bytes_read": 0, "read_ops": 0,
                                      "latency_us": None, "batch_size": 0}}
                pre = {"prefix_cache_hit": cb > 0, "prefix_cached_blocks": cb,
                       "prefix_key": f"{r % 2:016x}",
                       "intersection_ratio": len(inter) / len(blocks),
                       "intersection_blocks": inter}
                recs.append(record(r, lv, seq - 1, seq, listed, bs, new_form=new_form,
                                   kv=kv, prefix=pre))
    # records that cannot be analysed: empty selection, a position past seq_len, no layer
    bad = [dict(recs[0], selected_token_pos=[]),
           dict(recs[1], selected_token_pos=[0, recs[1]["seq_len_current"]]),
           {k: v for k, v in recs[2].items() if k != "layer_id"}]
    for i, b in enumerate(bad):
        recs.insert(3 + 5 * i, b)
    extra = [(7, '{"event": "dsa_topk", "request_id": '), (12, "not json at all")] if malformed else ()
    return write_records(out, recs, bs, extra, backend="sim")


def sliding_window_trace(out: Path, *, window: int = 64, steps: int = 20, prompt: int = 300,
                         layers: int = 2, bs: int = 16) -> Path:
    """One request; every layer selects exactly the last ``window`` tokens at every step
    (positions seq_len - window ... seq_len - 1), one decode step per step_idx."""
    recs = []
    for s in range(steps):
        seq = prompt + s + 1
        pos = list(range(seq - window, seq))
        for lv in range(layers):
            recs.append(record(0, lv, seq - 1, seq, pos, bs))
    return write_records(out, recs, bs)


def distinct_trace(out: Path, *, records: int = 30, bs: int = 16, k: int = 8) -> Path:
    """Every record selects tokens of blocks no other record touches."""
    recs = []
    for i in range(records):
        base = i * bs * 4
        pos = list(range(base, base + k))
        recs.append(record(i % 3, i % 2, base + 4 * bs - 1, base + 4 * bs, pos, bs))
    return write_records(out, recs, bs)
