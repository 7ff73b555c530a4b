"""Percentiles and distributions: one definition for the whole project.

Every percentile in kvtier is numpy's default ``method="linear"`` (Hyndman & Fan type 7):
for sorted ``x`` of length n and q in [0, 100], ``h = (n - 1) q / 100`` and the result
interpolates between ``x[floor(h)]`` and ``x[ceil(h)]``. The helpers below reproduce numpy's
arithmetic exactly (including its two-sided lerp), so the vectorised per-row statistics the
tracer writes equal ``np.percentile`` bit for bit.
"""

from __future__ import annotations

import numpy as np

from kvtier.schema import Distribution


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """numpy's percentile interpolation: ``a + (b - a) t``, evaluated from ``b`` when t >= 0.5."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)


def rank_split(n: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sample sizes ``n`` (>= 1): the lower and upper 0-based ranks and the weight."""
    n = np.asarray(n, dtype=np.int64)
    h = (n - 1).astype(np.float64) * (q / 100.0)
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, h - lo


def percentile_sorted_rows(values: np.ndarray, starts: np.ndarray, q: float) -> np.ndarray:
    """Percentile q of each row of a flat array whose rows (``values[starts[i]:starts[i+1]]``)
    are each sorted ascending and non-empty."""
    starts = np.asarray(starts, dtype=np.int64)
    n = np.diff(starts)
    lo, hi, t = rank_split(n, q)
    base = starts[:-1]
    return lerp(values[base + lo], values[base + hi], t)


def kth_from_hist(cum: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Row-wise k-th smallest value (0-based) given cumulative histograms ``cum[row, v]``."""
    return (cum > k[:, None]).argmax(axis=1)


def percentile_hist_rows(hist: np.ndarray, q: float) -> np.ndarray:
    """Percentile q per row of integer samples given as histograms ``hist[row, value]``."""
    cum = np.cumsum(hist, axis=1)
    n = cum[:, -1]
    lo, hi, t = rank_split(n, q)
    return lerp(kth_from_hist(cum, lo), kth_from_hist(cum, hi), t)


def empty_distribution() -> Distribution:
    return Distribution(count=0, min=None, p50=None, p95=None, max=None, mean=None)


def distribution(values: np.ndarray) -> Distribution:
    """``{count, min, p50, p95, max, mean}`` of a sample (floats; nulls when empty)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return empty_distribution()
    p50, p95 = np.percentile(x, [50, 95])
    return Distribution(
        count=int(x.size),
        min=float(x.min()),
        p50=float(p50),
        p95=float(p95),
        max=float(x.max()),
        mean=float(x.mean()),
    )


def hist_distribution(hist: np.ndarray) -> Distribution:
    """The same distribution for non-negative integer samples given as ``hist[value] = count``:
    exact, in O(distinct values) memory however many samples were seen."""
    hist = np.asarray(hist, dtype=np.int64)
    n = int(hist.sum())
    if n == 0:
        return empty_distribution()
    nz = np.flatnonzero(hist)
    cum = np.cumsum(hist)
    out = []
    for q in (50.0, 95.0):
        lo, hi, t = rank_split(np.array([n]), q)
        a = np.searchsorted(cum, lo + 1)
        b = np.searchsorted(cum, hi + 1)
        out.append(float(lerp(a, b, t)[0]))
    total = int(np.dot(np.arange(len(hist), dtype=np.int64), hist))
    return Distribution(
        count=n,
        min=float(nz[0]),
        p50=out[0],
        p95=out[1],
        max=float(nz[-1]),
        mean=total / n,
    )


def add_hist(acc: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``acc + counts`` for histograms of different lengths (grows ``acc`` as needed)."""
    if len(counts) > len(acc):
        acc = np.concatenate([acc, np.zeros(len(counts) - len(acc), dtype=np.int64)])
    acc[: len(counts)] += counts
    return acc
