"""Optional numba kernels for the tracer's hot path (extra ``fast``).

The pure-numpy path (``kvtier.trace.step_numpy``, ``kvtier.trace.intlist_json`` and the record templates of
``kvtier.trace.record_layout``) needs a comparison sort and several passes over every step; here one
compiled pass per row replaces them: a bitmap over ``[0, seq_len)`` sorts and de-duplicates
the row, and the same scan yields block ids, tokens per block and the prefix overlap. A second
kernel writes whole records (ints, int lists, pre-formatted text) straight into one byte
buffer. Both paths produce byte-identical traces (tests compare them).

numba is imported only by ``load()``; ``KVTIER_NO_NUMBA=1`` forces the numpy path.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

#: field kinds of the record program (see ``emit_records``)
INT, TEXT, POS, LST, HALF = 0, 1, 2, 3, 4

#: largest seq_len for the bitmap path (a 512 KiB scratch); longer contexts sort the row
BITMAP_MAX_SEQ = 1 << 22

_kernels: SimpleNamespace | None = None
_failed = False


def disabled() -> bool:
    """True when ``KVTIER_NO_NUMBA`` is set to anything but '' or '0'."""
    return os.environ.get("KVTIER_NO_NUMBA", "") not in ("", "0")


def load() -> SimpleNamespace | None:
    """The compiled kernels, or None when numba is absent or disabled (compiled lazily, cached
    on disk by numba, so a process pays the JIT at most once)."""
    global _kernels, _failed
    if disabled() or _failed:
        return None
    if _kernels is None:
        try:
            _kernels = _build()
        except ImportError:
            _failed = True
            return None
    return _kernels


_digit_tables: dict[int, np.ndarray] = {}


def digit_table(width: int, size: int) -> np.ndarray:
    """uint64 per value v < size: its ``width`` bytes as written by ``kvtier.trace.intlist_json``
    (``width - 1`` right-aligned digits, space-padded, then a comma), little-endian, for one
    unaligned 8-byte store per element. ``width`` <= 8."""
    if not 2 <= width <= 8:
        raise ValueError(f"width must be 2..8, got {width}")
    cached = _digit_tables.get(width)
    if cached is not None and len(cached) >= size:
        return cached
    size = min(1 << max(size - 1, 4095).bit_length(), 10 ** (width - 1))
    chars = np.zeros((size, 8), dtype=np.uint8)
    chars[:, : width - 1] = ord(" ")
    chars[:, width - 1] = ord(",")
    rest = np.arange(size, dtype=np.int64)
    for col in range(width - 2, -1, -1):
        show = (rest > 0) | (col == width - 2)
        chars[show, col] = (rest[show] % 10).astype(np.uint8) + ord("0")
        rest //= 10
    table = chars.view("<u8").ravel()
    _digit_tables[width] = table
    return table


def _build() -> SimpleNamespace:
    import numba
    from llvmlite import ir
    from numba.cpython.unsafe.numbers import trailing_zeros

    njit = numba.njit(cache=True, nogil=True)

    @njit
    def copy_max(src, dst):
        """dst[...] = src (C-contiguous, same size; narrowing), returning max(src): one pass
        instead of two."""
        s = src.reshape(-1)
        d = dst.reshape(-1)
        m = s[0]
        for i in range(s.size):
            v = s[i]
            if v > m:
                m = v
            d[i] = v
        return m

    @numba.extending.intrinsic
    def popcount(typingctx, src):
        """LLVM's ctpop (one instruction with POPCNT); numba exposes no popcount."""
        if isinstance(src, numba.types.Integer):
            return src(src), lambda context, builder, sig, args: builder.ctpop(args[0])
        return None

    @numba.extending.intrinsic
    def load_u64(typingctx, arr, idx):
        """8 bytes of a uint8 array at any offset (unaligned load)."""
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer())
            return builder.load(ptr, align=1)
        return numba.types.uint64(arr, idx), codegen

    @numba.extending.intrinsic
    def store_u64(typingctx, arr, idx, val):
        """Store 8 bytes into a uint8 array at any offset (unaligned store)."""
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer())
            builder.store(context.cast(builder, args[2], sig.args[2], numba.types.uint64), ptr, align=1)
        return numba.types.void(arr, idx, val), codegen

    @njit
    def put_bytes(out, o, src, a, b):
        """out[o:o + b - a] = src[a:b] in 8-byte moves (both need 8 bytes of slack)."""
        while a < b:
            store_u64(out, o, load_u64(src, a))
            a += 8
            o += 8
        return o - (a - b)

    @njit
    def row_blocks(flat, p0, p1, shift, bs, blk, cnt, b0):
        """Block ids / counts of the sorted row flat[p0:p1] appended at blk[b0:] (any block
        size; branch-free per position). Returns the new end of blk."""
        nb = b0
        last = -1
        for i in range(p0, p1):
            p = flat[i]
            b = (p >> shift) if shift >= 0 else p // bs
            new = b != last
            nb += new
            blk[nb - 1] = b
            cnt[nb - 1] = cnt[nb - 1] * (1 - new) + 1
            last = b
        return nb

    @njit
    def step_rows(pos, bits, pre_set, seq_len, bs, n_prefix, flat, row_starts, blk, cnt,
                  block_starts, hist, inter, phist):
        """Sort + de-duplicate every row, then block ids, per-block counts, per-row histograms
        of those counts and the prefix overlap. Rows are either pos [R, K] (negatives are
        padding) sorted through the one-row bitmap ``bits[0]`` (or by a comparison sort when
        ``bits`` has no rows), or, with ``pre_set``, the bitmaps ``bits[R, words]`` that
        ``set_bits`` filled. A non-empty ``phist`` [seq_len] counts every position (on the way,
        for the summary's offsets). Returns the first all-padding row, or -1."""
        n_rows = bits.shape[0] if pre_set else pos.shape[0]
        k = pos.shape[1]
        shift = -1
        if bs & (bs - 1) == 0:
            shift = 0
            while (1 << shift) < bs:
                shift += 1
        # power-of-two blocks: counts are popcounts of the bitmap (sub-)words
        per_word = (64 >> shift) if 0 <= shift <= 6 else 0
        words_per_block = (1 << (shift - 6)) if shift > 6 else 0
        mask = (np.uint64(1) << np.uint64(bs)) - np.uint64(1) if 0 <= shift < 6 else ~np.uint64(0)
        use_bitmap = pre_set or bits.shape[0] > 0
        n_words = (seq_len + 63) >> 6
        tmp = np.empty(0 if use_bitmap else k, pos.dtype)
        w = 0
        nb = 0
        row_starts[0] = 0
        block_starts[0] = 0
        for r in range(n_rows):
            p0 = w
            b0 = nb
            npre = n_prefix[r]
            it = 0
            if use_bitmap:
                bitmap = bits[r] if pre_set else bits[0]
                if not pre_set:
                    for j in range(k):
                        p = pos[r, j]
                        if p >= 0:
                            bitmap[p >> 6] |= np.uint64(1) << np.uint64(p & 63)
                for wi in range(n_words):
                    word = bitmap[wi]
                    if word:
                        bitmap[wi] = 0
                        base = wi << 6
                        if per_word:
                            for c in range(per_word):
                                n_c = popcount((word >> np.uint64(c * bs)) & mask)
                                if n_c:
                                    b = (base >> shift) + c
                                    blk[nb] = b
                                    cnt[nb] = n_c
                                    nb += 1
                                    hist[r, n_c] += 1
                                    it += b < npre
                        elif words_per_block:
                            b = base >> shift
                            if nb > b0 and blk[nb - 1] == b:
                                cnt[nb - 1] += popcount(word)
                            else:
                                blk[nb] = b
                                cnt[nb] = popcount(word)
                                nb += 1
                        if phist.size:
                            while word:
                                q = base + trailing_zeros(word)
                                flat[w] = q
                                phist[q] += 1
                                w += 1
                                word &= word - np.uint64(1)
                        else:
                            while word:
                                flat[w] = base + trailing_zeros(word)
                                w += 1
                                word &= word - np.uint64(1)
            else:
                tmp[:] = pos[r]
                tmp.sort()
                prev = -1
                for j in range(k):
                    p = tmp[j]
                    if p >= 0 and p != prev:
                        flat[w] = p
                        w += 1
                        prev = p
                        if phist.size:
                            phist[p] += 1
            if w == p0:
                return r
            row_starts[r + 1] = w
            if not (use_bitmap and 0 <= shift <= 6):  # counts not taken from popcounts yet
                if not (use_bitmap and shift >= 0):
                    nb = row_blocks(flat, p0, w, shift, bs, blk, cnt, b0)
                it = 0
                for i in range(b0, nb):
                    hist[r, cnt[i]] += 1
                    it += blk[i] < npre
            block_starts[r + 1] = nb
            inter[r] = it
        return -1

    @njit
    def set_bits(src, bits, seq_len):
        """Bitmaps of the rows of src [B, K] (C-contiguous) into bits [B, words]: what
        step_rows needs, taken while the indices are read anyway (instead of copying them).
        Returns max(src); positions >= seq_len are left out (the caller raises)."""
        n_rows, k = src.shape
        bits[:] = 0
        m = src[0, 0]
        for r in range(n_rows):
            row = bits[r]
            for j in range(k):
                p = src[r, j]
                if p > m:
                    m = p
                if p >= 0 and p < seq_len:
                    row[p >> 6] |= np.uint64(1) << np.uint64(p & 63)
        return m

    @njit
    def put_int(out, o, v):
        """Decimal text of v at out[o:]; returns the new end."""
        if v < 0:
            out[o] = 45  # '-'
            o += 1
            v = -v
        n = 1
        t = v
        while t >= 10:
            t //= 10
            n += 1
        e = o + n
        for i in range(e - 1, o - 1, -1):
            out[i] = 48 + v % 10
            v //= 10
        return e

    @njit
    def put_list(out, o, vals, a, b, width, table, ohist, last, close):
        """JSON list tail of vals[a:b] ('[' is the literal's): ``width`` bytes per element
        from ``table`` (``digit_table``: kvtier.trace.intlist_json's space-padded format), or compact
        when width == 0. ``close``: end with ']' (a non-empty list); else leave the elements
        without their last comma (the next literal starts with ']'; an empty list writes
        nothing). With ``last`` >= 0 also counts offsets ``last - v`` into ohist."""
        if width > 0:
            for i in range(a, b):
                v = vals[i]
                store_u64(out, o, table[v])
                o += width
        else:
            for i in range(a, b):
                o = put_int(out, o, vals[i])
                out[o] = 44
                o += 1
        if last >= 0:
            for i in range(a, b):
                ohist[last - vals[i]] += 1
        if close:
            out[o - 1] = 93  # ']'
        elif b > a:
            o -= 1
        return o

    @njit
    def emit_records(out, lits, lit_starts, kinds, vals, texts, text_starts, pos, pos_starts,
                     pos_width, pos_table, lv, l_lo, l_hi, l_width, l_table, ohist, last):
        """Write records j = 0..len(vals)-1: literal f, then field f by kinds[f], for every
        field, then the closing literal. INT: vals[j, f]; HALF: vals[j, f] / 2 as a float's
        repr (x.0 / x.5); TEXT: span vals[j, f] of texts; POS: the int list of position row
        vals[j, f] with its ']' (also fills the offset histogram); LST: the int list
        lv[l_lo[v]:l_hi[v]] of span v = vals[j, f] without ']' (the next literal has it).
        ``out``, ``lits`` and ``texts`` need 8 bytes of slack past their ends. Returns bytes
        written."""
        o = 0
        n_fields = kinds.size
        for j in range(vals.shape[0]):
            first = -1  # the record's first LST span and where its text was written
            first_o = 0
            for f in range(n_fields + 1):
                o = put_bytes(out, o, lits, lit_starts[f], lit_starts[f + 1])
                if f == n_fields:
                    break
                kind = kinds[f]
                v = vals[j, f]
                if kind == 0:
                    o = put_int(out, o, v)
                elif kind == 1:
                    o = put_bytes(out, o, texts, text_starts[v], text_starts[v + 1])
                elif kind == 2:
                    o = put_list(out, o, pos, pos_starts[v], pos_starts[v + 1], pos_width, pos_table,
                                 ohist, last, True)
                elif kind == 3:
                    a, b = l_lo[v], l_hi[v]
                    if first < 0:
                        first, first_o = v, o
                        o = put_list(out, o, lv, a, b, l_width, l_table, ohist, -1, False)
                    elif l_width > 0 and a == l_lo[first] and b <= l_hi[first]:
                        # the first list again (hbm.hit_blocks = selected_block_ids) or a
                        # prefix of it (intersection_blocks): fixed-width text, so a copy of
                        # the bytes already written instead of encoding the ids again
                        if b > a:
                            o = put_bytes(out, o, out, first_o, first_o + (b - a) * l_width - 1)
                    else:
                        o = put_list(out, o, lv, a, b, l_width, l_table, ohist, -1, False)
                else:
                    o = put_int(out, o, v >> 1)
                    out[o] = 46  # '.'
                    out[o + 1] = 53 if v & 1 else 48
                    o += 2
        return o

    @njit
    def prefix_hist(block_ids, block_starts, inter, code, out):
        """out[code[r], b] += 1 for the touched prefix blocks b of every row r (the first
        inter[r] block ids of the row)."""
        for r in range(inter.size):
            c = code[r]
            b0 = block_starts[r]
            for i in range(b0, b0 + inter[r]):
                out[c, block_ids[i]] += 1

    return SimpleNamespace(copy_max=copy_max, step_rows=step_rows, set_bits=set_bits,
                           emit_records=emit_records, put_int=put_int, prefix_hist=prefix_hist)
