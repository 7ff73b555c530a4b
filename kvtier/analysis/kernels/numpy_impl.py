"""The numpy kernel set: always available, and the definition the numba set is tested against."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from kvtier.analysis.kernels.common import AMP_LEVELS, clogc_table, splitmix64


def _rec_of(offsets: np.ndarray) -> np.ndarray:
    n = offsets.shape[0] - 1
    return np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))


def _count_le(values: np.ndarray, offsets: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """``out[i, j]`` = #{v in record i : v <= thr[i, j]} for values sorted within records: one
    global ``searchsorted`` on ``record * 2**40 + value`` (records are consecutive)."""
    n = offsets.shape[0] - 1
    if n == 0:
        return np.zeros(thr.shape, dtype=np.int64)
    key = (_rec_of(offsets) << np.int64(40)) | values
    rows = np.arange(n, dtype=np.int64)[:, None] << np.int64(40)
    # a negative threshold counts nothing: query just below the record's first key
    q = np.where(thr < 0, rows - 1, rows | np.clip(thr, 0, (1 << 40) - 1))
    return np.searchsorted(key, q, side="right") - offsets[:-1, None]


def check_positions_np(pos, offsets, seq_len):
    """Per record: ``bad[i]`` (a position outside [0, seq_len)); and whether any record's
    positions are not strictly increasing (then the caller sorts and de-duplicates)."""
    n = offsets.shape[0] - 1
    lens = np.diff(offsets)
    bad = np.zeros(n, dtype=bool)
    if pos.shape[0] == 0:
        return bad, False
    rec = _rec_of(offsets)
    out = (pos < 0) | (pos >= np.repeat(seq_len, lens))
    if out.any():
        bad = np.bincount(rec[out], minlength=n) > 0
    inner = rec[1:] == rec[:-1]
    return bad, bool(((pos[1:] <= pos[:-1]) & inner).any())


def token_pass_np(pos, offsets, seq_len, edges, cut):
    """Per record: ``ge[i, j]`` = #{selected positions with offset (seq_len - 1 - pos) >=
    edges[j]}, ``amp[i, l]`` = distinct blocks at block size 2**l and ``below[i]`` =
    #{positions < cut[i]}."""
    n = offsets.shape[0] - 1
    thr = (seq_len - 1)[:, None] - edges[None, :]  # offset >= e  <=>  pos <= seq_len - 1 - e
    both = _count_le(pos, offsets, np.concatenate([thr, (cut - 1)[:, None]], axis=1))
    ge, below = both[:, :-1], both[:, -1]
    amp = np.zeros((n, AMP_LEVELS), dtype=np.int64)
    lens = np.diff(offsets)
    nonempty = lens > 0
    amp[nonempty] = 1
    if pos.shape[0] > 1:
        x = pos[1:] ^ pos[:-1]
        inner = offsets[1:-1]
        x[inner[(inner > 0) & (inner < pos.shape[0])] - 1] = 0  # pairs across records
        # the blocks of two consecutive positions differ at level l iff x >> l != 0, i.e.
        # for l < bit_length(x); bit_length from the float exponent (exact below 2**53)
        bl = np.frexp(x.astype(np.float64))[1].astype(np.int64)
        np.minimum(bl, AMP_LEVELS, out=bl)
        rec = _rec_of(offsets)[1:]
        h = np.bincount(rec * (AMP_LEVELS + 1) + bl, minlength=n * (AMP_LEVELS + 1))
        h = h.reshape(n, AMP_LEVELS + 1)
        # pairs with bit_length > l add one block at level l
        amp += np.cumsum(h[:, :0:-1], axis=1)[:, ::-1]
    return ge, amp, below


