"""Per-stream state kept across chunks: dense per-block tables, stream numbering, ordinals.

A stream's block table holds one entry per block id 0 ... its largest block id seen, for every
field (last record, last step, ...), in one numpy pool per field; tables grow by doubling and
move to the end of the pool when they do (``BlockTables.ensure``). Memory is proportional to
the number of streams times their context in blocks, never to the number of records.
"""

from __future__ import annotations

import numpy as np

_MIN_TABLE = 64


class BlockTables:
    """Dense per-owner tables over block ids, one pool array per field."""

    def __init__(self, fields: dict[str, tuple[type, int]]) -> None:
        self.fields = fields
        self.pools = {k: np.full(1 << 12, fill, dtype=dt) for k, (dt, fill) in fields.items()}
        self.used = 0
        self.base = np.zeros(0, dtype=np.int64)
        self.size = np.zeros(0, dtype=np.int64)

    def __getattr__(self, name: str) -> np.ndarray:
        pools = self.__dict__.get("pools")
        if pools is not None and name in pools:
            return pools[name]
        raise AttributeError(name)

    def owners(self, count: int) -> None:
        """Make room for owners 0 ... count - 1 (new ones with empty tables)."""
        if count > self.base.shape[0]:
            pad = count - self.base.shape[0]
            self.base = np.concatenate([self.base, np.zeros(pad, np.int64)])
            self.size = np.concatenate([self.size, np.zeros(pad, np.int64)])

    def ensure(self, owner: np.ndarray, max_block: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Tables large enough for block ``max_block[i]`` of ``owner[i]``. Returns the moved
        tables as (owner, old base, new base, old size) for callers holding pool indices."""
        if owner.shape[0] == 0:
            return []
        self.owners(int(owner.max()) + 1)
        need = np.zeros(self.base.shape[0], dtype=np.int64)
        np.maximum.at(need, owner, max_block + 1)
        grow = np.flatnonzero(need > self.size)
        if grow.shape[0] == 0:
            return []
        # a quarter of headroom, in whole cache lines of entries (a power of two would
        # nearly double the pools, and filling fresh memory is most of what growing costs)
        want = need[grow] + need[grow] // 4
        new_size = np.maximum(-(-want // _MIN_TABLE) * _MIN_TABLE, _MIN_TABLE)
        new_base = self.used + np.concatenate([[0], np.cumsum(new_size)[:-1]])
        total = self.used + int(new_size.sum())
        cap = next(iter(self.pools.values())).shape[0]
        if total > cap:  # new tables fill their own region below: no need to fill the pool
            new_cap = max(total, 2 * cap)
            for k in self.fields:
                arr = np.empty(new_cap, dtype=self.pools[k].dtype)
                arr[:self.used] = self.pools[k][:self.used]
                self.pools[k] = arr
        for k, (_, fill) in self.fields.items():  # every new region starts empty
            self.pools[k][self.used:total] = fill
        moved = []
        old_size = self.size[grow]
        for j in np.flatnonzero(old_size).tolist():  # tables that move keep their entries
            o, nb = int(grow[j]), int(new_base[j])
            ob, osz = int(self.base[o]), int(old_size[j])
            for k, (_, fill) in self.fields.items():
                p = self.pools[k]
                p[nb:nb + osz] = p[ob:ob + osz]
                p[ob:ob + osz] = fill
            moved.append((o, ob, nb, osz))
        self.base[grow], self.size[grow] = new_base, new_size
        self.used = total
        return moved


class StreamIndex:
    """Dense stream numbers for (request, layer) pairs, in order of first appearance (a
    request x layer lookup table, so a chunk is numbered without a Python loop)."""

    def __init__(self, per_layer: bool) -> None:
        self.per_layer = per_layer
        self.table = np.full((0, 0), -1, dtype=np.int64)
        self.n = 0
        self.seen = np.zeros(0, dtype=bool)  # requests seen, when streams are requests

    def __call__(self, req: np.ndarray, layer: np.ndarray) -> np.ndarray:
        if not self.per_layer:
            m = int(req.max()) + 1 if req.shape[0] else 0
            if m > self.seen.shape[0]:
                self.seen = np.concatenate([self.seen, np.zeros(m - self.seen.shape[0], bool)])
            self.seen[req] = True
            return req
        if req.shape[0] == 0:
            return req
        rows, cols = int(req.max()) + 1, int(layer.max()) + 1
        if rows > self.table.shape[0] or cols > self.table.shape[1]:
            t = np.full((max(rows, 2 * self.table.shape[0]), max(cols, self.table.shape[1])),
                        -1, dtype=np.int64)
            t[:self.table.shape[0], :self.table.shape[1]] = self.table
            self.table = t
        sid = self.table[req, layer]
        new = sid < 0
        if new.any():  # number new pairs by first appearance
            flat = req[new] * self.table.shape[1] + layer[new]
            uniq, first = np.unique(flat, return_index=True)
            order = np.argsort(first, kind="stable")
            codes = np.empty(uniq.shape[0], dtype=np.int64)
            codes[order] = self.n + np.arange(uniq.shape[0])
            self.n += int(uniq.shape[0])
            self.table.flat[uniq] = codes
            sid = self.table[req, layer]
        return sid

    def count(self) -> int:
        return self.n if self.per_layer else int(self.seen.sum())


class StepOrdinals:
    """The step ordinal of every record within its stream: 0 for the stream's first step, +1
    each time the stream's step changes (so with a sampled trace, ordinals count the steps
    the stream has, not step indices)."""

    def __init__(self) -> None:
        self.last_step = np.zeros(0, dtype=np.int64)
        self.ord = np.zeros(0, dtype=np.int64)

    def __call__(self, sid: np.ndarray, step: np.ndarray) -> np.ndarray:
        n = sid.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        size = int(sid.max()) + 1
        if size > self.ord.shape[0]:
            pad = size - self.ord.shape[0]
            self.last_step = np.concatenate([self.last_step, np.full(pad, -1, np.int64)])
            self.ord = np.concatenate([self.ord, np.full(pad, -1, np.int64)])
        order = np.argsort(sid, kind="stable")
        s, t = sid[order], step[order]
        seg_first = np.ones(n, dtype=bool)
        seg_first[1:] = s[1:] != s[:-1]
        prev = np.empty(n, dtype=np.int64)
        prev[1:] = t[:-1]
        prev[seg_first] = self.last_step[s[seg_first]]
        inc = (t != prev).astype(np.int64)
        cs = np.cumsum(inc)
        start_idx = np.maximum.accumulate(np.where(seg_first, np.arange(n), 0))
        within = cs - (cs[start_idx] - inc[start_idx])
        out_sorted = self.ord[s] + within
        seg_last = np.ones(n, dtype=bool)
        seg_last[:-1] = s[1:] != s[:-1]
        self.last_step[s[seg_last]] = t[seg_last]
        self.ord[s[seg_last]] = out_sorted[seg_last]
        out = np.empty(n, dtype=np.int64)
        out[order] = out_sorted
        return out


class StreamState:
    """What the stream kernels (``kernels.stream_pass``, ``kernels.lru_pass``) keep per stream
    and per (stream, block)."""

    def __init__(self, wmax: int, caps: np.ndarray) -> None:
        # the ring of per-ordinal block counts covers a power of two >= the largest window
        # (the kernel takes ordinals modulo it with a mask, not a division)
        self.wmax = 1 << max(0, int(wmax) - 1).bit_length()
        self.caps = caps
        nb = caps.shape[0]
        self.nb = nb
        self.tables = BlockTables({
            "last_rec": (np.int32, -1), "last_step": (np.int64, 0), "last_ord": (np.int32, 0),
            "lru_prev": (np.int32, -1), "lru_next": (np.int32, -1), "lru_band": (np.int8, nb)})
        self.rec_count = np.zeros(0, dtype=np.int64)
        self.prev_size = np.zeros(0, dtype=np.int64)
        self.ring_top = np.zeros(0, dtype=np.int64)
        self.ring = np.zeros(0, dtype=np.int64)
        self.lru_head = np.zeros(0, dtype=np.int64)
        self.lru_tail = np.zeros(0, dtype=np.int64)
        self.lru_size = np.zeros(0, dtype=np.int64)
        self.lru_bound = np.zeros(0, dtype=np.int64)
        self.lru_lists: dict[int, np.ndarray] = {}  # the numpy LRU's state

    def __getattr__(self, name: str):
        tables = self.__dict__.get("tables")
        if tables is not None and name in tables.pools:
            return tables.pools[name]
        if name == "base":
            return self.__dict__["tables"].base
        raise AttributeError(name)

    def prepare(self, sid: np.ndarray, boff: np.ndarray, blocks: np.ndarray) -> None:
        """Room for every stream and block of a chunk (new streams, larger tables)."""
        count = int(sid.max()) + 1 if sid.shape[0] else 0
        have = self.rec_count.shape[0]
        if count > have:
            pad = count - have

            def grow(a, fill, width=1):
                return np.concatenate([a, np.full(pad * width, fill, dtype=a.dtype)])

            self.rec_count = grow(self.rec_count, 0)
            self.prev_size = grow(self.prev_size, 0)
            self.ring_top = grow(self.ring_top, -1)
            self.ring = grow(self.ring, 0, self.wmax)
            self.lru_head = grow(self.lru_head, -1)
            self.lru_tail = grow(self.lru_tail, -1)
            self.lru_size = grow(self.lru_size, 0)
            self.lru_bound = grow(self.lru_bound, -1, self.nb)
        u = np.diff(boff)
        last = np.maximum(boff[1:] - 1, 0)
        maxb = np.where(u > 0, blocks[last] if blocks.shape[0] else 0, 0)
        for o, ob, nb_, osz in self.tables.ensure(sid, maxb):
            self._relocate(o, ob, nb_, osz)

    def _relocate(self, s: int, old: int, new: int, size: int) -> None:
        """Shift the LRU list pointers of stream ``s`` after its table moved."""
        delta = new - old

        def fix(a):
            return np.where(a != -1, a + delta, -1)

        for name in ("lru_prev", "lru_next"):
            p = self.tables.pools[name]
            p[new:new + size] = fix(p[new:new + size])
        self.lru_head[s] = fix(self.lru_head[s])
        self.lru_tail[s] = fix(self.lru_tail[s])
        nb = self.nb
        self.lru_bound[s * nb:(s + 1) * nb] = fix(self.lru_bound[s * nb:(s + 1) * nb])


class IoUState:
    """Per request: its previous record (global index, step, layer, size) and per block the
    global index of the request's last record that touched it."""

    def __init__(self) -> None:
        self.tables = BlockTables({"stamp": (np.int64, -1)})
        self.last_gid = np.zeros(0, dtype=np.int64)
        self.last_step = np.zeros(0, dtype=np.int64)
        self.last_layer = np.zeros(0, dtype=np.int64)
        self.last_size = np.zeros(0, dtype=np.int64)

    @property
    def stamp(self) -> np.ndarray:
        return self.tables.pools["stamp"]

    @property
    def base(self) -> np.ndarray:
        return self.tables.base

    def prepare(self, req: np.ndarray, boff: np.ndarray, blocks: np.ndarray) -> None:
        count = int(req.max()) + 1 if req.shape[0] else 0
        have = self.last_gid.shape[0]
        if count > have:
            pad = count - have
            self.last_gid = np.concatenate([self.last_gid, np.full(pad, -1, np.int64)])
            self.last_step = np.concatenate([self.last_step, np.full(pad, -1, np.int64)])
            self.last_layer = np.concatenate([self.last_layer, np.full(pad, -9, np.int64)])
            self.last_size = np.concatenate([self.last_size, np.zeros(pad, np.int64)])
        u = np.diff(boff)
        last = np.maximum(boff[1:] - 1, 0)
        maxb = np.where(u > 0, blocks[last] if blocks.shape[0] else 0, 0)
        self.tables.ensure(req, maxb)
