"""Choosing a method from measured evidence: `recommend(results, constraints)`.

It reads a `compare()` DataFrame (one row per run; several seeds of a configuration become one
row with intervals, through `summarize`), keeps the configurations that meet the constraints (max
trainable fraction, max seconds per step, max peak memory, max adapter bytes, min accuracy), finds
their Pareto front, and chooses: the most accurate feasible one is the reference, any whose
accuracy cannot be told from it at this precision (the interval of the paired difference holds
zero) counts as equally good, and the cheapest of those wins. The front respects noise: a
configuration is dominated only when another is better beyond the intervals on every criterion
(exact ones, such as trainable parameters, need only be no worse). Every reason cites the measured
numbers. When nothing is feasible, it says which limit to relax, and by how much.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..core.methods import Method
from ..style import readable
from . import stats
from .summary import accuracy_difference, summarize

# constraint -> (results column, "max" or "min", how to print a value)
LIMITS = {
    "max_trainable_fraction": ("trainable_fraction", "max", lambda v: f"{100 * v:.3g}% trainable"),
    "max_sec_per_step": ("sec_per_step", "max", lambda v: f"{v:.3g} s/step"),
    "max_peak_mem_mib": ("peak_mem_mib", "max", lambda v: f"{v:,.0f} MiB peak"),
    "max_adapter_bytes": ("adapter_bytes", "max", lambda v: _bytes(v)),
    "min_accuracy": ("accuracy", "min", lambda v: f"{100 * v:.1f}% accuracy"),
}
SETUP_COLUMNS = ("base", "domain", "n_train", "epochs")


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Constraints:
    """Limits on measured results; None leaves a criterion free."""

    max_trainable_fraction: float | None = None  # of all parameters, in (0, 1]
    max_sec_per_step: float | None = None
    max_peak_mem_mib: float | None = None
    max_adapter_bytes: float | None = None
    min_accuracy: float | None = None            # in [0, 1]

    def __post_init__(self):
        bad = []
        for name in LIMITS:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad.append(f"{name}={v!r} must be a finite number >= 0 or None")
            elif name == "max_trainable_fraction" and v > 1:
                bad.append(f"max_trainable_fraction={v!r} is a fraction in [0, 1] (0.01 means 1%)")
            elif name == "min_accuracy" and v > 1:
                bad.append(f"min_accuracy={v!r} is a fraction in [0, 1] (0.8 means 80%)")
        if bad:
            raise ValueError("invalid constraints: " + "; ".join(bad) + ".")

    def active(self) -> dict:
        return {k: getattr(self, k) for k in LIMITS if getattr(self, k) is not None}


@dataclass
class Evidence:
    """What `recommend` found. `chosen` is None when no row meets every constraint."""

    constraints: Constraints
    table: pd.DataFrame            # every row, with `feasible` and `violates`
    front: pd.DataFrame            # the feasible rows no other feasible row beats on every criterion
    chosen: pd.Series | None
    reasons: list[str]
    relax: pd.DataFrame = field(default_factory=pd.DataFrame)  # what to loosen when nothing fits

    @property
    def label(self) -> str | None:
        return None if self.chosen is None else self.chosen["label"]

    @property
    def method(self) -> Method | None:
        if self.chosen is None or not isinstance(self.chosen.get("spec"), dict):
            return None
        return Method.from_dict(self.chosen["spec"]["method"])

    @property
    def name(self) -> str | None:
        """The chosen run as people read it ("LoRA r=8"; `label` is the key, "lora r=8")."""
        return None if self.chosen is None else name_of(self.chosen["label"])

    def text(self) -> str:
        head = f"Recommended: {self.name}." if self.chosen is not None else "Nothing meets every constraint."
        return "\n".join([head, *[f"- {r}" for r in self.reasons]])

    def __str__(self) -> str:
        return self.text()


def prepare(results: pd.DataFrame, needed: set[str]) -> pd.DataFrame:
    """`results` checked (one set-up, the `needed` columns) with unique labels: what recommend reads."""
    if not isinstance(results, pd.DataFrame) or results.empty:
        raise ValueError("recommend needs a non-empty DataFrame of results from compare() or results_frame().")
    df = results.copy()
    if "trainable_fraction" not in df:
        if "trainable_pct" in df:
            df["trainable_fraction"] = df["trainable_pct"] / 100
        elif {"trainable", "total"} <= set(df):
            df["trainable_fraction"] = df["trainable"] / df["total"]
    missing = sorted(c for c in needed | {"label", "accuracy"} if c not in df)
    if missing:
        raise ValueError(f"the results lack column(s) {missing}, which these constraints need; pass "
                         "compare()'s DataFrame, or drop the constraint.")
    groups = [c for c in SETUP_COLUMNS if c in df]
    if groups and len(df.groupby(groups, dropna=False)) > 1:
        sets = df.groupby(groups, dropna=False).size().reset_index(name="rows").to_dict("records")
        raise ValueError(f"the results mix {len(sets)} set-ups ({', '.join(groups)}): {sets}. Rows trained "
                         "on different data or budgets are not comparable; keep one, e.g. "
                         "results[(results.base == 'minilm') & (results.n_train == 8454)].")
    if df["label"].duplicated().any() and "lr" in df:
        dup = df["label"].duplicated(keep=False)
        df.loc[dup, "label"] = [f"{lab} (lr {lr:g})" for lab, lr in zip(df.loc[dup, "label"], df.loc[dup, "lr"])]
    if df["label"].duplicated().any():  # the same set-up run twice: number the repeats
        df["label"] = df["label"] + df.groupby("label").cumcount().map(lambda k: f" #{k + 1}" if k else "")
    return df.reset_index(drop=True)


def _violations(row, limits: dict) -> list[str]:
    out = []
    for name, limit in limits.items():
        col, sense, _ = LIMITS[name]
        v = row[col]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(name)  # not measured: cannot be shown to meet the limit
        elif (sense == "max" and v > limit) or (sense == "min" and v < limit):
            out.append(name)
    return out


def pareto(df: pd.DataFrame, criteria: dict[str, str]) -> pd.DataFrame:
    """Rows that no other row beats: criteria maps a column to "max" or "min".

    Without interval columns, the classic front: dominated = matched or beaten on every criterion
    and beaten on one. Where `<column>_lo` and `<column>_hi` give a criterion's interval, a row is
    dominated only by one better beyond the intervals there (its interval entirely on the better
    side), and no worse on every exact criterion: noise alone never takes a row off the front.
    """
    def signed(col, sense):
        v = df[col].to_numpy(float)
        lo = df[f"{col}_lo"].to_numpy(float) if f"{col}_lo" in df else v
        hi = df[f"{col}_hi"].to_numpy(float) if f"{col}_hi" in df else v
        lo, hi = np.where(np.isnan(lo), v, lo), np.where(np.isnan(hi), v, hi)
        return (v, lo, hi) if sense == "max" else (-v, -hi, -lo)
    axes = [signed(c, s) for c, s in criteria.items()]
    noisy = any(f"{c}_lo" in df and f"{c}_hi" in df for c in criteria)
    keep = []
    for i in range(len(df)):
        dominated = False
        for j in range(len(df)):
            if j == i:
                continue
            if noisy:  # j's worst beats i's best on every axis with an interval; exact axes: no worse
                better = [(lo[j] > hi[i]) if (lo[i] != hi[i] or lo[j] != hi[j]) else (v[j] >= v[i]) for v, lo, hi in axes]
                strict = any(lo[j] > hi[i] for v, lo, hi in axes)
                dominated = all(better) and strict
            else:
                a, b = np.array([v[i] for v, _, _ in axes]), np.array([v[j] for v, _, _ in axes])
                dominated = bool((b >= a).all() and (b > a).any())
            if dominated:
                break
        keep.append(not dominated)
    return df[keep]


def accuracy_se(row) -> float:
    """One standard error of a test accuracy, sqrt(p(1 - p)/n), n read from the confusion matrix
    (or `n_test`)."""
    conf = row.get("confusion") if hasattr(row, "get") else None
    n = sum(map(sum, conf)) if isinstance(conf, (list, tuple)) else row.get("n_test", 0)
    p = row["accuracy"]
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def _fmt(row, name: str) -> str:
    col, _, fmt = LIMITS[name]
    return fmt(row[col])


def with_intervals(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(one row per configuration with interval columns, the runs behind it or None): compare()'s
    rows go through `summarize`; a frame that already has `accuracy_lo`/`accuracy_hi` is kept."""
    if not isinstance(results, pd.DataFrame) or results.empty or {"accuracy_lo", "accuracy_hi"} <= set(results):
        return results, None
    if "label" not in results or "accuracy" not in results:
        return results, None
    return summarize(results, reference=None), results