def block_pass_np(pos, offsets, seq_len, bs, wins, clogc):
    """Re-bucket to ``bs`` and the per-record block statistics.

    Returns ``boff`` (n + 1), ``blocks``, ``counts`` (selected tokens per block), and per
    record ``span`` (max - min + 1), ``slogc`` (sum of c ln c over blocks), ``gini``,
    ``nearb[i, j]`` (#blocks with cur_block - b <= wins[j]) and ``sumdist`` (sum of
    max(0, cur_block - b)), cur_block = (seq_len - 1) // bs."""
    n = offsets.shape[0] - 1
    b = pos >> np.int64(bs.bit_length() - 1) if bs & (bs - 1) == 0 else pos // bs
    m = b.shape[0]
    start = np.ones(m, dtype=bool)
    if m > 1:
        np.not_equal(b[1:], b[:-1], out=start[1:])
    start[offsets[:-1][offsets[:-1] < m]] = True
    idx = np.flatnonzero(start)
    blocks = b[idx]
    counts = np.diff(np.append(idx, m))
    per = np.bincount(_rec_of(offsets)[idx], minlength=n).astype(np.int64)
    boff = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(per, out=boff[1:])
    nz = per > 0
    span = np.zeros(n, dtype=np.int64)
    span[nz] = blocks[boff[1:][nz] - 1] - blocks[boff[:-1][nz]] + 1
    slogc = np.zeros(n)
    safe = np.minimum(counts, bs)  # runs exceed bs only in unsorted input (discarded)
    if blocks.shape[0]:
        slogc[nz] = np.add.reduceat(clogc[safe], boff[:-1][nz])
    gini = _gini_np(safe, boff, bs)
    cur = (seq_len - 1) // bs
    # #(cur - b <= w) = #(b >= cur - w) = U - #(b <= cur - w - 1)
    le = _count_le(blocks, boff, cur[:, None] - wins[None, :] - 1)
    nearb = per[:, None] - le
    bsum = np.zeros(n, dtype=np.int64)
    if blocks.shape[0]:
        bsum[nz] = np.add.reduceat(blocks, boff[:-1][nz])
    # blocks never exceed cur_block for valid records, so max(0, cur - b) = cur - b
    sumdist = per * cur - bsum
    return boff, blocks, counts, span, slogc, gini, nearb, sumdist


def _gini_np(counts, boff, bs):
    """Gini of each record's token counts per block, from a histogram of the counts (counts
    are 1 ... bs, so sorting is a counting sort): with f_v blocks of count v and a_v blocks of
    smaller counts, the sorted ranks of value v are a_v + 1 ... a_v + f_v, so
    sum_i i x_(i) = sum_v v (f_v a_v + f_v (f_v + 1) / 2)."""
    n = boff.shape[0] - 1
    u = np.diff(boff)
    out = np.zeros(n)
    if counts.shape[0] == 0:
        return out
    rec = _rec_of(boff)
    f = np.bincount(rec * (bs + 1) + counts, minlength=n * (bs + 1)).reshape(n, bs + 1)
    a = np.cumsum(f, axis=1) - f
    v = np.arange(bs + 1, dtype=np.float64)
    s_ix = (v * (f * a + f * (f + 1) / 2.0)).sum(axis=1)
    tot = (v * f).sum(axis=1)
    ok = (u > 0) & (tot > 0)
    out[ok] = 2.0 * s_ix[ok] / (u[ok] * tot[ok]) - (u[ok] + 1.0) / u[ok]
    return out


def records_pass_np(pos, offsets, seq_len, edges, cut, sizes, wins, scratch=None):
    """Everything computed from the positions of a chunk: ``bad`` (a position outside
    [0, seq_len)), ``unsorted`` (some record not strictly increasing), ``ge``, ``amp``,
    ``below`` (``token_pass_np``) and per block size the ``block_pass_np`` outputs."""
    pos = pos.astype(np.int64, copy=False)  # int32 from the columnar twin: no int32 overflow
    bad, unsorted = check_positions_np(pos, offsets, seq_len)
    ge, amp, below = token_pass_np(pos, offsets, seq_len, edges, cut)
    per = {s: block_pass_np(pos, offsets, seq_len, s, wins, clogc_table(s)) for s in sizes}
    return SimpleNamespace(bad=bad, unsorted=unsorted, ge=ge, amp=amp, below=below, blocks=per)


def groups_by_rank(ids: np.ndarray) -> list[np.ndarray]:
    """Record indices split into groups in which every id occurs at most once, in order: the
    k-th record of an id goes to group k. Processing the groups in turn is processing the
    records in order, for state kept per id."""
    n = ids.shape[0]
    if n == 0:
        return []
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    first = np.ones(n, dtype=bool)
    first[1:] = s[1:] != s[:-1]
    seg_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - seg_start
    by = np.argsort(rank, kind="stable")
    cuts = np.flatnonzero(np.diff(rank[by])) + 1
    return np.split(by, cuts)


