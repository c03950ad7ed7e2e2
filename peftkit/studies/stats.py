"""Intervals and verdicts for comparisons: numpy only, no DataFrames (see `summary` for those).

A run's test accuracy varies with its seed (initialisation, data order, dropout) and with the
test items that happened to be drawn. `mean_interval` accounts for both: given the per-item
correctness of each seed's run on the same test items (an S x N matrix of 0/1), its variance is
s_seeds^2 / S + s_items^2 / N (the spread of the seeds' accuracies, plus the spread of the items'
seed-averaged correctness), with Satterthwaite's degrees of freedom for the t quantile. That
double-counts the seed-by-item noise a little, so it errs wide: verdicts err toward "cannot tell".
With one seed it is the usual binomial interval; without items, the t interval over seeds. From
`BOOTSTRAP_MIN_SEEDS` seeds on it resamples seeds and test items instead (percentile bootstrap).

Paired differences use the same code on the per-item differences of two methods run with the
same seeds on the same items; for one pair of runs `mcnemar` gives the exact test as well.
Costs (seconds per step, memory) get a median with an interval: order statistics from six
seeds on, else a t interval on the logarithms.

Verdict words are computed from intervals, never typed: `verdict` says whether an interval lies
inside a claimed range (HOLDS), outside it (FAILS), or straddles its edge (CANNOT_TELL).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
BOOTSTRAP_MIN_SEEDS = 20   # fewer seeds than this: t interval (a bootstrap over few seeds covers too little)
BOOTSTRAP_SAMPLES = 2000
HOLDS, FAILS, CANNOT_TELL = "holds", "does not hold", "cannot tell at this precision"
HIGHER, LOWER = "higher", "lower"


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval, and how it was computed (`method`, in words)."""

    estimate: float
    lo: float
    hi: float
    method: str
    n_seeds: int = 1
    n_items: int | None = None
    sd: float = math.nan       # the standard deviation over seeds (nan for one seed)

    def within(self, lo: float, hi: float) -> "Interval":
        """The interval cut to [lo, hi], the values the quantity can take (an accuracy's [0, 1], a difference of
        accuracies' [-1, 1]). The true value lies there, so the cut loses no coverage; with two seeds the
        t-interval of a mean can otherwise reach -0.5 to 1.6. `method` says when it was cut."""
        cut_lo, cut_hi = max(self.lo, lo), min(self.hi, hi)
        if (cut_lo, cut_hi) == (self.lo, self.hi) or math.isnan(self.lo) or math.isnan(self.hi):
            return self
        return dataclasses.replace(self, lo=cut_lo, hi=cut_hi, method=f"{self.method}, cut to [{lo:g}, {hi:g}]")

    def fmt(self, scale: float = 100, digits: int = 1, unit: str = "") -> str:
        """'80.3 [79.1, 81.5]' (values times `scale`); the bare estimate when the interval is unknown."""
        e, lo, hi = (scale * v for v in (self.estimate, self.lo, self.hi))
        if math.isnan(lo) or math.isnan(hi):
            return f"{e:.{digits}f}{unit} [interval unknown]"
        return f"{e:.{digits}f}{unit} [{lo:.{digits}f}, {hi:.{digits}f}]"


# --- the t distribution, without scipy ----------------------------------------------------------

def _betacf(a, b, x, iters: int = 500):
    """Continued fraction of the regularized incomplete beta (modified Lentz), vectorised."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, iters + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + aa / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            h = h * d * c
        if np.all(np.abs(d * c - 1.0) < 1e-15):
            break
    return h


_lgamma = np.vectorize(math.lgamma, otypes=[float])
_norm_cdf = np.vectorize(NormalDist().cdf, otypes=[float])


def _betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b), vectorised over arrays of equal shape."""
    a, b, x = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (a, b, x)))
    out = np.where(x >= 1, 1.0, 0.0)
    inside = (x > 0) & (x < 1)
    if inside.any():
        ai, bi, xi = a[inside], b[inside], x[inside]
        front = np.exp(_lgamma(ai + bi) - _lgamma(ai) - _lgamma(bi) + ai * np.log(xi) + bi * np.log1p(-xi))
        direct = xi < (ai + 1) / (ai + bi + 2)
        out[inside] = np.where(direct, front * _betacf(ai, bi, np.where(direct, xi, 0.0)) / ai,
                               1.0 - front * _betacf(bi, ai, np.where(direct, 0.0, 1 - xi)) / bi)
    return out


