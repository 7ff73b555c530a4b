"""Streaming distributions: ``{count, min, max, mean, std}`` merged chunk by chunk.

``std`` is the sample standard deviation (n - 1 in the denominator; 0.0 for fewer than two
values). Chunks merge with Chan et al.'s pairwise update of (count, mean, M2), which is exact in
exact arithmetic and numerically stable, so the result does not depend on the chunking beyond
rounding. An empty distribution reports count 0 and zeros, as the seed note's analysis tooling
does.
"""

from __future__ import annotations

import math

import numpy as np


class Dist:
    """One distribution accumulated from numpy chunks (NaN values are ignored)."""

    __slots__ = ("n", "mean", "m2", "lo", "hi")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.lo = math.inf
        self.hi = -math.inf

    def add(self, x) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()
        if x.shape[0] and np.isnan(x).any():
            x = x[~np.isnan(x)]
        k = int(x.shape[0])
        if k == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        self._merge(k, mean_b, m2_b, float(x.min()), float(x.max()))

    def _merge(self, k: int, mean_b: float, m2_b: float, lo: float, hi: float) -> None:
        n = self.n + k
        d = mean_b - self.mean
        self.mean += d * k / n
        self.m2 += m2_b + d * d * self.n * k / n
        self.n = n
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)

    def to_dict(self) -> dict:
        if self.n == 0:
            return {"count": 0, "min": 0.0, "max": 0.0, "mean": 0.0, "std": 0.0}
        std = math.sqrt(max(self.m2, 0.0) / (self.n - 1)) if self.n > 1 else 0.0
        return {"count": self.n, "min": self.lo, "max": self.hi, "mean": self.mean, "std": std}


class DistSet:
    """``k`` distributions fed together, one column each of an (n, k) matrix without NaNs
    (one vectorised merge for all of them instead of k small ones)."""

    def __init__(self, k: int) -> None:
        self.n = 0
        self.mean = np.zeros(k)
        self.m2 = np.zeros(k)
        self.lo = np.full(k, np.inf)
        self.hi = np.full(k, -np.inf)

    def add(self, x) -> None:
        x = np.asarray(x, dtype=np.float64)
        k = int(x.shape[0])
        if k == 0:
            return
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n = self.n + k
        d = mean_b - self.mean
        self.mean = self.mean + d * (k / n)
        self.m2 = self.m2 + m2_b + d * d * (self.n * k / n)
        self.n = n
        self.lo = np.minimum(self.lo, x.min(axis=0))
        self.hi = np.maximum(self.hi, x.max(axis=0))

    def dist(self, j: int) -> dict:
        d = Dist()
        d.n, d.mean, d.m2 = self.n, float(self.mean[j]), float(self.m2[j])
        d.lo, d.hi = float(self.lo[j]), float(self.hi[j])
        return d.to_dict()


class GroupMean:
    """Count and mean per small non-negative integer group (a layer, a decode step)."""

    def __init__(self) -> None:
        self.n = np.zeros(0, dtype=np.int64)
        self.s = np.zeros(0)

    def add(self, group, x) -> None:
        g = np.asarray(group, dtype=np.int64).ravel()
        x = np.asarray(x, dtype=np.float64).ravel()
        ok = ~np.isnan(x)
        if not ok.all():
            g, x = g[ok], x[ok]
        if g.shape[0] == 0:
            return
        size = max(int(g.max()) + 1, self.n.shape[0])
        n = np.bincount(g, minlength=size)
        s = np.bincount(g, weights=x, minlength=size)
        n[:self.n.shape[0]] += self.n
        s[:self.s.shape[0]] += self.s
        self.n, self.s = n, s

    def groups(self) -> list[int]:
        return np.flatnonzero(self.n > 0).tolist()

    def mean(self, g: int) -> float | None:
        if g >= self.n.shape[0] or self.n[g] == 0:
            return None
        return float(self.s[g] / self.n[g])


class GroupDist:
    """One ``Dist`` per small non-negative integer group (a layer, a decode step), vectorised."""

    def __init__(self) -> None:
        self.n = np.zeros(0, dtype=np.int64)
        self.mean = np.zeros(0)
        self.m2 = np.zeros(0)
        self.lo = np.zeros(0)
        self.hi = np.zeros(0)

    def _grow(self, size: int) -> None:
        if size <= self.n.shape[0]:
            return
        pad = size - self.n.shape[0]
        self.n = np.concatenate([self.n, np.zeros(pad, np.int64)])
        self.mean = np.concatenate([self.mean, np.zeros(pad)])
        self.m2 = np.concatenate([self.m2, np.zeros(pad)])
        self.lo = np.concatenate([self.lo, np.full(pad, np.inf)])
        self.hi = np.concatenate([self.hi, np.full(pad, -np.inf)])

    def add(self, group, x) -> None:
        g = np.asarray(group, dtype=np.int64).ravel()
        x = np.asarray(x, dtype=np.float64).ravel()
        ok = ~np.isnan(x)
        g, x = g[ok], x[ok]
        if g.shape[0] == 0:
            return
        size = int(g.max()) + 1
        self._grow(size)
        k = np.bincount(g, minlength=size)
        s = np.bincount(g, weights=x, minlength=size)
        has = k > 0
        mean_b = np.zeros(size)
        mean_b[has] = s[has] / k[has]
        m2_b = np.bincount(g, weights=(x - mean_b[g]) ** 2, minlength=size)
        lo = np.full(size, np.inf)
        hi = np.full(size, -np.inf)
        np.minimum.at(lo, g, x)
        np.maximum.at(hi, g, x)
        n_a = self.n[:size]
        n = n_a + k
        d = mean_b - self.mean[:size]
        with np.errstate(invalid="ignore", divide="ignore"):
            self.mean[:size] = np.where(has, self.mean[:size] + d * k / np.maximum(n, 1),
                                        self.mean[:size])
            self.m2[:size] += np.where(has, m2_b + d * d * n_a * k / np.maximum(n, 1), 0.0)
        self.n[:size] = n
        self.lo[:size] = np.minimum(self.lo[:size], lo)
        self.hi[:size] = np.maximum(self.hi[:size], hi)

    def groups(self) -> list[int]:
        return np.flatnonzero(self.n > 0).tolist()

    def dist(self, g: int) -> dict:
        d = Dist()
        if g < self.n.shape[0]:
            d.n, d.mean, d.m2 = int(self.n[g]), float(self.mean[g]), float(self.m2[g])
            d.lo, d.hi = float(self.lo[g]), float(self.hi[g])
        return d.to_dict()

    def means(self) -> list[float | None]:
        return [float(m) if c else None for m, c in zip(self.mean, self.n, strict=True)]


def percentiles(values: np.ndarray, qs=(50, 95, 99)) -> dict:
    """``{count, mean, p50, p95, p99, max}`` with numpy's linear percentiles (the project's one
    definition, docs/INSTRUMENTATION.md); None fields when there are no values."""
    v = np.asarray(values, dtype=np.float64)
    out: dict = {"count": int(v.shape[0])}
    if v.shape[0] == 0:
        out.update({"mean": None, **{f"p{q}": None for q in qs}, "max": None})
        return out
    out["mean"] = float(v.mean())
    for q, p in zip(qs, np.percentile(v, qs), strict=True):
        out[f"p{q}"] = float(p)
    out["max"] = float(v.max())
    return out