def recommend(results: pd.DataFrame, constraints: Constraints | dict | None = None,
              tolerance: float | str = "interval", prefer: str = "trainable_fraction", **limits) -> Evidence:
    """The method the measurements support under the constraints.

    `results`: compare()'s rows (several seeds of a configuration are summarised into one row with
    intervals) or `summarize()`'s table. Among the feasible configurations, the most accurate on
    the (noise-aware) Pareto front is the reference; any whose accuracy cannot be told from it
    counts as equally good, and of those the one lowest in `prefer` (a cost column:
    trainable_fraction, sec_per_step, peak_mem_mib or adapter_bytes) is chosen. tolerance:
    "interval" (the 95% interval of the paired difference holds zero), "se" (within one standard
    error of the best's test accuracy) or a number (in accuracy, e.g. 0.01).
    Limits may be given as a Constraints, a dict, or keywords: recommend(df, max_sec_per_step=0.6).
    """
    if isinstance(constraints, dict):
        limits = {**constraints, **limits}
        constraints = None
    if constraints is None:
        unknown = sorted(set(limits) - set(LIMITS))
        if unknown:
            raise ValueError(f"unknown constraint(s) {unknown}; the constraints are {list(LIMITS)}.")
        constraints = Constraints(**limits)
    elif limits:
        raise ValueError("give the limits either as a Constraints or as keywords, not both.")
    costs = ("trainable_fraction", "sec_per_step", "peak_mem_mib", "adapter_bytes")
    if prefer not in costs:
        raise ValueError(f"prefer={prefer!r} is not a cost column; choose one of {list(costs)}.")
    active = constraints.active()
    summary, runs = with_intervals(results)
    df = prepare(summary, {LIMITS[k][0] for k in active} | {prefer})
    df["violates"] = [_violations(row, active) for _, row in df.iterrows()]
    df["feasible"] = df["violates"].str.len() == 0
    feasible = df[df.feasible]
    criteria = {"accuracy": "max", **{c: "min" for c in costs if c in df and feasible[c].notna().all()}}

    if feasible.empty:
        relax = _relaxations(df, active)
        if not relax.empty:
            relax["says"] = [_says(r) for r in relax.to_dict("records")]
        return Evidence(constraints, df, feasible, None, _relax_reasons(relax, len(df)), relax)

    front = pareto(feasible, criteria)
    best = front.loc[front.accuracy.idxmax()]
    diffs = {}
    if tolerance == "interval":
        diffs = {i: _difference(row, best, runs) for i, row in front.iterrows()}
        close = front[[stats.direction(lo, hi) != stats.LOWER if lo == lo and hi == hi else d >= -1e-12
                       for d, lo, hi in (diffs[i] for i in front.index)]]
    else:
        tol = accuracy_se(best) if tolerance == "se" else float(tolerance)
        close = front[front.accuracy >= best.accuracy - tol - 1e-12]
    chosen = close.loc[close[prefer].idxmin()]
    limits = ", ".join(f"{'at most' if LIMITS[k][1] == 'max' else 'at least'} {LIMITS[k][2](v)}"
                       + (" adapter" if k == "max_adapter_bytes" else "") for k, v in active.items())
    reasons = [f"{len(feasible)} of {len(df)} runs meet the limits" + (f" ({limits})" if active else " (none set)")
               + f"; {len(front)} of those are on the Pareto front."]
    if chosen["label"] == best["label"]:
        reasons.append(f"{name_of(chosen['label'])} has the highest accuracy that meets them: "
                       f"{100 * chosen.accuracy:.1f}%.")
    elif tolerance == "interval":
        d, lo, hi = diffs[chosen.name]
        reasons.append(f"{name_of(best['label'])} is the most accurate at {100 * best.accuracy:.1f}%, but "
                       f"{name_of(chosen['label'])} reaches {100 * chosen.accuracy:.1f}%: the difference, "
                       f"{100 * d:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}] (95%), reaches zero: "
                       f"{stats.CANNOT_TELL}, at {_cost(chosen, prefer)} against {_cost(best, prefer)}.")
    else:
        reasons.append(f"{name_of(best['label'])} is the most accurate at {100 * best.accuracy:.1f}%, but "
                       f"{name_of(chosen['label'])} reaches {100 * chosen.accuracy:.1f}%, within "
                       f"{100 * tol:.1f} points (one standard error of the test accuracy"
                       f"{'' if tolerance == 'se' else ': the tolerance given'}), at "
                       f"{_cost(chosen, prefer)} against {_cost(best, prefer)}.")
    others = [c for c in costs if c != prefer and c in df and pd.notna(chosen.get(c))]
    reasons.append(f"{name_of(chosen['label'])} costs " + ", ".join(_cost(chosen, c) for c in [prefer, *others]) + ".")
    excluded = df[~df.feasible & (df.accuracy > chosen.accuracy)]
    for _, row in excluded.iterrows():
        why = "; ".join(f"{_fmt(row, k)} against the limit {LIMITS[k][2](active[k])}" for k in row["violates"])
        reasons.append(f"{name_of(row['label'])} is more accurate ({100 * row.accuracy:.1f}%) but is excluded: {why}.")
    return Evidence(constraints, df, front, chosen, reasons)