def _expand(boff: np.ndarray, recs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index into blocks, position in ``recs``) for every block of records ``recs``."""
    lo, hi = boff[recs], boff[recs + 1]
    ln = hi - lo
    which = np.repeat(np.arange(recs.shape[0], dtype=np.int64), ln)
    start = np.repeat(lo - np.cumsum(ln) + ln, ln)
    return start + np.arange(which.shape[0], dtype=np.int64), which


def stream_pass_np(st, sid, step, sord, boff, blocks, ws_windows, cap_steps,
                   reuse_hist, jacc, ws, caps, hits):
    """Per-stream temporal metrics of one chunk (see ``state.StreamState``): reuse distance
    histogram and first touches, Jaccard with the stream's previous record, working sets,
    and the LRU hits at every capacity of ``caps`` (``lru_pass_np``). ``sord`` = the record's
    step ordinal in its stream. Returns first touches."""
    first = _stream_np(st, sid, step, sord, boff, blocks, ws_windows, cap_steps, reuse_hist,
                       jacc, ws)
    if caps.shape[0]:
        lru_pass_np(st, sid, boff, blocks, caps, hits)
    return first


def _stream_np(st, sid, step, sord, boff, blocks, ws_windows, cap_steps, reuse_hist, jacc,
               ws):
    wmax = st.wmax
    ring = st.ring
    first_total = 0
    for recs in groups_by_rank(sid):
        s = sid[recs]
        o = sord[recs]
        r = st.rec_count[s]
        # advance each stream's ring of per-ordinal block counts to ordinal o
        top = st.ring_top[s]
        for j in range(wmax):  # ordinals (max(top, o - wmax), o] start empty
            q = o - j
            clear = (q > top) & (q >= 0)
            ring[s[clear] * wmax + q[clear] % wmax] = 0
        st.ring_top[s] = np.maximum(top, o)
        bi, which = _expand(boff, recs)
        e = st.base[s][which] + blocks[bi]
        lr = st.last_rec[e]
        seen = lr >= 0
        first_total += int((~seen).sum())
        d = np.clip(step[recs][which] - st.last_step[e], 0, cap_steps)[seen]
        reuse_hist += np.bincount(d, minlength=cap_steps + 1)
        inter = np.bincount(which[seen & (lr == r[which] - 1)], minlength=recs.shape[0])
        u = np.diff(boff)[recs]
        has_prev = r > 0
        union = u + st.prev_size[s] - inter
        jacc[recs] = np.where(has_prev, inter / np.maximum(union, 1), np.nan)
        lo = st.last_ord[e]
        dec = seen & (lo > o[which] - wmax)
        np.subtract.at(ring, s[which][dec] * wmax + lo[dec] % wmax, 1)
        np.add.at(ring, s[which] * wmax + o[which] % wmax, 1)
        st.last_rec[e] = r[which]
        st.last_step[e] = step[recs][which]
        st.last_ord[e] = o[which]
        st.prev_size[s] = u
        st.rec_count[s] = r + 1
        acc = np.zeros(recs.shape[0], dtype=np.int64)
        wi = 0
        for j in range(int(ws_windows[-1]) if ws_windows.shape[0] else 0):
            q = o - j
            acc += np.where(q >= 0, ring[s * wmax + q % wmax], 0)
            while wi < ws_windows.shape[0] and ws_windows[wi] == j + 1:
                ws[recs, wi] = acc
                wi += 1
    return first_total


def lru_pass_np(st, sid, boff, blocks, caps, hits):
    """Per-stream LRU at every capacity of ``caps`` (ascending), blocks fed in ascending order
    per record: hits[c] += accesses with LRU stack distance < caps[c] in their stream. State:
    each stream's ``caps[-1]`` most recent blocks (``st.lru_lists``); the chunk's accesses are
    appended to them and stack distances come from ``kvtier.sim.cachesim.stack_distances``."""
    from kvtier.sim.cachesim import stack_distances

    if blocks.shape[0] == 0:
        return
    cmax = int(caps[-1])
    u = np.diff(boff)
    acc_sid = np.repeat(sid, u)
    order = np.argsort(acc_sid, kind="stable")
    a_sid, a_blk = acc_sid[order], blocks[order]
    streams, starts = np.unique(a_sid, return_index=True)
    ends = np.append(starts[1:], a_sid.shape[0])
    parts_k, parts_real, seg_of = [], [], []
    for j, s in enumerate(streams.tolist()):
        prev = st.lru_lists.get(s)
        mine = a_blk[starts[j]:ends[j]]
        if prev is not None and prev.shape[0]:
            parts_k.append(prev)
            parts_real.append(np.zeros(prev.shape[0], dtype=bool))
            seg_of.append(np.full(prev.shape[0], j, dtype=np.int64))
        parts_k.append(mine)
        parts_real.append(np.ones(mine.shape[0], dtype=bool))
        seg_of.append(np.full(mine.shape[0], j, dtype=np.int64))
    blk = np.concatenate(parts_k)
    real = np.concatenate(parts_real)
    seg = np.concatenate(seg_of)
    span = int(blk.max()) + 1
    keys = seg * span + blk
    d = stack_distances(keys)
    dr = d[real]
    for c in range(caps.shape[0]):
        hits[c] += int(((dr >= 0) & (dr < caps[c])).sum())
    # new state: per stream, its last cmax distinct blocks in recency order (LRU first)
    n = keys.shape[0]
    korder = np.argsort(keys, kind="stable")
    last = np.ones(n, dtype=bool)
    ks = keys[korder]
    last[korder[:-1]] = ks[1:] != ks[:-1]
    idx = np.flatnonzero(last)  # ascending position = recency order within each segment
    seg_l = seg[idx]
    cuts = np.flatnonzero(np.diff(seg_l)) + 1
    for j, part in zip(np.unique(seg_l).tolist(), np.split(idx, cuts), strict=True):
        st.lru_lists[int(streams[j])] = blk[part[-cmax:]].copy()


def iou_pass_np(st, rslot, gidx, step, layer, boff, blocks, iou):
    """Cross-layer IoU: ``iou[i]`` = |B_i ∩ B_j| / |B_i ∪ B_j| where j is the same request's
    previous record if that is the same step at layer - 1, else NaN (``locality.IoUState``)."""
    for recs in groups_by_rank(rslot):
        r = rslot[recs]
        pair = (st.last_step[r] == step[recs]) & (st.last_layer[r] == layer[recs] - 1)
        bi, which = _expand(boff, recs)
        e = st.base[r][which] + blocks[bi]
        same = st.stamp[e] == st.last_gid[r][which]
        inter = np.bincount(which[same & pair[which]], minlength=recs.shape[0])
        u = np.diff(boff)[recs]
        union = u + st.last_size[r] - inter
        iou[recs] = np.where(pair, inter / np.maximum(union, 1), np.nan)
        st.stamp[e] = gidx[recs][which]
        st.last_gid[r] = gidx[recs]
        st.last_step[r] = step[recs]
        st.last_layer[r] = layer[recs]
        st.last_size[r] = u


def sample_keys_np(req, layer, boff, blocks, threshold):
    """Shared-cache keys ``block_key(request, layer, block)`` of the chunk, spatially sampled:
    kept when the top 24 bits of splitmix64(key) are < ``threshold`` (2**24 keeps all)."""
    from kvtier.policies.base import block_keys_columns

    u = np.diff(boff)
    keys = block_keys_columns(np.repeat(req, u), np.repeat(layer, u), blocks)
    if threshold >= 1 << 24:
        return keys
    h = splitmix64(keys) >> np.uint64(40)
    return keys[h < np.uint64(threshold)]


def opt_hits_np(keys, caps):
    """Belady/OPT (demand paging) hits at each capacity: ``kvtier.sim.cachesim.simulate`` with
    the ``belady`` policy, as ``kvtier sweep`` runs it."""
    from kvtier.policies.belady import BeladyPolicy
    from kvtier.sim.cachesim import simulate

    return np.array([simulate(BeladyPolicy(int(c)), keys).hits if c > 0 else 0 for c in caps],
                    dtype=np.int64)


NUMPY = SimpleNamespace(
    name="numpy", records_pass=records_pass_np, stream_pass=stream_pass_np,
    iou_pass=iou_pass_np, sample_keys=sample_keys_np, opt_hits=opt_hits_np)
