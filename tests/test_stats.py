"""Intervals and verdicts (peftkit.studies.stats, summary): coverage on simulated data, hand-computed
paired tests, and verdict words that say "cannot tell" when the intervals allow either answer."""

import math

import numpy as np
import pandas as pd
import pytest

from peftkit.studies import stats
from peftkit.studies.article_checks import claims_table, claims_text
from peftkit.studies.summary import format_summary, summarize

DRAWS = 4000  # coverage is estimated to +-0.007 (two standard errors) at 0.95


def _coverage(lo, hi, truth) -> float:
    return float(np.mean((lo <= truth) & (truth <= hi)))


def _crossed(rng, draws, seeds, items, seed_sd, mu=1.5, item_sd=1.5):
    """0/1 correctness of `seeds` runs on the same `items`: item difficulty and a seed effect on
    the logit scale (the shape of real runs: items shared across seeds, runs differing by seed)."""
    logit = rng.normal(mu, item_sd, size=(draws, 1, items)) + rng.normal(0, seed_sd, size=(draws, seeds, 1))
    return (rng.random((draws, seeds, items)) < 1 / (1 + np.exp(-logit))).astype(float)


def _population_mean(rng, seed_sd, mu=1.5, item_sd=1.5, n=2_000_000):
    return float(np.mean(1 / (1 + np.exp(-(rng.normal(mu, item_sd, n) + rng.normal(0, seed_sd, n))))))


def test_t_quantiles_match_the_tables():
    assert stats.t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert stats.t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-6)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=1e-6)
    assert stats.t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)
    scipy = pytest.importorskip("scipy.stats")
    df = np.array([1, 1.7, 3.3, 12.5, 80, 5000])
    assert np.allclose(stats.t_quantile(0.975, df), scipy.t.ppf(0.975, df), atol=1e-7)


def test_t_interval_over_seeds_covers_95_percent_of_normal_draws():
    rng = np.random.default_rng(0)
    X = rng.normal(0.8, 0.02, size=(DRAWS, 3, 1))  # three seeds, no per-item record
    _, lo, hi, _ = stats.t_bounds(X)
    assert 0.93 <= _coverage(lo, hi, 0.8) <= 0.97


def test_one_run_interval_over_test_items_covers_95_percent():
    rng = np.random.default_rng(1)
    X = (rng.random((DRAWS, 1, 400)) < 0.8).astype(float)  # one seed, 400 test items at 80%
    _, lo, hi, _ = stats.t_bounds(X)
    assert 0.93 <= _coverage(lo, hi, 0.8) <= 0.97


def test_seeds_and_items_interval_covers_95_percent_of_the_population_accuracy():
    rng = np.random.default_rng(2)
    truth = _population_mean(rng, seed_sd=0.2)
    _, lo, hi, _ = stats.t_bounds(_crossed(rng, DRAWS, seeds=3, items=300, seed_sd=0.2))
    assert 0.93 <= _coverage(lo, hi, truth) <= 0.97


def test_bootstrap_over_seeds_and_items_covers_95_percent():
    rng = np.random.default_rng(3)
    truth = _population_mean(rng, seed_sd=0.2)
    X = _crossed(rng, 2000, seeds=20, items=50, seed_sd=0.2)
    _, lo, hi = stats.bootstrap_bounds(X, samples=400)
    assert 0.93 <= _coverage(lo, hi, truth) <= 0.97
    one = stats.mean_interval(X[0].mean(1), X[0])  # from 20 seeds on, mean_interval bootstraps, and says so
    assert one.method.startswith("bootstrap over 20 seeds and 50 test items")


