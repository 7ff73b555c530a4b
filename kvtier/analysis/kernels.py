"""The analysis hot loops, in two implementations with one set of signatures.

Every function below exists as plain numpy (always available) and as a numba kernel (extra
``fast``). ``kernels()`` returns the numba set when numba imports and ``KVTIER_NO_NUMBA`` is
unset, else the numpy set; ``tests/test_analysis_kernels.py`` pins both to the same outputs.

What numba buys (one core, K = 2048, 16-token blocks): the numpy path makes several passes over
every selected position and block (a shift, a comparison, a gather, a bincount ...) and runs
the per-stream state (reuse distance, working sets, LRU) one group of records at a time with
``np.add.at``; the kernels make one pass over the positions and one over the blocks of each
record, holding the record's working state in registers. See docs/BENCHMARKS.md.

Conventions: all index arrays are int64; a chunk of ``n`` records has ``offsets`` (n + 1) into
``pos`` (sorted, unique within each record, 0 <= pos < seq_len); block ids of a record are
``pos // bs``, ascending. State arrays are owned by the caller (``kvtier.analysis.locality``)
and updated in place.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

#: power-of-two block sizes for read amplification: 2**0 ... 2**(AMP_LEVELS - 1) = 1 ... 512
AMP_LEVELS = 10

_numba_ns: SimpleNamespace | None = None
_numba_failed = False


def numba_disabled() -> bool:
    """True when ``KVTIER_NO_NUMBA`` is set to anything but '' or '0'."""
    return os.environ.get("KVTIER_NO_NUMBA", "") not in ("", "0")


def kernels() -> SimpleNamespace:
    """The kernel set in use: numba when available and enabled, else numpy."""
    k = numba_kernels()
    return k if k is not None else NUMPY


def numba_kernels() -> SimpleNamespace | None:
    global _numba_ns, _numba_failed
    if numba_disabled() or _numba_failed:
        return None
    if _numba_ns is None:
        try:
            _numba_ns = _build_numba()
        except ImportError:
            _numba_failed = True
            return None
    return _numba_ns


def clogc_table(bs: int) -> np.ndarray:
    """``c * ln(c)`` for c = 0 ... bs (0 for c = 0): the per-block entropy terms."""
    c = np.arange(bs + 1, dtype=np.float64)
    out = np.zeros(bs + 1)
    out[1:] = c[1:] * np.log(c[1:])
    return out


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (a bijection of uint64 with good avalanche), vectorised."""
    z = np.asarray(x).astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


# ---------------------------------------------------------------------------------------------
# numpy implementations


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
    if blocks.shape[0]:
        slogc[nz] = np.add.reduceat(clogc[counts], boff[:-1][nz])
    gini = _gini_np(counts, boff, bs)
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
                   reuse_hist, jacc, ws):
    """Per-stream temporal metrics of one chunk (see ``locality.StreamState``): reuse distance
    histogram and first touches, Jaccard with the stream's previous record, working sets.
    ``sord`` = the record's step ordinal in its stream. Returns first touches."""
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
    name="numpy", token_pass=token_pass_np, block_pass=block_pass_np,
    stream_pass=stream_pass_np, lru_pass=lru_pass_np, iou_pass=iou_pass_np,
    sample_keys=sample_keys_np, opt_hits=opt_hits_np)


# ---------------------------------------------------------------------------------------------
# numba implementations (compiled on first use, cached on disk by numba)


