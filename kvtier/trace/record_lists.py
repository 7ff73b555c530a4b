"""The block-id lists of one step's records and their ``kv_fetch`` scalars, as columns.

Both record writers (``kvtier.trace.record_bytes``) take a step's int-list fields from here:
``selected_block_ids``, ``prefix.intersection_blocks`` and each tier's ``hit_blocks``, all as
spans of one int array, so that every list of the step is encoded by one table gather.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter, is_

import msgspec
import numpy as np

from kvtier.schema import TIER_NAMES
from kvtier.trace.intlist_json import encode_elements
from kvtier.trace.record_layout import list_width
from kvtier.trace.step_numpy import StepStats


class RecordLists:
    """The block-id lists of the records of one step and their kv_fetch scalars.

    Lists are spans ``lv[lo[v]:hi[v]]``: span j < n is record j's ``selected_block_ids``,
    n + j its ``prefix.intersection_blocks`` (the first ``intersection`` of them: prefix
    blocks are ids 0 .. n_prefix - 1), 2n the empty list, and tier lists that are neither
    the whole row nor empty are appended after the step's block ids. ``tier_span[t, j]`` is
    record j's span for tier t; ``ints[t]`` = (bytes_read, read_ops, batch_size) arrays;
    ``lat[t]`` = latency text index per record into ``lat_texts``.
    """

    __slots__ = ("lv", "lo", "hi", "width", "tier_span", "ints", "lat", "lat_texts")

    def __init__(self, st: StepStats, fetches: list, views: list, backend: str,
                 enc: msgspec.json.Encoder) -> None:
        """From the backend's answers: ``fetches[j]`` is record j's ``KVFetch`` and
        ``views[j]`` the block-id array the backend was given for it (a tier that returns
        that very array served the whole row, which then needs no list of its own)."""
        n = len(fetches)
        bstart = st.block_starts
        first = bstart[:-1]
        lo = [first, first, np.zeros(1, np.int64)]
        hi = [bstart[1:], first + st.intersection, np.zeros(1, np.int64)]
        extra: list[np.ndarray] = []
        n_spans = 2 * n + 1
        n_vals = int(bstart[-1])
        vmax = int(st.block_ids[bstart[1:] - 1].max()) if n else 0  # rows are sorted
        self.tier_span = np.empty((len(TIER_NAMES), n), np.int64)
        self.ints = []
        total = np.zeros(n, np.int64)
        rec = np.arange(n, dtype=np.int64)
        scalars = attrgetter("bytes_read", "read_ops", "batch_size")
        tier_lats = []
        for t, name in enumerate(TIER_NAMES):  # C-level maps over the step's answers
            tiers = list(map(attrgetter(name), fetches))
            hits = list(map(attrgetter("hit_blocks"), tiers))
            lens = np.fromiter(map(len, hits), np.int64, n)
            total += lens
            if not lens.any():  # a tier that served none of the step's rows (the pools, HBM-only)
                span = np.full(n, 2 * n, np.int64)
            else:
                same = np.fromiter(map(is_, hits, views), bool, n)
                span = np.where(same, rec, 2 * n)
                for j in np.flatnonzero(~same & (lens > 0)).tolist():
                    arr = np.asarray(hits[j], dtype=np.int64)
                    extra.append(arr)
                    vmax = max(vmax, int(arr.max()))
                    lo.append(np.array([n_vals], np.int64))
                    n_vals += len(arr)
                    hi.append(np.array([n_vals], np.int64))
                    span[j] = n_spans
                    n_spans += 1
            self.tier_span[t] = span
            cols = np.array(list(map(scalars, tiers)), dtype=np.int64).reshape(n, 3)
            self.ints.append((cols[:, 0], cols[:, 1], cols[:, 2]))
            tier_lats.append(list(map(attrgetter("latency_us"), tiers)))
        # each distinct latency's text once (dict.fromkeys keeps first-seen order)
        lat_index = {v: i for i, v in enumerate(dict.fromkeys(chain.from_iterable(tier_lats)))}
        self.lat = [np.fromiter(map(lat_index.__getitem__, lats), np.int64, n) for lats in tier_lats]
        if (total != np.diff(bstart)).any():
            j = int(np.flatnonzero(total != np.diff(bstart))[0])
            raise ValueError(f"backend {backend!r}: the tiers' hit_blocks of a row hold "
                             f"{int(total[j])} blocks, the row selected {int(bstart[j + 1] - bstart[j])} "
                             "(the three lists must partition its block_ids)")
        self.lat_texts = [enc.encode(v) for v in lat_index]
        self.lv = np.concatenate([st.block_ids[:int(bstart[-1])], *extra]) if extra else st.block_ids
        self.lo = np.concatenate(lo)
        self.hi = np.concatenate(hi)
        self.width = list_width(vmax)

    @classmethod
    def hbm_only(cls, st: StepStats, block_bytes: int, wall_us: float | None,
                 enc: msgspec.json.Encoder) -> RecordLists:
        """What ``HBMOnlyBackend.fetch`` answers, as columns: HBM serves every row's blocks
        (its list is the row's), ``blocks x block_bytes`` bytes, one read, the step's wall
        time; the pools nothing."""
        self = cls.__new__(cls)
        n = len(st.unique_blocks)
        bstart = st.block_starts
        first = bstart[:-1]
        self.lv = st.block_ids
        self.lo = np.concatenate([first, first, np.zeros(1, np.int64)])
        self.hi = np.concatenate([bstart[1:], first + st.intersection, np.zeros(1, np.int64)])
        self.width = list_width(int(st.block_ids[bstart[1:] - 1].max()) if n else 0)
        self.tier_span = np.full((len(TIER_NAMES), n), 2 * n, np.int64)
        self.tier_span[0] = np.arange(n, dtype=np.int64)
        unique = st.unique_blocks.astype(np.int64)
        zeros = np.zeros(n, np.int64)
        self.ints = [(unique * block_bytes, np.ones(n, np.int64), unique), (zeros, zeros, zeros),
                     (zeros, zeros, zeros)]
        self.lat_texts = [enc.encode(wall_us)] if wall_us is None else [enc.encode(wall_us), b"null"]
        null = 0 if wall_us is None else 1
        self.lat = [zeros, np.full(n, null, np.int64), np.full(n, null, np.int64)]
        return self

    def texts(self, scratch: np.ndarray | None = None) -> tuple[list, np.ndarray | None]:
        """Each span's JSON text without brackets (the numpy path), and the buffer they are
        views of (``scratch`` when large enough; None for the compact fallback)."""
        lo, hi = self.lo.tolist(), self.hi.tolist()
        if self.width:
            w = self.width
            buf = encode_elements(self.lv, w, scratch)
            mv = memoryview(buf)
            return [mv[a * w:b * w - 1] if b > a else b"" for a, b in zip(lo, hi, strict=True)], buf
        lv = self.lv
        return [msgspec.json.encode(lv[a:b].tolist())[1:-1] for a, b in zip(lo, hi, strict=True)], None