def test_paired_difference_and_mcnemar_against_a_hand_computed_case():
    # 20 test items: a alone right on 6, b alone right on 1, both right on 10, both wrong on 3
    a = np.array([1] * 6 + [0] * 1 + [1] * 10 + [0] * 3, dtype=float)
    b = np.array([0] * 6 + [1] * 1 + [1] * 10 + [0] * 3, dtype=float)
    m = stats.mcnemar(a, b)
    assert (m["n10"], m["n01"]) == (6, 1)
    assert m["p"] == pytest.approx(2 * (1 + 7) / 2 ** 7)  # two-sided exact binomial: 2 P(X <= 1 | 7, 1/2)
    iv, p = stats.paired_difference([a.mean()], [b.mean()], a[None], b[None])
    # d = (6 - 1)/20 = 0.25; var of the per-item differences = (7 - 20 * 0.25**2)/19; t with 19 df
    half = 2.093024 * math.sqrt((7 - 20 * 0.25 ** 2) / 19 / 20)
    assert iv.estimate == pytest.approx(0.25)
    assert (iv.lo, iv.hi) == (pytest.approx(0.25 - half, abs=1e-6), pytest.approx(0.25 + half, abs=1e-6))
    assert p == pytest.approx(0.125)
    assert stats.direction(iv.lo, iv.hi) == stats.CANNOT_TELL  # 5 of 7 discordant items: not enough
    many = stats.paired_difference([0.8], [0.7], np.tile(a, 10)[None], np.tile(b, 10)[None])[0]
    assert stats.direction(many.lo, many.hi) == stats.HIGHER  # the same split over 200 items is


def test_verdicts_come_from_intervals():
    assert stats.verdict(0.61, 0.70, 0.6, 0.9) == stats.HOLDS
    assert stats.verdict(0.50, 0.58, 0.6, 0.9) == stats.FAILS
    assert stats.verdict(0.569, 0.619, 0.6, 0.9) == stats.CANNOT_TELL  # notebook 04's two runs, one interval
    assert stats.verdict(math.nan, math.nan, 0.6, 0.9) == stats.CANNOT_TELL
    assert stats.direction(-0.02, 0.01) == stats.CANNOT_TELL and stats.direction(0.01, 0.02) == stats.HIGHER


def test_median_interval_and_exact_ratios():
    iv = stats.median_interval(range(1, 11))  # order statistics: P(Bin(10, 1/2) <= 1) = 11/1024 <= 0.025
    assert (iv.estimate, iv.lo, iv.hi) == (5.5, 2, 9)
    assert math.isnan(stats.median_interval([0.5]).lo)
    r = stats.ratio_interval([5, 5, 5], [10, 10, 10])
    assert (r.estimate, r.lo, r.hi, r.method) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5), "exact")
    assert math.isnan(stats.ratio_interval([5], [10]).lo)  # one pair of timings: no interval
    assert stats.correct_array(stats.correct_string([1, 0, 1])).tolist() == [1, 0, 1]


def _runs(label, method, accs, n=400, seed_items=None, sec=0.5, size=1000, rng=None):
    """compare()-shaped rows of one configuration, one per seed, with per-item records."""
    rng = rng or np.random.default_rng(0)
    rows = []
    for seed, p in enumerate(accs):
        correct = seed_items[seed] if seed_items is not None else (rng.random(n) < p).astype(int)
        rows.append({"label": label, "method": method, "lr": 1e-3, "seed": seed, "split_seed": 0,
                     "config": f"{label}-cfg", "base": "minilm", "domain": "movies", "n_train": 2000, "epochs": 1,
                     "accuracy": float(np.mean(correct)), "f1_macro": float(np.mean(correct)),
                     "sec_per_step": sec * (1 + 0.01 * seed), "peak_mem_mib": 1000 + seed, "adapter_bytes": size,
                     "trainable": size // 4, "trainable_pct": 1.0, "test_items": "abc", "n_test": n,
                     "correct": {"movies": stats.correct_string(correct)}})
    return rows


def test_summarize_says_cannot_tell_when_the_intervals_overlap():
    rng = np.random.default_rng(5)
    base = (rng.random((3, 400)) < 0.8).astype(int)
    flip = base.copy()
    flip[:, :4] = 1 - flip[:, :4]  # four items changed per seed: a difference of at most 1 point
    worse = base.copy()
    worse[:, :120] = 0             # 120 items wrong: far below
    rows = (_runs("full", "full", [0] * 3, seed_items=base, sec=1.0, size=10 ** 6)
            + _runs("lora r=8", "lora", [0] * 3, seed_items=flip, sec=0.6)
            + _runs("head_only", "head_only", [0] * 3, seed_items=worse, sec=0.3, size=10))
    s = summarize(pd.DataFrame(rows)).set_index("label")
    assert list(s.n_seeds) == [3, 3, 3] and (s.interval == "t over 3 seeds and 400 test items").all()
    assert s.loc["lora r=8", "vs_reference"] == stats.CANNOT_TELL
    assert s.loc["lora r=8", "accuracy_lo"] < s.loc["full", "accuracy_hi"]  # the intervals overlap
    assert s.loc["head_only", "vs_reference"] == stats.LOWER and s.loc["full", "vs_reference"] == "reference"
    assert s.loc["lora r=8", "sec_per_step_lo"] < 0.6 * 1.01 < s.loc["lora r=8", "sec_per_step_hi"]
    table = format_summary(s.reset_index())
    assert "cannot tell at this precision" in set(table.verdict) and "[" in table["accuracy % [95%]"].iloc[0]