def _difference(row, best, runs) -> tuple[float, float, float]:
    """(accuracy(row) - accuracy(best), lo, hi): paired through the runs when they are known,
    else from the two intervals as if independent."""
    if row.name == best.name:
        return 0.0, 0.0, 0.0
    if runs is not None and "config" in runs and isinstance(row.get("config"), str):
        iv, _ = accuracy_difference(runs[runs.config == row["config"]], runs[runs.config == best["config"]])
        if iv is not None and iv.lo == iv.lo:
            return iv.estimate, iv.lo, iv.hi
    d = row.accuracy - best.accuracy
    half = [(r["accuracy_hi"] - r["accuracy_lo"]) / 2 if {"accuracy_lo", "accuracy_hi"} <= set(r.index) else math.nan
            for r in (row, best)]
    if any(math.isnan(h) for h in half):
        return d, math.nan, math.nan
    w = math.hypot(*half)
    return d, d - w, d + w


def _cost(row, col: str) -> str:
    return {"trainable_fraction": lambda v: f"{100 * v:.3g}% trainable", "sec_per_step": lambda v: f"{v:.3g} s/step",
            "peak_mem_mib": lambda v: f"{v:,.0f} MiB peak", "adapter_bytes": _bytes}[col](row[col])


def _relaxations(df: pd.DataFrame, active: dict) -> pd.DataFrame:
    """What to loosen. Each row is one limit's smallest change that admits a run when only that
    limit moves (any one of them is enough). When no single change is enough: for each of the (up to
    three) runs needing the fewest and smallest changes, those changes, all together (column `together`;
    `option` numbers the runs). `change` is relative to the limit ((needed - limit) / limit); `says`,
    added by `recommend`, is its size as the reasons word it (points of accuracy, a factor, a percentage)."""
    rows = []
    for name, limit in active.items():
        col, sense, _ = LIMITS[name]
        others = df[df.violates.map(lambda v: set(v) <= {name}) & df[col].notna()]
        if others.empty:
            continue
        pick = others.loc[others[col].idxmin() if sense == "max" else others[col].idxmax()]
        rows.append({"constraint": name, "limit": limit, "needed": pick[col], "admits": pick["label"],
                     "change": _change(limit, pick[col]), "together": False})
    if rows:
        return pd.DataFrame(rows).sort_values("change", key=lambda s: s.abs()).reset_index(drop=True)
    measured = df[[all(pd.notna(r[LIMITS[k][0]]) for k in r.violates) for _, r in df.iterrows()]]
    if measured.empty:
        return pd.DataFrame()
    # Every run needing the fewest changes is an option (up to three), the smallest changes first (summed as log
    # ratios): which to take trades one limit against another, and only the reader knows which matters more.
    score = [(len(r.violates), sum(abs(math.log(max(r[LIMITS[k][0]], 1e-12) / max(active[k], 1e-12)))
                                   for k in r.violates)) for _, r in measured.iterrows()]
    order = sorted(range(len(score)), key=score.__getitem__)
    options = [i for i in order if score[i][0] == score[order[0]][0]][:3]
    return pd.DataFrame([{"option": n + 1, "constraint": name, "limit": active[name],
                          "needed": measured.iloc[i][LIMITS[name][0]], "admits": measured.iloc[i]["label"],
                          "change": _change(active[name], measured.iloc[i][LIMITS[name][0]]), "together": True}
                         for n, i in enumerate(options) for name in measured.iloc[i].violates])


