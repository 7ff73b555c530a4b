"""``--step-union``: one virtual record per (request, step), holding the union of its layers.

The virtual record's positions are the union of the selected positions of every record of
that request at that step (so its blocks at any block size are the union of the layers'
blocks), its ``seq_len`` that of the step, its layer -1; streams are then one per request. A
(request, step) is complete once a record of the same request at a later step arrives, or at the
end of the trace, so records of one step may be spread over chunks in any interleaving. Virtual
records come out in step order per request.
"""

from __future__ import annotations

import numpy as np

from kvtier.analysis.locality import Records


class StepUnion:
    def __init__(self) -> None:
        # request -> (step, seq_len, positions) of its open (request, step)
        self.open: dict[int, tuple[int, int, np.ndarray]] = {}

    def feed(self, req: np.ndarray, step: np.ndarray, seq_len: np.ndarray,
             offsets: np.ndarray, pos: np.ndarray) -> Records | None:
        """Add real records; return the virtual records completed by them."""
        n = req.shape[0]
        if n == 0:
            return None
        gkey = (req << np.int64(32)) | step
        groups, first, inv = np.unique(gkey, return_index=True, return_inverse=True)
        lens = np.diff(offsets)
        g_of_pos = np.repeat(inv, lens)
        both = np.unique((g_of_pos << np.int64(40)) | pos)
        gpos = both & ((1 << 40) - 1)
        goff = np.zeros(groups.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(both >> np.int64(40), minlength=groups.shape[0]), out=goff[1:])
        g_req = groups >> np.int64(32)
        g_step = groups & ((1 << 32) - 1)
        g_seq = np.zeros(groups.shape[0], dtype=np.int64)
        np.maximum.at(g_seq, inv, seq_len)
        out: list[tuple[int, int, int, np.ndarray]] = []
        # groups are sorted by (request, step): the last group of each request stays open
        last_of_req = np.ones(groups.shape[0], dtype=bool)
        last_of_req[:-1] = g_req[1:] != g_req[:-1]
        for j in np.argsort(first, kind="stable").tolist():
            r, s = int(g_req[j]), int(g_step[j])
            p = gpos[goff[j]:goff[j + 1]]
            prev = self.open.get(r)
            if prev is not None:
                if prev[0] == s:
                    p = np.union1d(prev[2], p)
                    del self.open[r]
                else:  # the request moved on: its open step is complete
                    out.append((r, prev[0], prev[1], prev[2]))
                    del self.open[r]
            if last_of_req[j]:
                self.open[r] = (s, int(g_seq[j]), p)
            else:
                out.append((r, s, int(g_seq[j]), p))
        return self._records(out)

    def flush(self) -> Records | None:
        out = [(r, s, q, p) for r, (s, q, p) in self.open.items()]
        self.open.clear()
        return self._records(out)

    @staticmethod
    def _records(out) -> Records | None:
        if not out:
            return None
        req = np.array([o[0] for o in out], dtype=np.int64)
        step = np.array([o[1] for o in out], dtype=np.int64)
        seq = np.array([o[2] for o in out], dtype=np.int64)
        lens = np.array([o[3].shape[0] for o in out], dtype=np.int64)
        offsets = np.zeros(len(out) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        pos = np.concatenate([o[3] for o in out]).astype(np.int64)
        return Records(req, np.full(len(out), -1, dtype=np.int64), step, seq, offsets, pos)