def test_one_pair_of_runs_gets_mcnemar():
    rng = np.random.default_rng(6)
    a = (rng.random((1, 300)) < 0.8).astype(int)
    b = a.copy()
    b[0, :30] = 1 - b[0, :30]
    s = summarize(pd.DataFrame(_runs("full", "full", [0], seed_items=a) + _runs("lora", "lora", [0], seed_items=b)))
    p = s.set_index("label").loc["lora", "mcnemar_p"]
    assert p == pytest.approx(stats.mcnemar(b[0], a[0])["p"])


def test_claims_table_gives_holds_does_not_hold_or_cannot_tell():
    full = _runs("full", "full", [0.8] * 3, sec=1.0, size=10 ** 8)
    lora = _runs("lora r=8", "lora", [0.8] * 3, sec=0.5, size=2 * 10 ** 6)  # 'shorter' (< 0.75x): clearly
    adapter = _runs("adapter", "adapter", [0.8] * 3, sec=0.6, size=5 * 10 ** 5)
    for r, jitter in zip(adapter, (0.9, 1.0, 1.12)):  # 'medium' (0.6x to 0.9x): its interval straddles 0.6
        r["sec_per_step"] = 0.6 * jitter
    t = claims_table(pd.DataFrame(full + lora + adapter)).set_index("method")
    assert t.loc["lora", "time claim"] == stats.HOLDS
    assert t.loc["lora", "storage claim"] == stats.FAILS  # 0.02x is not 'extremely low' (< 0.01x); exact
    assert t.loc["adapter", "storage claim"] == stats.HOLDS
    assert t.loc["adapter", "time claim"] == stats.CANNOT_TELL
    assert t.loc["full", ["time claim", "storage claim", "accuracy vs full"]].tolist() == ["reference"] * 3
    assert t.loc["full", "seeds"] == 3
    assert "- Full fine-tune: the reference every ratio below divides by" in claims_text(t.reset_index())
    one = claims_table(pd.DataFrame(full[:1] + lora[:1])).set_index("method")
    assert one.loc["lora", "time claim"] == stats.CANNOT_TELL  # one run each: no interval, no verdict
    assert "cannot tell at this precision" in claims_text(one.reset_index())


def test_accuracy_intervals_stay_inside_the_values_an_accuracy_can_take():
    """Two seeds of 0.55 apart: the t-interval of the mean (t = 12.7) runs from below 0 to above 1, which no
    accuracy can; the summary cuts it to [0, 1] (no coverage lost: the truth lies there) and says so, and a
    difference of accuracies to [-1, 1]. An interval inside those bounds is left as it was."""
    from peftkit.studies.summary import accuracy_difference, accuracy_interval
    runs = pd.DataFrame({"seed": [0, 1], "accuracy": [0.27, 0.82], "n_test": [200, 200]})
    raw = stats.mean_interval(runs.accuracy.to_numpy(), item_var=0.545 * 0.455, n_items=200)
    assert raw.lo < 0 and raw.hi > 1
    iv = accuracy_interval(runs)
    assert (iv.lo, iv.hi, iv.estimate) == (0.0, 1.0, pytest.approx(0.545)) and "cut to [0, 1]" in iv.method
    other = pd.DataFrame({"seed": [0, 1], "accuracy": [0.99, 0.30], "n_test": [200, 200]})
    d, _ = accuracy_difference(other, runs)
    assert d.lo >= -1.0 and d.hi <= 1.0 and d.lo < 0 < d.hi
    narrow = pd.DataFrame({"seed": [0, 1], "accuracy": [0.70, 0.72], "n_test": [200, 200]})
    kept = accuracy_interval(narrow)
    assert "cut" not in kept.method and 0 < kept.lo < 0.70 and 0.72 < kept.hi < 1