def t_cdf(t, df):
    """P(T <= t) for Student's t with `df` degrees of freedom (df may be fractional or inf)."""
    t, df = np.broadcast_arrays(np.asarray(t, dtype=float), np.asarray(df, dtype=float))
    big = ~np.isfinite(df) | (df > 1e7)
    d = np.where(big, 1.0, df)
    tail = 0.5 * _betainc(d / 2, np.full_like(d, 0.5), d / (d + t * t))
    return np.where(big, _norm_cdf(t), np.where(t > 0, 1 - tail, tail))


def _t_pdf(t, df):
    return np.exp(_lgamma((df + 1) / 2) - _lgamma(df / 2) - 0.5 * np.log(df * math.pi)
                  - (df + 1) / 2 * np.log1p(t * t / df))


def t_quantile(p: float, df):
    """The p-quantile of Student's t, vectorised over df: Newton steps kept inside a bracket
    (the normal quantile below, the Cauchy one above), from the Cornish-Fisher expansion."""
    df = np.asarray(df, dtype=float)
    uniq, inverse = np.unique(df, return_inverse=True)  # solve once per distinct df
    x = _t_upper(max(p, 1 - p), uniq)[inverse].reshape(df.shape)
    x = x if p >= 0.5 else -x
    return float(x) if x.ndim == 0 else x


def _t_upper(pp: float, df: np.ndarray) -> np.ndarray:
    z = NormalDist().inv_cdf(pp)
    big = ~np.isfinite(df) | (df > 1e7)
    nu = np.where(big, 1.0, np.maximum(df, 1e-3))
    lo = np.full(nu.shape, z)
    hi = np.where(nu >= 1, math.tan(math.pi * (pp - 0.5)), 1e12)
    x = z + (z ** 3 + z) / (4 * nu) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * nu ** 2)
    x = np.clip(x, lo, hi)
    for _ in range(100):
        f = t_cdf(x, nu) - pp
        lo, hi = np.where(f < 0, x, lo), np.where(f > 0, x, hi)
        step = x - f / _t_pdf(x, nu)
        x = np.where((step > lo) & (step < hi), step, (lo + hi) / 2)
        if np.all(np.abs(f) < 1e-13) or np.all(hi - lo < 1e-12 * np.maximum(1, np.abs(x))):
            break
    return np.where(big, z, x)


# --- intervals of a mean --------------------------------------------------------------------------

