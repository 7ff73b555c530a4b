"""The numba kernel set (extra ``fast``): module-level functions, so numba caches them on disk
(a kernel that refers to another one through a closure is recompiled in every process)."""

from __future__ import annotations

from types import SimpleNamespace

import numba as nb
import numpy as np

from kvtier.analysis.kernels.common import AMP_LEVELS, clogc_table

njit = nb.njit(cache=True, nogil=True)


@njit
def _runs_shift(seg, shift, m, blocks, counts):
    # branch-free run detection: the block id of every position is stored at slot m, m
    # advances when the id changes, the run start stays in a register (~4x faster than
    # a branch per position, whose outcome is random)
    prev = seg[0] >> shift
    cs = 0
    blocks[m] = prev
    counts[m] = 1
    for k in range(1, seg.shape[0]):
        blk = seg[k] >> shift
        new = blk != prev
        prev = blk
        m += new
        cs = k if new else cs
        blocks[m] = blk
        counts[m] = k - cs + 1
    return m + 1


@njit
def _runs_div(seg, bs, m, blocks, counts):
    prev = seg[0] // bs
    cs = 0
    blocks[m] = prev
    counts[m] = 1
    for k in range(1, seg.shape[0]):
        blk = seg[k] // bs
        new = blk != prev
        prev = blk
        m += new
        cs = k if new else cs
        blocks[m] = blk
        counts[m] = k - cs + 1
    return m + 1


@njit
def _records(pos, offsets, seq_len, edges, cut, sizes, shifts, wins, clogc, bad, ge, amp,
             below, boff, blocks, counts, span, slogc, gini, nearb, sumdist, hist):
    # One pass per record over its positions (kept in L1/L2 while every statistic and
    # every block size is computed from them): validity, token statistics, read
    # amplification at 2**0 ... 2**9, then the blocks at each requested size.
    n = offsets.shape[0] - 1
    q = edges.shape[0]
    nw = wins.shape[0]
    unsorted = False
    ms = np.zeros(sizes.shape[0], dtype=np.int64)
    for i in range(n):
        a, b = offsets[i], offsets[i + 1]
        for z in range(sizes.shape[0]):
            boff[z, i] = ms[z]
        if b == a:
            continue
        seg = pos[a:b]
        # positions below the cached-prefix cut
        lo, hi = 0, seg.shape[0]
        while lo < hi:
            mid = (lo + hi) >> 1
            if seg[mid] < cut[i]:
                lo = mid + 1
            else:
                hi = mid
        below[i] = lo
        # #pos <= tail - edges[j]: the thresholds fall as the edges rise, so one walk down
        # the sorted positions serves every edge (each position passed once)
        tail = seq_len[i] - 1
        hi = seg.shape[0]
        for j in range(q):
            t = tail - edges[j]
            while hi > 0 and seg[hi - 1] > t:
                hi -= 1
            if hi == 0:
                break  # this and every larger edge: none
            ge[i, j] = hi
        # consecutive positions p < q fall in different 2**l-token blocks iff
        # p ^ q > 2**l - 1: ten branch-free counters (LLVM vectorises this loop), and in the
        # same loop the order check (a record must be strictly increasing) and the range
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = 0
        down = 0
        lo_v = seg[0]
        hi_v = seg[0]
        for k in range(1, seg.shape[0]):
            v = seg[k]
            lo_v = min(lo_v, v)
            hi_v = max(hi_v, v)
            down += v <= seg[k - 1]
            x = v ^ seg[k - 1]
            c0 += x > 0
            c1 += x > 1
            c2 += x > 3
            c3 += x > 7
            c4 += x > 15
            c5 += x > 31
            c6 += x > 63
            c7 += x > 127
            c8 += x > 255
            c9 += x > 511
        amp[i, 0], amp[i, 1], amp[i, 2], amp[i, 3] = 1 + c0, 1 + c1, 1 + c2, 1 + c3
        amp[i, 4], amp[i, 5], amp[i, 6], amp[i, 7] = 1 + c4, 1 + c5, 1 + c6, 1 + c7
        amp[i, 8], amp[i, 9] = 1 + c8, 1 + c9
        bad[i] = lo_v < 0 or hi_v >= seq_len[i]
        unsorted |= down > 0
        for z in range(sizes.shape[0]):
            bs = sizes[z]
            first = ms[z]
            bz = blocks[z]
            cz = counts[z]
            if shifts[z] >= 0:
                m = _runs_shift(seg, shifts[z], first, bz, cz)
            else:
                m = _runs_div(seg, bs, first, bz, cz)
            ms[z] = m
            u = m - first
            span[z, i] = bz[m - 1] - bz[first] + 1
            cb = tail // bs
            sl = 0.0
            tot = 0
            bsum = 0
            for k in range(first, m):
                # a run exceeds bs only in unsorted input, whose outputs are discarded
                # (the caller sorts and passes again): clamp, never index out of range
                c = min(cz[k], bs)
                sl += clogc[z, c]
                tot += c
                bsum += bz[k]
                hist[c] += 1
            slogc[z, i] = sl
            sumdist[z, i] = u * cb - bsum
            # counting sort of the counts for the Gini coefficient
            acc = 0.0
            rank = 0
            for v in range(1, bs + 1):
                f = hist[v]
                if f:
                    acc += v * (f * rank + f * (f + 1) / 2.0)
                    rank += f
                    hist[v] = 0
            gini[z, i] = 2.0 * acc / (u * tot) - (u + 1.0) / u
            for j in range(nw):  # #blocks with b >= cb - w (binary search)
                t = cb - wins[j]
                lo, hi = first, m
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if bz[mid] < t:
                        lo = mid + 1
                    else:
                        hi = mid
                nearb[z, i, j] = m - lo
    for z in range(sizes.shape[0]):
        boff[z, n] = ms[z]
    return unsorted


