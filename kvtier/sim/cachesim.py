"""Single-tier cache simulation over a key stream, and LRU miss-ratio curves in one pass.

``simulate`` runs any eviction policy at one capacity (feeding context and the future where
the policy asks for them). ``stack_distances`` computes every access's LRU stack distance with
a vectorised offline dominance count (no per-access Python loop), so ``lru_mrc`` gives the
LRU hit ratio at *all* capacities at once: LRU with capacity C hits exactly the accesses whose
stack distance is < C (Mattson et al. 1970).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from kvtier.policies.base import EvictionPolicy
from kvtier.sim.access import BlockStream


@dataclass(frozen=True, slots=True)
class SimResult:
    """Outcome of one single-tier run."""

    policy: str
    capacity: int
    accesses: int
    hits: int
    seconds: float  # wall time of the run
    cpu_seconds: float = 0.0  # this process's CPU time for it (time.process_time)

    @property
    def misses(self) -> int:
        return self.accesses - self.hits

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def accesses_per_s(self) -> float:
        return self.accesses / self.seconds if self.seconds > 0 else float("inf")

    @property
    def accesses_per_cpu_s(self) -> float:
        return self.accesses / self.cpu_seconds if self.cpu_seconds > 0 else float("inf")


def simulate(policy: EvictionPolicy, stream: BlockStream | np.ndarray) -> SimResult:
    """Feed the single-tier key stream of ``stream`` through ``policy`` (fresh or warm).

    ``stream`` is a ``BlockStream`` (keys in trace order, ascending block id within a record,
    with per-record context for context-aware policies) or a bare key array (no context).
    """
    if isinstance(stream, BlockStream):
        keys = stream.keys()
    else:
        keys = np.asarray(stream, dtype=np.int64)
        if policy.needs_context:
            raise ValueError(f"policy {policy.name!r} needs context: pass a BlockStream")
    t0, c0 = time.perf_counter(), time.process_time()
    if policy.offline:
        policy.set_future(keys)
    if policy.needs_context:
        hits = _simulate_with_context(policy, stream, keys)
    else:
        hits = policy.access_many(keys)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return SimResult(policy.name, policy.capacity, int(keys.shape[0]), int(hits), dt, dc)


def _simulate_with_context(policy: EvictionPolicy, bs: BlockStream, keys: np.ndarray) -> int:
    s = bs.stream
    off = bs.offsets.tolist()
    steps, layers, reqs, seqs = s.step.tolist(), s.layer.tolist(), s.req.tolist(), s.seq_len.tolist()
    klist = keys.tolist()
    begin = policy.begin_record
    access = policy.access
    block_size = bs.block_size
    hits = 0
    for i in range(len(s)):
        begin(steps[i], layers[i], reqs[i], seqs[i], block_size)
        for k in klist[off[i]:off[i + 1]]:
            hits += access(k)
    return hits


def stack_distances(keys: np.ndarray) -> np.ndarray:
    """LRU stack distance per access: distinct other keys read since the previous access of
    the same key, or -1 for a first access.

    With ``prev[i]`` the previous occurrence of ``keys[i]``, the distinct keys in
    ``(prev[i], i)`` are the positions j there with ``prev[j] <= prev[i]`` (first in-window
    read of their key), so ``d[i] = #{j < i : prev[j] <= prev[i]} - (prev[i] + 1)``: every
    ``j <= prev[i]`` qualifies. The count is a 2-D dominance count, done level by level over
    the bits of the position (merge-sort style): at level k, queries in the right half of a
    2**(k+1)-aligned block count left-half elements with ``prev <= prev[i]`` by one sort and
    two ``searchsorted`` calls. O(n log^2 n) in numpy.
    """
    keys = np.asarray(keys)
    n = int(keys.shape[0])
    dist = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return dist
    order = np.argsort(keys, kind="stable")
    same = keys[order[1:]] == keys[order[:-1]]
    prev = np.full(n, -1, dtype=np.int64)
    prev[order[1:][same]] = order[:-1][same]
    a = prev + 1  # in [0, n): shifted so it is non-negative
    idx = np.arange(n, dtype=np.int64)
    reuse = prev >= 0
    cnt = np.zeros(n, dtype=np.int64)
    shift = int(n).bit_length() + 1
    k = 0
    while (1 << k) < n:
        right = ((idx >> k) & 1).astype(bool)
        blk = idx >> (k + 1)
        left = ~right
        lk = np.sort((blk[left] << shift) | a[left])
        q = right & reuse
        if q.any():
            base = blk[q] << shift
            cnt[q] += (np.searchsorted(lk, base | a[q], side="right")
                       - np.searchsorted(lk, base, side="left"))
        k += 1
    dist[reuse] = cnt[reuse] - a[reuse]
    return dist


@dataclass(frozen=True, slots=True)
class MissRatioCurve:
    """LRU hits at every capacity 0..max_capacity (``hits[c]`` = hits with c blocks)."""

    accesses: int
    hits: np.ndarray  # int64 [working_set + 1]

    @property
    def capacities(self) -> np.ndarray:
        return np.arange(self.hits.shape[0], dtype=np.int64)

    @property
    def miss_ratio(self) -> np.ndarray:
        if not self.accesses:
            return np.zeros(self.hits.shape[0])
        return 1.0 - self.hits / self.accesses

    def hits_at(self, capacity: int | np.ndarray) -> np.ndarray | int:
        c = np.minimum(np.asarray(capacity, dtype=np.int64), self.hits.shape[0] - 1)
        out = self.hits[c]
        return int(out) if np.ndim(out) == 0 else out

    @property
    def working_set(self) -> int:
        return int(self.hits.shape[0] - 1)

    def knee(self) -> int | None:
        """The capacity past which more blocks pay less than on average (Kneedle, Satopaa et
        al. 2011, on the linear axes): the c maximising ``hits[c] / hits[ws] - c / ws``, the
        point of the normalised hit curve furthest above its chord (the first such c >= 1).
        For the cliffs of LRU on looping streams it is the loop size. None when no capacity
        gives a hit (empty trace, or no key read twice)."""
        ws = self.working_set
        top = int(self.hits[-1])
        if ws == 0 or top == 0:
            return None
        gap = self.hits[1:] / top - np.arange(1, ws + 1) / ws
        return int(np.argmax(gap)) + 1

    def sample(self, points: int) -> np.ndarray:
        """A bounded set of capacities to tabulate: 0, about ``points`` log-spaced
        capacities from 1 to the working set (its ends included), and the knee with the
        capacity just below it (where a cliff shows); sorted, unique."""
        if points < 2:
            raise ValueError(f"points must be >= 2, got {points}")
        ws = self.working_set
        if ws == 0:
            return np.zeros(1, dtype=np.int64)
        logs = np.round(np.geomspace(1, ws, min(points, ws))).astype(np.int64)
        knee = self.knee()
        extra = [] if knee is None else [max(knee - 1, 0), knee]
        return np.unique(np.concatenate([[0], logs, [ws], extra]).astype(np.int64))


def lru_mrc(keys: np.ndarray) -> MissRatioCurve:
    """LRU hits for all capacities from one pass of stack distances."""
    d = stack_distances(keys)
    d = d[d >= 0]
    ws = int(np.unique(keys).shape[0]) if len(keys) else 0
    hist = np.bincount(d, minlength=ws + 1)[: ws + 1] if d.shape[0] else np.zeros(ws + 1, np.int64)
    hits = np.zeros(ws + 1, dtype=np.int64)
    np.cumsum(hist[:-1], out=hits[1:]) if ws else None
    return MissRatioCurve(int(len(keys)), hits)