def t_bounds(X, level: float = LEVEL, item_var=None, n_items=None):
    """(estimate, lo, hi, df) of the grand mean of X (..., S, N): seeds by items, vectorised over
    leading axes. item_var/n_items stand in for the item spread when X has no item axis (N = 1)."""
    X = np.asarray(X, dtype=float)
    S, N = X.shape[-2], X.shape[-1]
    est = X.mean(axis=(-2, -1))
    a = X.mean(-1).var(-1, ddof=1) / S if S > 1 else np.zeros_like(est)
    if N > 1:
        b, nb = X.mean(-2).var(-1, ddof=1) / N, N
    elif item_var is not None and n_items:
        b, nb = np.asarray(item_var, dtype=float) / n_items, n_items
    else:
        b, nb = np.zeros_like(est), 1
    var = a + b
    den = (a ** 2 / (S - 1) if S > 1 else 0.0) + (b ** 2 / (nb - 1) if nb > 1 else 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = np.where(den > 0, var ** 2 / np.where(den > 0, den, 1), np.inf)
    q = t_quantile(0.5 + level / 2, np.atleast_1d(df)).reshape(np.shape(df))
    half = q * np.sqrt(var)
    if S == 1 and N == 1 and item_var is None:
        half = np.full_like(est, np.nan)  # one number: no spread to measure
    return est, est - half, est + half, df


def bootstrap_bounds(X, level: float = LEVEL, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0):
    """(estimate, lo, hi) of the grand mean of X (..., S, N) by a percentile bootstrap that
    resamples seeds and items independently (the same draws for every leading index)."""
    X = np.asarray(X, dtype=float)
    S, N = X.shape[-2], X.shape[-1]
    rng = np.random.default_rng(seed)
    ws = rng.multinomial(S, np.full(S, 1 / S), size=samples).astype(float)      # samples x S
    wi = rng.multinomial(N, np.full(N, 1 / N), size=samples).astype(float).T    # N x samples
    per_seed = X @ wi / N                                                       # ... x S x samples
    draws = (per_seed * ws.T).sum(axis=-2) / S
    lo, hi = np.quantile(draws, [0.5 - level / 2, 0.5 + level / 2], axis=-1)
    return X.mean(axis=(-2, -1)), lo, hi


def mean_interval(values, items=None, item_var: float | None = None, n_items: int | None = None,
                  level: float = LEVEL, what: str = "test items") -> Interval:
    """The interval of a mean over seeds. values: one number per seed. items: optional S x N
    matrix of per-item scores (row means = values), the same items for every seed. Without
    items, item_var (e.g. p(1-p)) over n_items stands in for the items' spread."""
    values = np.asarray(values, dtype=float)
    S = len(values)
    sd = float(values.std(ddof=1)) if S > 1 else math.nan
    if items is not None:
        X = np.asarray(items, dtype=float)
        if X.shape[0] != S:
            raise ValueError(f"items has {X.shape[0]} rows for {S} seeds.")
        N = X.shape[1]
        if S >= BOOTSTRAP_MIN_SEEDS:
            est, lo, hi = bootstrap_bounds(X, level)
            how = f"bootstrap over {S} seeds and {N:,} {what}"
        else:
            est, lo, hi, _ = t_bounds(X, level)
            how = f"t over {S} seed{'s' * (S > 1)} and {N:,} {what}"
        return Interval(float(est), float(lo), float(hi), how, S, N, sd)
    est, lo, hi, _ = t_bounds(values[:, None], level, item_var, n_items)
    if S == 1 and item_var is None:
        how = "one run: no interval"
    elif item_var is None:
        how = f"t over {S} seeds"
    else:
        how = f"t over {S} seed{'s' * (S > 1)}, binomial over {n_items:,} {what} (no per-item record)"
    return Interval(float(est), float(lo), float(hi), how, S, n_items, sd)


# --- paired tests --------------------------------------------------------------------------------

def mcnemar(a, b) -> dict:
    """McNemar's exact test for two runs on the same items (0/1 correctness): n01 items only b
    gets right, n10 only a, and the two-sided binomial p-value of that split."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"McNemar needs the same items for both runs: {a.shape} against {b.shape}.")
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    n, k = n10 + n01, min(n10, n01)
    if n == 0:
        return {"n10": 0, "n01": 0, "p": 1.0}
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return {"n10": n10, "n01": n01, "p": min(1.0, 2 * tail)}


def paired_difference(a_values, b_values, a_items=None, b_items=None, a_var=None, b_var=None,
                      n_items=None, level: float = LEVEL) -> tuple[Interval, float]:
    """(interval of mean(a - b), McNemar p or nan). The values (and items) are paired by seed;
    with per-item records the items are paired too. Without them, the two binomial spreads add."""
    a_values, b_values = np.asarray(a_values, dtype=float), np.asarray(b_values, dtype=float)
    if a_values.shape != b_values.shape:
        raise ValueError("paired_difference needs the same seeds on both sides.")
    if a_items is not None and b_items is not None:
        A, B = np.asarray(a_items, dtype=float), np.asarray(b_items, dtype=float)
        iv = mean_interval(a_values - b_values, A - B, level=level)
        p = mcnemar(A[0], B[0])["p"] if len(a_values) == 1 else math.nan
        return Interval(iv.estimate, iv.lo, iv.hi, "paired " + iv.method, iv.n_seeds, iv.n_items, iv.sd), p
    var = None if a_var is None or b_var is None else a_var + b_var
    iv = mean_interval(a_values - b_values, item_var=var, n_items=n_items, level=level)
    return Interval(iv.estimate, iv.lo, iv.hi, "paired by seed, " + iv.method, iv.n_seeds, iv.n_items, iv.sd), math.nan


# --- costs: medians and ratios --------------------------------------------------------------------

def median_interval(values, level: float = LEVEL) -> Interval:
    """Median over seeds with its interval: order statistics (distribution-free) from six values
    on, else a t interval on the logarithms (for positive values); none for one value."""
    v = np.sort(np.asarray(values, dtype=float))
    n, med = len(v), float(np.median(v))
    if n == 1:
        return Interval(med, math.nan, math.nan, "one run: no interval", 1)
    sd = float(v.std(ddof=1))
    if n >= 6:  # the widest k with P(Binomial(n, 1/2) < k) <= (1 - level)/2
        cdf, k = 0.0, 0
        while True:
            nxt = cdf + math.comb(n, k) / 2 ** n
            if nxt > (1 - level) / 2:
                break
            cdf, k = nxt, k + 1
        return Interval(med, float(v[k - 1]), float(v[n - k]), f"order statistics over {n} seeds", n, None, sd)
    if (v <= 0).any():
        est, lo, hi, _ = t_bounds(v[:, None], level)
        return Interval(med, float(lo), float(hi), f"t over {n} seeds", n, None, sd)
    _, lo, hi, _ = t_bounds(np.log(v)[:, None], level)
    return Interval(med, float(np.exp(lo)), float(np.exp(hi)), f"t on logs over {n} seeds", n, None, sd)


def ratio_interval(a, b, level: float = LEVEL) -> Interval:
    """The ratio a/b of paired positive measurements (same seeds), as a geometric mean with a t
    interval on the log ratios; exact when every ratio is the same."""
    r = np.log(np.asarray(a, dtype=float)) - np.log(np.asarray(b, dtype=float))
    est, lo, hi, _ = t_bounds(r[:, None], level)
    if len(r) > 1 and np.allclose(r, r[0], rtol=0, atol=1e-12):
        lo = hi = est
    how = "exact" if lo == hi else ("one pair: no interval" if len(r) == 1 else f"t on log ratios over {len(r)} seeds")
    return Interval(float(np.exp(est)), float(np.exp(lo)), float(np.exp(hi)), how, len(r), None,
                    float(np.exp(r).std(ddof=1)) if len(r) > 1 else math.nan)


# --- words from intervals -------------------------------------------------------------------------

def verdict(lo: float, hi: float, low: float = -math.inf, high: float = math.inf) -> str:
    """Does the claim "the value lies in [low, high)" hold, given an interval [lo, hi]?"""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return CANNOT_TELL
    if low <= lo and hi < high:
        return HOLDS
    if hi < low or lo >= high:
        return FAILS
    return CANNOT_TELL


def direction(lo: float, hi: float) -> str:
    """HIGHER or LOWER when the interval of a difference excludes 0, else CANNOT_TELL."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return CANNOT_TELL
    return HIGHER if lo > 0 else LOWER if hi < 0 else CANNOT_TELL


def correct_string(flags) -> str:
    """Per-item correctness as a compact '0'/'1' string (one character per test item)."""
    return "".join("1" if f else "0" for f in flags)


def correct_array(s: str) -> np.ndarray:
    """The inverse of `correct_string`: a float array of 0s and 1s."""
    return np.frombuffer(s.encode("ascii"), dtype=np.uint8).astype(float) - ord("0")