def records_pass(pos, offsets, seq_len, edges, cut, sizes, wins, scratch=None):
    n = offsets.shape[0] - 1
    m = pos.shape[0]
    nz = len(sizes)
    sz = np.asarray(sizes, dtype=np.int64)
    shifts = np.array([s.bit_length() - 1 if s & (s - 1) == 0 else -1 for s in sizes],
                      dtype=np.int64)
    bsmax = int(sz.max()) if nz else 1
    clogc = np.zeros((nz, bsmax + 1))
    for z, s in enumerate(sizes):
        clogc[z, :s + 1] = clogc_table(s)
    # blocks/counts live in the caller's grow-only scratch (valid until its next use):
    # fresh 30 MB arrays per call cost more in page faults than the pass itself
    scratch = {} if scratch is None else scratch
    held = scratch.get("blocks")
    if held is None or held.shape[0] != nz or held.shape[1] < m:
        cap = max(m + m // 4, 1)
        scratch["blocks"] = np.empty((nz, cap), dtype=np.int64)
        scratch["counts"] = np.empty((nz, cap), dtype=np.int64)
    blocks, counts = scratch["blocks"], scratch["counts"]
    bad = np.zeros(n, dtype=np.bool_)
    ge = np.zeros((n, edges.shape[0]), dtype=np.int64)
    amp = np.zeros((n, AMP_LEVELS), dtype=np.int64)
    below = np.zeros(n, dtype=np.int64)
    boff = np.zeros((nz, n + 1), dtype=np.int64)
    span = np.zeros((nz, n), dtype=np.int64)
    slogc = np.zeros((nz, n))
    gini = np.zeros((nz, n))
    nearb = np.zeros((nz, n, wins.shape[0]), dtype=np.int64)
    sumdist = np.zeros((nz, n), dtype=np.int64)
    hist = np.zeros(bsmax + 1, dtype=np.int64)
    unsorted = _records(pos, offsets, seq_len, edges, cut, sz, shifts, wins, clogc, bad, ge,
                        amp, below, boff, blocks, counts, span, slogc, gini, nearb, sumdist,
                        hist)
    per = {}
    for z, s in enumerate(sizes):
        k = boff[z, n]
        per[s] = (boff[z], blocks[z, :k], counts[z, :k], span[z], slogc[z], gini[z],
                  nearb[z], sumdist[z])
    return SimpleNamespace(bad=bad, unsorted=bool(unsorted), ge=ge, amp=amp, below=below,
                           blocks=per)


@njit
def _stream(sid, step, sord, boff, blocks, base, last_rec, last_step, last_ord, rec_count,
            prev_size, ring, ring_top, wmax, ws_windows, cap_steps, reuse_hist, jacc, ws,
            caps, head, tail, size, bound, prv, nxt, band, hits):
    # One pass over the blocks of each record for all per-stream state: reuse distance,
    # Jaccard with the previous record, the working-set ring, and the multi-capacity LRU.
    #
    # LRU: one list per stream (Mattson's stack) capped at caps[-1]; band[e] = smallest c
    # with rank(e) < caps[c] (nb = not in the list), bound[s, c] = the element at rank
    # caps[c] - 1. Moving e to the front pushes the boundary element of every band above
    # e's down one band; the list itself only changes at e (and at the tail, which leaves
    # when the list is full). A stream's head, tail, size and boundaries stay in locals
    # while its record is processed.
    n = sid.shape[0]
    nwin = ws_windows.shape[0]
    mask = wmax - 1  # wmax is a power of two
    nb = caps.shape[0]
    cmax = caps[nb - 1] if nb else 0
    zh = np.zeros(nb + 1, dtype=np.int64)  # accesses by band (hit for every c >= band)
    bnd = np.empty(max(nb, 1), dtype=np.int64)
    first_total = 0
    for i in range(n):
        s = sid[i]
        o = sord[i]
        r = rec_count[s]
        top = ring_top[s]
        if o > top:
            q0 = top + 1 if top + 1 > o - wmax + 1 else o - wmax + 1
            for q in range(q0, o + 1):
                ring[s * wmax + (q & mask)] = 0
            ring_top[s] = o
        inter = 0
        bse = base[s]
        t = step[i]
        slot = s * wmax + (o & mask)
        hd, tl, sz = head[s], tail[s], size[s]
        for c in range(nb):
            bnd[c] = bound[s * nb + c]
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
                    ring[s * wmax + (lo & mask)] -= 1
            ring[slot] += 1
            last_rec[e] = r
            last_step[e] = t
            last_ord[e] = o
            if nb == 0:
                continue
            # -- LRU
            z = band[e]
            zh[z] += 1
            if hd == e:
                continue
            if z < nb and bnd[z] == e:
                bnd[z] = prv[e]
            full = sz == cmax
            for c in range(z):
                bb = bnd[c]
                if bb != -1:  # the element above it is the new boundary (e if none)
                    band[bb] = c + 1
                    pb = prv[bb]
                    bnd[c] = pb if pb != -1 else e
            if z == nb:
                if full:  # the old tail was pushed out of the last band: evict it
                    old = tl
                    tl = prv[old]
                    if tl != -1:
                        nxt[tl] = -1
                    else:
                        hd = -1
                    prv[old] = -1
                else:
                    sz += 1
            else:  # unlink e
                p, q = prv[e], nxt[e]
                nxt[p] = q
                if q != -1:
                    prv[q] = p
                else:
                    tl = p
            prv[e] = -1
            nxt[e] = hd
            if hd != -1:
                prv[hd] = e
            else:
                tl = e
            hd = e
            band[e] = 0
            if z == nb:
                for c in range(nb):
                    if bnd[c] == -1 and sz == caps[c]:
                        bnd[c] = tl
        head[s], tail[s], size[s] = hd, tl, sz
        for c in range(nb):
            bound[s * nb + c] = bnd[c]
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
                acc += ring[s * wmax + (q & mask)]
            while wi < nwin and ws_windows[wi] == j + 1:
                ws[i, wi] = acc
                wi += 1
    acc = 0
    for c in range(nb):
        acc += zh[c]
        hits[c] += acc
    return first_total


def stream_pass(st, sid, step, sord, boff, blocks, ws_windows, cap_steps, reuse_hist,
                jacc, ws, caps, hits):
    return _stream(sid, step, sord, boff, blocks, st.base, st.last_rec, st.last_step,
                   st.last_ord, st.rec_count, st.prev_size, st.ring, st.ring_top, st.wmax,
                   ws_windows, cap_steps, reuse_hist, jacc, ws, caps, st.lru_head,
                   st.lru_tail, st.lru_size, st.lru_bound, st.lru_prev, st.lru_next,
                   st.lru_band, hits)


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


NUMBA = SimpleNamespace(
    name="numba", records_pass=records_pass, stream_pass=stream_pass, iou_pass=iou_pass,
    sample_keys=sample_keys, opt_hits=opt_hits)