def _build_numba() -> SimpleNamespace:
    import numba as nb

    njit = nb.njit(cache=True, nogil=True)

    @njit
    def _token(pos, offsets, seq_len, edges, cut, ge, amp, below):
        n = offsets.shape[0] - 1
        q = edges.shape[0]
        for i in range(n):
            a, b = offsets[i], offsets[i + 1]
            if b == a:
                continue
            lo, hi = a, b
            while lo < hi:
                mid = (lo + hi) >> 1
                if pos[mid] < cut[i]:
                    lo = mid + 1
                else:
                    hi = mid
            below[i] = lo - a
            tail = seq_len[i] - 1
            for j in range(q):  # binary search: #pos <= tail - edges[j]
                t = tail - edges[j]
                lo, hi = a, b
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if pos[mid] <= t:
                        lo = mid + 1
                    else:
                        hi = mid
                ge[i, j] = lo - a
            for lvl in range(AMP_LEVELS):
                amp[i, lvl] = 1
            prev = pos[a]
            for k in range(a + 1, b):
                x = pos[k] ^ prev
                prev = pos[k]
                lvl = 0
                while x != 0 and lvl < AMP_LEVELS:
                    amp[i, lvl] += 1
                    x >>= 1
                    lvl += 1

    def token_pass(pos, offsets, seq_len, edges, cut):
        n = offsets.shape[0] - 1
        ge = np.zeros((n, edges.shape[0]), dtype=np.int64)
        amp = np.zeros((n, AMP_LEVELS), dtype=np.int64)
        below = np.zeros(n, dtype=np.int64)
        _token(pos, offsets, seq_len, edges, cut, ge, amp, below)
        return ge, amp, below

    @njit
    def _block(pos, offsets, seq_len, bs, shift, wins, clogc, boff, blocks, counts, span,
               slogc, gini, nearb, sumdist, hist):
        n = offsets.shape[0] - 1
        m = 0
        nw = wins.shape[0]
        for i in range(n):
            a, b = offsets[i], offsets[i + 1]
            boff[i] = m
            if b == a:
                continue
            first = m
            cur = -1
            for k in range(a, b):
                blk = pos[k] >> shift if shift >= 0 else pos[k] // bs
                if blk != cur:
                    blocks[m] = blk
                    counts[m] = 1
                    m += 1
                    cur = blk
                else:
                    counts[m - 1] += 1
            u = m - first
            span[i] = blocks[m - 1] - blocks[first] + 1
            cb = (seq_len[i] - 1) // bs
            s = 0.0
            tot = 0
            dsum = 0
            for k in range(first, m):
                c = counts[k]
                s += clogc[c]
                tot += c
                hist[c] += 1
                dsum += cb - blocks[k]
            slogc[i] = s
            sumdist[i] = dsum
            # counting sort of the counts for the Gini coefficient
            acc = 0.0
            rank = 0
            for v in range(1, bs + 1):
                f = hist[v]
                if f:
                    acc += v * (f * rank + f * (f + 1) / 2.0)
                    rank += f
                    hist[v] = 0
            gini[i] = 2.0 * acc / (u * tot) - (u + 1.0) / u
            for j in range(nw):  # #blocks with b >= cb - w (binary search, ascending blocks)
                t = cb - wins[j]
                lo, hi = first, m
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if blocks[mid] < t:
                        lo = mid + 1
                    else:
                        hi = mid
                nearb[i, j] = m - lo
        boff[n] = m

    def block_pass(pos, offsets, seq_len, bs, wins, clogc):
        n = offsets.shape[0] - 1
        m = pos.shape[0]
        boff = np.zeros(n + 1, dtype=np.int64)
        blocks = np.empty(m, dtype=np.int64)
        counts = np.empty(m, dtype=np.int64)
        span = np.zeros(n, dtype=np.int64)
        slogc = np.zeros(n)
        gini = np.zeros(n)
        nearb = np.zeros((n, wins.shape[0]), dtype=np.int64)
        sumdist = np.zeros(n, dtype=np.int64)
        hist = np.zeros(bs + 1, dtype=np.int64)
        shift = bs.bit_length() - 1 if bs & (bs - 1) == 0 else -1
        _block(pos, offsets, seq_len, bs, shift, wins, clogc, boff, blocks, counts, span,
               slogc, gini, nearb, sumdist, hist)
        k = boff[n]
        return boff, blocks[:k], counts[:k], span, slogc, gini, nearb, sumdist

    @njit
    def _stream(sid, step, sord, boff, blocks, base, last_rec, last_step, last_ord, rec_count,
                prev_size, ring, ring_top, wmax, ws_windows, cap_steps, reuse_hist, jacc, ws):
        n = sid.shape[0]
        nwin = ws_windows.shape[0]
        first_total = 0
        for i in range(n):
            s = sid[i]
            o = sord[i]
            r = rec_count[s]
            top = ring_top[s]
            if o > top:
                q0 = top + 1 if top + 1 > o - wmax + 1 else o - wmax + 1
                for q in range(q0, o + 1):
                    ring[s * wmax + q % wmax] = 0
                ring_top[s] = o
            inter = 0
            bse = base[s]
            t = step[i]
            slot = s * wmax + o % wmax
            for k in range(boff[i], boff[i + 1]):
                e = bse + blocks[k]
                lr = last_rec[e]
                if lr < 0:
                    first_total += 1
                else:
                    d = t - last_step[e]
                    if d < 0:
                        d = 0
                    if d > cap_steps:
                        d = cap_steps
                    reuse_hist[d] += 1
                    if lr == r - 1:
                        inter += 1
                    lo = last_ord[e]
                    if lo > o - wmax:
                        ring[s * wmax + lo % wmax] -= 1
                ring[slot] += 1
                last_rec[e] = r
                last_step[e] = t
                last_ord[e] = o
            u = boff[i + 1] - boff[i]
            if r > 0:
                jacc[i] = inter / (u + prev_size[s] - inter)
            else:
                jacc[i] = np.nan
            prev_size[s] = u
            rec_count[s] = r + 1
            acc = 0
            wi = 0
            for j in range(ws_windows[nwin - 1] if nwin else 0):
                q = o - j
                if q >= 0:
                    acc += ring[s * wmax + q % wmax]
                while wi < nwin and ws_windows[wi] == j + 1:
                    ws[i, wi] = acc
                    wi += 1
        return first_total

    def stream_pass(st, sid, step, sord, boff, blocks, ws_windows, cap_steps, reuse_hist,
                    jacc, ws):
        return _stream(sid, step, sord, boff, blocks, st.base, st.last_rec, st.last_step,
                       st.last_ord, st.rec_count, st.prev_size, st.ring, st.ring_top, st.wmax,
                       ws_windows, cap_steps, reuse_hist, jacc, ws)

    @njit
    def _lru(sid, boff, blocks, base, caps, head, tail, size, bound, prv, nxt, band, hits):
        # Multi-capacity LRU in one list per stream (Mattson's stack), capped at caps[-1]:
        # band[e] = smallest c with rank(e) < caps[c] (nb = not in the list), bound[s, c] =
        # the element at rank caps[c] - 1. Moving e to the front pushes the boundary element
        # of every band above e's down one band; the list itself only changes at e (and at
        # the tail, which leaves when the list is full).
        nb = caps.shape[0]
        cmax = caps[nb - 1]
        n = sid.shape[0]
        for i in range(n):
            s = sid[i]
            bse = base[s]
            for k in range(boff[i], boff[i + 1]):
                e = bse + blocks[k]
                z = band[e]
                for c in range(z, nb):
                    hits[c] += 1
                if head[s] == e:
                    continue
                if z < nb and bound[s * nb + z] == e:
                    bound[s * nb + z] = prv[e]
                full = size[s] == cmax
                for c in range(z):
                    bb = bound[s * nb + c]
                    if bb != -1:  # the element above it is the new boundary (e if none)
                        band[bb] = c + 1
                        bound[s * nb + c] = prv[bb] if prv[bb] != -1 else e
                if z == nb:
                    if full:  # the old tail was pushed out of the last band: evict it
                        old = tail[s]
                        t = prv[old]
                        tail[s] = t
                        if t != -1:
                            nxt[t] = -1
                        else:
                            head[s] = -1
                        prv[old] = -1
                    else:
                        size[s] += 1
                else:  # unlink e
                    p, q = prv[e], nxt[e]
                    nxt[p] = q
                    if q != -1:
                        prv[q] = p
                    else:
                        tail[s] = p
                h = head[s]
                prv[e] = -1
                nxt[e] = h
                if h != -1:
                    prv[h] = e
                else:
                    tail[s] = e
                head[s] = e
                band[e] = 0
                if z == nb:
                    for c in range(nb):
                        if bound[s * nb + c] == -1 and size[s] == caps[c]:
                            bound[s * nb + c] = tail[s]

    def lru_pass(st, sid, boff, blocks, caps, hits):
        _lru(sid, boff, blocks, st.base, caps, st.lru_head, st.lru_tail, st.lru_size,
             st.lru_bound, st.lru_prev, st.lru_next, st.lru_band, hits)

    @njit
    def _iou(rslot, gidx, step, layer, boff, blocks, base, stamp, last_gid, last_step,
             last_layer, last_size, iou):
        for i in range(rslot.shape[0]):
            r = rslot[i]
            pair = last_step[r] == step[i] and last_layer[r] == layer[i] - 1
            g_prev = last_gid[r]
            inter = 0
            bse = base[r]
            g = gidx[i]
            for k in range(boff[i], boff[i + 1]):
                e = bse + blocks[k]
                if stamp[e] == g_prev:
                    inter += 1
                stamp[e] = g
            u = boff[i + 1] - boff[i]
            if pair:
                iou[i] = inter / (u + last_size[r] - inter)
            else:
                iou[i] = np.nan
            last_gid[r] = g
            last_step[r] = step[i]
            last_layer[r] = layer[i]
            last_size[r] = u

    def iou_pass(st, rslot, gidx, step, layer, boff, blocks, iou):
        _iou(rslot, gidx, step, layer, boff, blocks, st.base, st.stamp, st.last_gid,
             st.last_step, st.last_layer, st.last_size, iou)

    @njit
    def _sample(req, layer, boff, blocks, threshold, out):
        m = 0
        for i in range(req.shape[0]):
            hi = (req[i] << 32) | (layer[i] << 24)
            for k in range(boff[i], boff[i + 1]):
                key = hi | blocks[k]
                if threshold < (1 << 24):
                    z = np.uint64(key)
                    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                    z = z ^ (z >> np.uint64(31))
                    if (z >> np.uint64(40)) >= np.uint64(threshold):
                        continue
                out[m] = key
                m += 1
        return m

    def sample_keys(req, layer, boff, blocks, threshold):
        out = np.empty(blocks.shape[0], dtype=np.int64)
        m = _sample(req, layer, boff, blocks, threshold, out)
        return out[:m].copy()

    @njit
    def _opt(ids, nxt, n_ids, cap):
        # Belady's MIN with a lazy max-heap of (next use, id) packed as next * n_ids + id
        n = ids.shape[0]
        resident = np.zeros(n_ids, dtype=np.bool_)
        cur = np.zeros(n_ids, dtype=np.int64)
        heap = np.empty(n + 1, dtype=np.int64)
        hn = 0
        size = 0
        hits = 0
        for t in range(n):
            k = ids[t]
            nu = nxt[t]
            if resident[k]:
                hits += 1
            else:
                if size == cap:
                    while True:  # pop the farthest next use still current
                        top = heap[0]
                        hn -= 1
                        last = heap[hn]
                        j = 0
                        while True:
                            c = 2 * j + 1
                            if c >= hn:
                                break
                            if c + 1 < hn and heap[c + 1] > heap[c]:
                                c += 1
                            if heap[c] <= last:
                                break
                            heap[j] = heap[c]
                            j = c
                        if hn > 0:
                            heap[j] = last
                        kk = top % n_ids
                        if resident[kk] and cur[kk] == top // n_ids:
                            resident[kk] = False
                            size -= 1
                            break
                resident[k] = True
                size += 1
            cur[k] = nu
            v = nu * n_ids + k
            j = hn
            hn += 1
            while j > 0:
                p = (j - 1) >> 1
                if heap[p] >= v:
                    break
                heap[j] = heap[p]
                j = p
            heap[j] = v
        return hits

    def opt_hits(keys, caps):
        from kvtier.policies.belady import next_occurrence

        keys = np.asarray(keys, dtype=np.int64)
        uniq, ids = np.unique(keys, return_inverse=True)
        nxt = next_occurrence(keys)
        out = np.zeros(len(caps), dtype=np.int64)
        for j, c in enumerate(caps):
            if c > 0 and keys.shape[0]:
                out[j] = _opt(ids.astype(np.int64), nxt, max(1, uniq.shape[0]), int(c))
        return out

    return SimpleNamespace(
        name="numba", token_pass=token_pass, block_pass=block_pass, stream_pass=stream_pass,
        lru_pass=lru_pass, iou_pass=iou_pass, sample_keys=sample_keys, opt_hits=opt_hits)
