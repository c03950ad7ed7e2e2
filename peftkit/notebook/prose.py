"""Words from numbers: the sentences a notebook prints about its own results.

A notebook never types "beats" or "faster": it calls these, which choose the word from an interval
(`peftkit.studies.stats.direction`) or a measured ratio, and `params.record` keeps the numbers and
the word together, so a test can check that one follows from the other (tests/test_notebook_verdicts.py).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from ..studies import stats
from ..studies.summary import accuracy_difference

BEATS, TRAILS, TIED = "beats", "trails", "cannot be told apart at this precision from"
FASTER, SLOWER, AS_FAST = "faster than", "slower than", "about as fast as"
SPEED_TOLERANCE = 0.05  # a ratio within 5% of 1 is "about as fast": repeated CPU timings move that much


def direction_word(lo: float, hi: float) -> str:
    """BEATS when the interval of a difference lies above 0, TRAILS below, TIED when it straddles 0."""
    return {stats.HIGHER: BEATS, stats.LOWER: TRAILS}.get(stats.direction(lo, hi), TIED)


def change_word(lo: float, hi: float) -> str:
    """"rose", "fell" or "did not change beyond noise", for the interval of a change over time."""
    return {BEATS: "rose", TRAILS: "fell"}.get(direction_word(lo, hi), "did not change beyond noise")


def speed_word(ratio: float, tolerance: float = SPEED_TOLERANCE) -> str:
    """FASTER, SLOWER or AS_FAST for a speed-up ratio (above 1 is faster)."""
    if ratio is None or not math.isfinite(ratio):
        return AS_FAST
    return FASTER if ratio > 1 + tolerance else SLOWER if ratio < 1 - tolerance else AS_FAST


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def points(lo: float, hi: float, est: float, digits: int = 1) -> str:
    return f"{100 * est:+.{digits}f} points [{100 * lo:+.{digits}f}, {100 * hi:+.{digits}f}]"


def versus(a, b, a_label: str, b_label: str) -> dict:
    """Compare the runs `a` and `b` (result rows as DataFrames, one per seed, on the same test items).

    Returns {"sentence", "verdict", "diff", "lo", "hi", "a", "b"}: the accuracy difference a - b,
    paired by seed and test item, with its 95% interval and the word it supports.
    """
    iv, _ = accuracy_difference(a, b)
    if iv is None:
        raise ValueError(f"{a_label} and {b_label} share no seed: they cannot be paired; run both at the same seeds.")
    acc_a, acc_b = float(np.mean(a["accuracy"])), float(np.mean(b["accuracy"]))
    word = direction_word(iv.lo, iv.hi)
    sentence = (f"**{a_label}** ({pct(acc_a)}) {word} **{b_label}** ({pct(acc_b)}): "
                f"{points(iv.lo, iv.hi, iv.estimate)}, 95% interval {iv.method}.")
    return {"sentence": sentence, "verdict": word, "diff": iv.estimate, "lo": iv.lo, "hi": iv.hi,
            "a": acc_a, "b": acc_b}


def proportion_difference(k1: int, n1: int, k2: int, n2: int, level: float = stats.LEVEL) -> tuple[float, float, float]:
    """(p1 - p2, lo, hi) for two independent samples (different items): Newcombe's hybrid score
    interval from two Wilson intervals, which behaves at small n and near 0 or 1 (Newcombe 1998)."""
    if min(n1, n2) <= 0:
        return math.nan, math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)

    def wilson(k, n):
        p = k / n
        mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return p, mid - half, mid + half

    p1, l1, u1 = wilson(k1, n1)
    p2, l2, u2 = wilson(k2, n2)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def chance_word(acc: float, n: int, chance: float = 0.5) -> str:
    """"above chance", "below chance" or "not told apart from chance": a Wilson interval against `chance`."""
    if n <= 0:
        return "not told apart from chance"
    z = NormalDist().inv_cdf(0.5 + stats.LEVEL / 2)
    mid = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return "above chance" if mid - half > chance else "below chance" if mid + half < chance else "not told apart from chance"
