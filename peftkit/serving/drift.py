"""Distribution-shift statistics between a reference sample and a current one.

Population stability index over bins cut at the reference's quantiles (p: reference shares,
q: current shares):

    PSI = sum_i (q_i - p_i) ln(q_i / p_i)

By the usual credit-scoring convention (Siddiqi, "Credit Risk Scorecards", 2006) under 0.1 is
stable, 0.1-0.25 a moderate shift and over 0.25 a major one. Between two samples of the same
distribution, (nm / (n + m)) PSI is about chi-square with (bins - 1) degrees of freedom, so PSI
has a noise floor of about (bins - 1)(1/n + 1/m).

Two-sample Kolmogorov-Smirnov: D = max_x |F_ref(x) - F_cur(x)|, with the asymptotic p-value
P(K > D sqrt(nm / (n + m))) of the Kolmogorov distribution,

    P(K > x) = 2 sum_{k>=1} (-1)^(k-1) exp(-2 k^2 x^2).
"""

from __future__ import annotations

import math

import numpy as np


def psi(reference, current, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of `current` against `reference` (bins at the reference's quantiles).

    Bins are (-inf, e1], (e1, e2], ..., (ek, inf) with repeated edges dropped, so a point mass
    (say, most texts with no unknown token) keeps a bin of its own. Empty bins count as `eps`.
    """
    ref, cur = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    if len(ref) == 0 or len(cur) == 0:
        raise ValueError("psi needs at least one value in each sample.")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    p = np.bincount(np.searchsorted(edges, ref, side="left"), minlength=len(edges) + 1) / len(ref)
    q = np.bincount(np.searchsorted(edges, cur, side="left"), minlength=len(edges) + 1) / len(cur)
    p, q = np.maximum(p, eps), np.maximum(q, eps)
    return float(np.sum((q - p) * np.log(q / p)))


def psi_categorical(reference, current, eps: float = 1e-4) -> float:
    """PSI over the categories seen in either sample (e.g. predicted labels)."""
    ref, cur = np.asarray(reference), np.asarray(current)
    cats = np.union1d(ref, cur)
    p = np.maximum(np.array([(ref == c).mean() for c in cats]), eps)
    q = np.maximum(np.array([(cur == c).mean() for c in cats]), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_2samp(reference, current) -> tuple[float, float]:
    """(D, asymptotic p-value) of the two-sample Kolmogorov-Smirnov test."""
    a, b = np.sort(np.asarray(reference, dtype=float)), np.sort(np.asarray(current, dtype=float))
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        raise ValueError("ks_2samp needs at least one value in each sample.")
    grid = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, grid, side="right") / n - np.searchsorted(b, grid, side="right") / m)))
    return d, kolmogorov_sf(d * math.sqrt(n * m / (n + m)))


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution: 2 sum_k (-1)^(k-1) exp(-2 k^2 x^2)."""
    if x <= 0:
        return 1.0
    if x < 0.2:  # the alternating series converges slowly here, and the value is 1 to 1e-20
        return 1.0
    s = sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))
    return float(min(1.0, max(0.0, 2 * s)))