def _change(limit: float, needed: float) -> float:
    return (needed - limit) / limit if limit else math.inf


_SUFFIX = re.compile(r"^(.*?)((?: \(lr [^)]*\))?(?: #\d+)?)$")


def name_of(label: str) -> str:
    """A result row's label as people read it (`style.readable`), keeping what `prepare` added to tell rows apart:
    "lora r=8 (lr 0.005)" -> "LoRA r=8 (lr 0.005)", "adapter #2" -> "Adapter #2"."""
    base, suffix = _SUFFIX.match(str(label)).groups()
    return readable(base) + suffix


def _says(r: dict) -> str:
    """A relaxation's size as people read it: points of accuracy, a factor, or a percentage."""
    if r["constraint"] == "min_accuracy":
        return f"{100 * (r['needed'] - r['limit']):+.1f} points"
    if not math.isfinite(r["change"]):
        return ""
    return f"{r['needed'] / r['limit']:.3g}x" if r["change"] >= 1 else f"{100 * r['change']:+.0f}%"


def _relax_reasons(relax: pd.DataFrame, n: int) -> list[str]:
    if relax.empty:
        return [f"None of the {n} runs meets every constraint, and none has the measurements to say "
                "how far to relax them."]
    together = bool(relax["together"].iloc[0])

    def step(r):
        fmt = LIMITS[r["constraint"]][2]
        size = f" ({r['says']})" if r["says"] else ""
        return f"{r['constraint']} from {fmt(r['limit'])} to {fmt(r['needed'])}{size}"

    if not together:
        return ([f"None of the {n} runs meets every constraint. Any one of these changes admits a run:"]
                + [f"Relax {step(r)} to admit {name_of(r['admits'])}." for r in relax.to_dict("records")])
    options = list(relax.groupby("option", sort=True))
    lines = [f"None of the {n} runs meets every constraint, and no single limit is enough: each run needs "
             f"{len(options[0][1])} changes. " + ("The run needing the smallest ones:" if len(options) == 1 else
                                                  f"The {len(options)} runs needing the smallest ones, a choice "
                                                  "between the limits:")]
    for _, g in options:
        lines.append(f"To admit {name_of(g['admits'].iloc[0])}, relax " + " and ".join(step(r) for r in g.to_dict("records")) + ".")
    return lines
