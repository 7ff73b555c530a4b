"""The straightforward per-record pure-Python implementation of every ``kvtier analyze``
metric (docs/ANALYSIS.md), as a reader of the definitions would write it: records as dicts,
sets, dicts, ``OrderedDict`` LRUs, a list-scan LRU stack and a scanning Belady. The fast path
(``kvtier.analysis``) must produce the same ``analysis.json`` numbers (tests/test_analysis.py,
benchmarks/bench_analyze.py). Only the shared-cache curves are compared exactly
(``shared_samples = 0``); sampling is tested on its own.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np

from kvtier.trace.reader import find_trace

TIERS = ("hbm", "local_pool", "remote_pool")
AMP_SIZES = [1 << i for i in range(10)]
WHATIF = [16, 32, 64, 128, 256, 512]


class D:
    """A distribution: values kept, summarised at the end (sample std)."""

    def __init__(self):
        self.v = []

    def add(self, x):
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return
        self.v.append(float(x))

    def out(self):
        v = self.v
        if not v:
            return {"count": 0, "min": 0.0, "max": 0.0, "mean": 0.0, "std": 0.0}
        m = sum(v) / len(v)
        std = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        return {"count": len(v), "min": min(v), "max": max(v), "mean": m, "std": std}


def iter_raw_records(trace):
    """Every record dict of a trace; lines that are not JSON objects are skipped and counted
    by reason (truncated_final_line: the last line without its newline; malformed_json;
    invalid_record: JSON that is not an object)."""
    tf = find_trace(trace)
    bad = {"truncated_final_line": 0, "malformed_json": 0, "invalid_record": 0}
    out = []
    for f in tf.files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            out.extend(pq.read_table(f).to_pylist())
            continue
        data = Path(f).read_bytes()
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                last = i == len(lines) - 1  # no newline after it
                bad["truncated_final_line" if last else "malformed_json"] += 1
                continue
            if not isinstance(rec, dict):
                bad["invalid_record"] += 1
                continue
            out.append(rec)
    return out, bad, tf


def get(rec, dotted):
    v = rec
    for part in dotted.split("."):
        if not isinstance(v, dict):
            return None
        v = v.get(part)
    return v


def count_of(v):
    if isinstance(v, list):
        return len(v)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def tier_time(tier, segs, seg_bytes):
    if tier.method in ("per_row_dma", "rdma_sg") and tier.slice_bytes:
        ops = segs * -(-seg_bytes // tier.slice_bytes)
    else:
        ops = segs
    nbytes = segs * seg_bytes
    if ops == 0 and nbytes == 0:
        return 0.0
    return (tier.base_latency_us + tier.hops * tier.per_hop_latency_us
            + math.ceil(ops / tier.max_batch) * tier.per_op_us + nbytes / (tier.read_bw_gb_s * 1e3))


def lru_stack_distances(keys):
    stack = []  # most recent last
    out = []
    for k in keys:
        if k in stack:
            i = stack.index(k)
            out.append(len(stack) - 1 - i)
            stack.pop(i)
        else:
            out.append(-1)
        stack.append(k)
    return out


def belady_hits(keys, cap):
    if cap <= 0:
        return 0
    nxt = [len(keys)] * len(keys)
    last = {}
    for i in range(len(keys) - 1, -1, -1):
        nxt[i] = last.get(keys[i], len(keys))
        last[keys[i]] = i
    res = {}
    hits = 0
    for i, k in enumerate(keys):
        if k in res:
            hits += 1
        elif len(res) == cap:
            victim = max(res, key=lambda x: res[x])
            del res[victim]
        res[k] = nxt[i]
    return hits


def reference_analysis(trace, settings, tier_cfg, kvb_default=None, shared=True):
    """``settings``: a checked ``AnalysisSettings``; ``tier_cfg``: the loaded tier preset;
    ``shared=False`` leaves out the shared-cache curves (their list-scan LRU stack is
    quadratic)."""
    raw, bad_lines, tf = iter_raw_records(trace)
    return reference_from_records(raw, bad_lines, tf, settings, tier_cfg, kvb_default, shared)


def reference_from_records(raw, bad_lines, tf, settings, tier_cfg, kvb_default=None,
                           shared=True):
    """``reference_analysis`` of already parsed record dicts (they are annotated in place)."""
    meta_cfg = (tf.meta.config if tf.meta is not None else {}) or {}
    kvb = settings.kv_bytes_per_token or meta_cfg.get("kv_bytes_per_token") or kvb_default
    req_index = {}
    rec_bs = None
    skipped = {"missing_field": 0, "empty_selection": 0, "invalid": 0,
               "max_steps_per_stream": 0}
    recs = []
    required = ("request_id", "layer_id", "step_idx", "seq_len_current", "selected_token_pos")
    for rec in raw:
        if any(rec.get(f) is None for f in required):
            skipped["missing_field"] += 1
            continue
        if rec["request_id"] not in req_index:
            req_index[rec["request_id"]] = len(req_index)
        if rec_bs is None and rec.get("block_size_tokens"):
            rec_bs = int(rec["block_size_tokens"])
        pos = rec["selected_token_pos"]
        seq = rec["seq_len_current"]
        if not pos:
            skipped["empty_selection"] += 1
            continue
        if rec["layer_id"] < 0 or rec["step_idx"] < 0 or seq < 1 or any(p < 0 or p >= seq for p in pos):
            skipped["invalid"] += 1
            continue
        recs.append(rec)
    # --max-steps-per-stream: the records of each stream's first N steps
    if settings.max_steps_per_stream:
        kept, seen = [], {}
        for rec in recs:
            key = (rec["request_id"], rec["layer_id"]) if settings.key_mode == "request_layer" \
                else rec["request_id"]
            steps = seen.setdefault(key, [])
            if not steps or steps[-1] != rec["step_idx"]:
                steps.append(rec["step_idx"])
            if len(steps) <= settings.max_steps_per_stream:
                kept.append(rec)
            else:
                skipped["max_steps_per_stream"] += 1
        recs = kept
    first_step = {}
    for rec in recs:
        first_step.setdefault(rec["request_id"], rec["step_idx"])
        rec["_pos"] = sorted(set(rec["selected_token_pos"]))
        rec["_req"] = req_index[rec["request_id"]]
        rec["_d"] = rec["step_idx"] - first_step[rec["request_id"]]
    sizes = list(settings.block_sizes or [rec_bs or 16])
    out = {
        "records_analyzed": len(recs), "requests": len(req_index),
        "layers": len({r["layer_id"] for r in recs}), "block_size_recorded": rec_bs,
        "kv_bytes_per_token": kvb,
        "skipped": {**bad_lines, **skipped},
        "results": [block_size_section(recs, bs, settings, shared) for bs in sizes],
        "read_amplification": amplification(recs, tier_cfg, kvb),
        "offsets": offsets_section(recs),
        "prefix": prefix_section(recs, rec_bs),
        "tiers": tiers_section(recs, meta_cfg.get("backend")),
    }
    return out


def amplification(recs, cfg, kvb):
    blocks = [0] * 10
    per = [D() for _ in range(10)]
    tok = 0
    pools = [p for p in ("local_pool", "remote_pool") if getattr(cfg, p, None) is not None]
    tsum = {p: [0.0] * 10 for p in pools}
    for r in recs:
        pos = r["_pos"]
        tok += len(pos)
        for lv in range(10):
            u = len({p >> lv for p in pos})
            blocks[lv] += u
            per[lv].add(u * (1 << lv) / len(pos))
            for p in pools:
                tsum[p][lv] += tier_time(getattr(cfg, p), u, (1 << lv) * kvb)
    n = len(recs)
    rows = [{"block_size_tokens": s, "ratio": blocks[i] * s / tok, "blocks_per_record": blocks[i] / n,
             "per_record": per[i].out()} for i, s in enumerate(AMP_SIZES)]
    whatif = []
    for big in WHATIF:
        lb = big.bit_length() - 1
        for ls in range(lb, -1, -1):
            sub = 1 << ls
            row = {"block_size_tokens": big, "sub_blocks": big // sub, "sub_block_tokens": sub,
                   "read_amplification": blocks[ls] * sub / tok,
                   "bytes_per_record": blocks[ls] / n * sub * kvb,
                   "ops_per_record": blocks[ls] / n,
                   "extra_ops_per_record": blocks[ls] / n - blocks[lb] / n}
            for p in pools:
                row[f"{p}_fetch_us_per_record"] = tsum[p][ls] / n
            whatif.append(row)
    return {"kv_bytes_per_token": kvb, "tiers": cfg.name, "records": n, "selected_tokens": tok,
            "by_block_size": rows, "subblock_whatif": whatif}


def offsets_section(recs):
    from bisect import bisect_right

    from kvtier.analysis.analyze import OFFSET_EDGES

    edges = OFFSET_EDGES.tolist()
    hist = defaultdict(lambda: [0] * len(edges))
    for r in recs:
        h = hist[r["layer_id"]]
        for p in r["_pos"]:
            h[bisect_right(edges, r["seq_len_current"] - 1 - p) - 1] += 1
    layers = sorted(hist)
    return {"edges_tokens": edges, "layers": layers, "counts_by_layer": [hist[lv] for lv in layers]}


def prefix_section(recs, rec_bs):
    ratio, share = D(), D()
    by = defaultdict(lambda: [D(), D(), D()])
    touch = defaultdict(int)
    cached_records, cached_reqs = 0, set()
    for r in recs:
        pos = r["_pos"]
        cached = get(r, "prefix.prefix_cached_blocks") or 0
        cut = max(cached, 0) * (rec_bs or 0)
        sh = sum(1 for p in pos if p < cut) / len(pos)
        rt = get(r, "prefix.intersection_ratio")
        hit = get(r, "prefix.prefix_cache_hit")
        ratio.add(rt)
        share.add(sh)
        b = by[r["_d"]]
        b[0].add(rt)
        b[1].add(sh)
        b[2].add(None if hit is None else float(hit))
        if cached > 0:
            cached_records += 1
            cached_reqs.add(r["_req"])
        ib = get(r, "prefix.intersection_blocks")
        if isinstance(ib, list):
            ids = ib
        elif rec_bs:
            blocks = sorted({p // rec_bs for p in pos})
            ids = blocks[:max(0, min(count_of(ib), len(blocks)))]
        else:
            ids = []
        for i in ids:
            touch[i] += 1
    steps = sorted(by)
    hot = sorted(touch.items(), key=lambda kv: (-kv[1], kv[0]))[:32]
    return {
        "block_size_tokens": rec_bs, "records": len(recs),
        "records_with_cached_prefix": cached_records,
        "requests_with_cached_prefix": len(cached_reqs),
        "intersection_ratio": ratio.out(), "cached_prefix_token_share": share.out(),
        "by_decode_step": {
            "decode_step": steps, "records": [len(by[d][1].v) for d in steps],
            "intersection_ratio_mean": [by[d][0].out()["mean"] if by[d][0].v else None
                                        for d in steps],
            "cached_prefix_token_share_mean": [by[d][1].out()["mean"] for d in steps],
            "prefix_cache_hit_share": [by[d][2].out()["mean"] if by[d][2].v else None
                                       for d in steps],
        },
        "hot_prefix_blocks": [{"block_id": b, "records": c, "share_of_records": c / len(recs)}
                              for b, c in hot if c > 0],
    }


def tiers_section(recs, backend):
    total = sum(count_of(get(r, f"kv_fetch.{t}.hit_blocks")) for r in recs for t in TIERS)
    out = {"backend": backend, "records": len(recs), "replayed": bool(backend and backend != "hbm")}
    for t in TIERS:
        # design-note schema: len(hit_blocks) = batch_size; the earlier form: a count
        hits = [count_of(get(r, f"kv_fetch.{t}.hit_blocks")) for r in recs]
        lat = [get(r, f"kv_fetch.{t}.latency_us") for r in recs]
        lat = [x for x in lat if x is not None]
        s = {f: sum(count_of(get(r, f"kv_fetch.{t}.{f}")) for r in recs)
             for f in ("bytes_read", "read_ops", "batch_size")}
        lat_d = {"count": len(lat)}
        if lat:
            lat_d.update({"mean": sum(lat) / len(lat),
                          **{f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)},
                          "max": max(lat)})
        else:
            lat_d.update({"mean": None, "p50": None, "p95": None, "p99": None, "max": None})
        out[t] = {"hit_blocks": sum(hits), "hit_share": sum(hits) / total if total else 0.0,
                  "bytes_read": s["bytes_read"], "read_ops": s["read_ops"],
                  "records_served": sum(1 for h in hits if h > 0),
                  "batch_size_mean": s["batch_size"] / len(recs), "latency_us": lat_d}
    return out


def union_records(recs):
    """Consecutive records of one request with one step -> one virtual record."""
    open_ = {}
    out = []
    for r in recs:
        q = r["_req"]
        cur = open_.get(q)
        if cur is not None and cur["step_idx"] != r["step_idx"]:
            out.append(cur)
            cur = None
        if cur is None:
            cur = open_[q] = {"_req": q, "layer_id": -1, "step_idx": r["step_idx"],
                              "seq_len_current": r["seq_len_current"], "_set": set()}
        cur["seq_len_current"] = max(cur["seq_len_current"], r["seq_len_current"])
        cur["_set"].update(r["_pos"])
    out.extend(open_.values())
    for v in out:
        v["_pos"] = sorted(v["_set"])
    return out


def block_size_section(recs, bs, s, with_shared=True):
    per_layer = s.key_mode == "request_layer" and not s.step_union
    srecs = union_records(recs) if s.step_union else recs
    st = {k: D() for k in ("ub", "span", "dens", "tpb", "ent", "gini", "mbd", "jac")}
    rtr = {w: D() for w in s.recent_token_windows}
    rbr = {w: D() for w in s.recent_block_windows}
    wsd = {w: D() for w in s.ws_windows}
    reuse = defaultdict(int)
    first_touch = 0
    prev_set, last_step, history, step_ord = {}, defaultdict(dict), defaultdict(list), {}
    lru = {c: defaultdict(OrderedDict) for c in s.lru_caps}
    lru_hits = {c: 0 for c in s.lru_caps}
    accesses = 0
    jac_layer = defaultdict(D)
    for r in srecs:
        pos = r["_pos"]
        k = len(pos)
        counts = defaultdict(int)
        for p in pos:
            counts[p // bs] += 1
        blocks = sorted(counts)
        u = len(blocks)
        span = blocks[-1] - blocks[0] + 1
        st["ub"].add(u)
        st["span"].add(span)
        st["dens"].add(u / span)
        st["tpb"].add(k / u)
        h = -sum((c / k) * math.log(c / k) for c in counts.values())
        st["ent"].add(h / math.log(u) if u > 1 else 0.0)
        xs = sorted(counts.values())
        st["gini"].add(2 * sum(i * x for i, x in enumerate(xs, 1)) / (u * sum(xs)) - (u + 1) / u)
        tail = r["seq_len_current"] - 1
        for w in s.recent_token_windows:
            rtr[w].add(sum(1 for p in pos if tail - p <= w) / k)
        cur = tail // bs
        dists = [max(0, cur - b) for b in blocks]
        for w in s.recent_block_windows:
            rbr[w].add(sum(1 for d in dists if d <= w) / u)
        st["mbd"].add(sum(dists) / u)
        key = (r["_req"], r["layer_id"]) if per_layer else r["_req"]
        bset = set(blocks)
        if key in prev_set:
            p = prev_set[key]
            j = len(p & bset) / len(p | bset)
            st["jac"].add(j)
            if per_layer:
                jac_layer[r["layer_id"]].add(j)
        prev_set[key] = bset
        for b in blocks:
            if b in last_step[key]:
                reuse[min(max(r["step_idx"] - last_step[key][b], 0), s.reuse_cap_steps)] += 1
            else:
                first_touch += 1
            last_step[key][b] = r["step_idx"]
        so = step_ord.get(key)
        if so is None or so[1] != r["step_idx"]:
            so = step_ord[key] = ((so[0] + 1) if so else 0, r["step_idx"])
        history[key].append((so[0], bset))
        for w in s.ws_windows:
            ws = set()
            for o, bb in history[key]:
                if o > so[0] - w:
                    ws |= bb
            wsd[w].add(len(ws))
        for c in s.lru_caps:
            cache = lru[c][key]
            for b in blocks:
                if b in cache:
                    lru_hits[c] += 1
                    cache.move_to_end(b)
                else:
                    cache[b] = True
                    if len(cache) > c:
                        cache.popitem(last=False)
        accesses += u
    total = sum(reuse.values())
    cum = 0
    cdf = []
    for d in sorted(reuse):
        cum += reuse[d]
        cdf.append({"reuse_distance_steps": d, "cdf": cum / total})
    cache_sim = {str(c): {"capacity_blocks": c, "hits": lru_hits[c], "misses": accesses - lru_hits[c],
                          "hit_rate": lru_hits[c] / accesses if accesses else 0.0}
                 for c in s.lru_caps}
    # beyond: the trace's own records
    amp_b, amp_t, amp_r = 0, 0, D()
    tpb = [0] * (bs + 1)
    ub_layer = defaultdict(D)
    iou, iou_pair = D(), defaultdict(D)
    heat = defaultdict(list)
    prev = {}
    keys = []
    for r in recs:
        pos = r["_pos"]
        counts = defaultdict(int)
        for p in pos:
            counts[p // bs] += 1
        blocks = sorted(counts)
        u = len(blocks)
        amp_b += u
        amp_t += len(pos)
        amp_r.add(u * bs / len(pos))
        for c in counts.values():
            tpb[c] += 1
        ub_layer[r["layer_id"]].add(u)
        heat[(r["_d"], r["layer_id"])].append(u)
        bset = set(blocks)
        q = r["_req"]
        pv = prev.get(q)
        if pv is not None and pv[0] == r["step_idx"] and pv[1] == r["layer_id"] - 1:
            v = len(pv[2] & bset) / len(pv[2] | bset)
            iou.add(v)
            iou_pair[r["layer_id"]].add(v)
        prev[q] = (r["step_idx"], r["layer_id"], bset)
        keys.extend((q << 32) | (r["layer_id"] << 24) | b for b in blocks)
    n_streams = len(prev_set)
    shared = (shared_section(keys, cache_sim, n_streams, per_layer and not s.step_union)
              if with_shared else None)
    layers = sorted(ub_layer)
    d_max = max(d for d, _ in heat) + 1
    l_max = max(lv for _, lv in heat) + 1
    heat_rows = [[(sum(heat[(d, lv)]) / len(heat[(d, lv)])) if (d, lv) in heat else None
                  for lv in range(l_max)] for d in range(d_max)]
    return {
        "block_size_tokens": bs, "key_mode": s.key_mode, "step_union": s.step_union,
        "streams": n_streams,
        "record_stats": {
            "unique_blocks": st["ub"].out(), "block_span": st["span"].out(),
            "block_density": st["dens"].out(), "tokens_per_block_mean": st["tpb"].out(),
            "block_concentration": {"normalized_entropy": st["ent"].out(), "gini": st["gini"].out()},
            "recent_locality": {
                "recent_token_ratio": {str(w): rtr[w].out() for w in s.recent_token_windows},
                "recent_block_ratio": {str(w): rbr[w].out() for w in s.recent_block_windows},
                "mean_block_distance": st["mbd"].out(),
            },
        },
        "temporal_locality": {
            "step_jaccard": st["jac"].out(),
            "reuse_distance_hist_steps": {str(d): reuse[d] for d in sorted(reuse)},
            "reuse_distance_cdf_steps": cdf, "first_touch_blocks": first_touch,
            "reuse_samples": total, "reuse_cap_steps": s.reuse_cap_steps,
        },
        "working_set": {str(w): wsd[w].out() for w in s.ws_windows},
        "cache_sim": cache_sim,
        "read_amplification": {"ratio": amp_b * bs / amp_t, "per_record": amp_r.out()},
        "cross_layer_overlap": {"iou": iou.out(), "by_layer_pair": [
            {"layers": [lv - 1, lv], **iou_pair[lv].out()} for lv in sorted(iou_pair)]},
        **({"shared_cache": shared} if with_shared else {}),
        "by_layer": {"layers": layers,
                     "unique_blocks_mean": [ub_layer[lv].out()["mean"] for lv in layers],
                     "step_jaccard_mean": ([jac_layer[lv].out()["mean"] if jac_layer[lv].v else None
                                            for lv in layers] if per_layer else None)},
        "unique_blocks_by_decode_step_layer": heat_rows,
        "tokens_per_block_hist": tpb,
    }


def shared_section(keys, cache_sim, n_streams, same):
    n = len(keys)
    ws = len(set(keys))
    d = lru_stack_distances(keys)
    grid = sorted({int(x) for x in np.round(np.geomspace(1, max(ws, 1), 48))} | {ws})
    per_caps = [int(c) * n_streams for c in cache_sim]
    opt_grid = sorted({int(x) for x in np.round(np.geomspace(1, max(ws, 1), 16))} | set(per_caps))

    def lru_miss(c):
        return 1.0 - sum(1 for x in d if 0 <= x < c) / n

    opt = {c: 1.0 - belady_hits(keys, c) / n for c in opt_grid}
    return {
        "key": "block_key(request, layer, block) in trace order (as kvtier sweep / mrc)",
        "accesses": n, "sample_rate": 1.0, "sampled_accesses": n, "exact": True,
        "working_set_blocks": ws,
        "capacity_blocks": grid, "lru_miss_ratio": [lru_miss(c) for c in grid],
        "opt_capacity_blocks": opt_grid, "opt_miss_ratio": [opt[c] for c in opt_grid],
        "opt_vs_lru": [{"capacity_blocks": c, "lru_miss_ratio": lru_miss(c),
                        "opt_miss_ratio": opt[c]} for c in opt_grid],
        "per_stream_vs_shared": [
            {"capacity_per_stream": int(c), "total_capacity_blocks": int(c) * n_streams,
             "per_stream_lru_miss_ratio": 1.0 - sim["hit_rate"],
             "shared_lru_miss_ratio": lru_miss(int(c) * n_streams),
             "shared_opt_miss_ratio": opt[int(c) * n_streams]}
            for c, sim in cache_sim.items()],
        "per_stream_same_accesses": same,
    }
