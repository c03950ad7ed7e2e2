"""`summarize`: compare()'s rows (one per run and seed) as one row per configuration, with intervals.

For each configuration: the mean test accuracy over seeds with its 95% interval (over seeds and
test items: `stats.mean_interval`, which says how it was computed), the paired difference to a
reference method (same seeds, same test items; McNemar's exact test for a single pair of runs)
and its verdict word, and the median step time, peak memory and file size with their intervals.
`format_summary` prints it; `paired_ratio` and `accuracy_difference` serve the claims table.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..style import readable
from . import stats
from .experiments import results_frame

SETUP = ("base", "domain", "n_train", "epochs", "split_seed")  # a reference must share these
COSTS = ("sec_per_step", "peak_mem_mib", "train_seconds")        # measured: vary from run to run
EXACT = ("trainable", "total", "trainable_pct", "trainable_fraction", "adapter_bytes")  # the same at every seed


def _frame(results) -> pd.DataFrame:
    df = results if isinstance(results, pd.DataFrame) else pd.DataFrame(list(results))
    if df.empty:
        raise ValueError("summarize needs the rows of compare() (a non-empty DataFrame).")
    if "spec" in df and not {"seed", "config"} <= set(df):
        df = results_frame(df.to_dict("records"))
    df = df.copy()
    df["seed"] = df["seed"].fillna(0) if "seed" in df else 0
    fallback = df["label"].astype(str) + (df["lr"].map(lambda v: f" lr={v:g}") if "lr" in df else "")
    df["config"] = df["config"].fillna(fallback) if "config" in df else fallback  # rows without a spec
    return df


def _runs(rows: pd.DataFrame) -> pd.DataFrame:
    """One run per seed (the last one cached wins), in seed order."""
    return rows.drop_duplicates("seed", keep="last").sort_values("seed")


def _items(rows: pd.DataFrame, domain: str | None = None):
    """The S x N matrix of per-item correctness on the training domain's test split, or None when
    a run has no per-item record or the runs were tested on different items."""
    if "correct" not in rows:
        return None
    cells = []
    for r in rows.to_dict("records"):
        c = r.get("correct")
        d = domain or r.get("domain")
        if not isinstance(c, dict) or not isinstance(c.get(d), str):
            return None
        cells.append(c[d])
    if len({len(c) for c in cells}) != 1 or ("test_items" in rows and domain is None
                                            and rows["test_items"].astype(str).nunique() > 1):
        return None
    return np.stack([stats.correct_array(c) for c in cells])


def _n_test(rows: pd.DataFrame) -> int | None:
    if "n_test" in rows and rows["n_test"].notna().all():
        return int(rows["n_test"].iloc[0])
    conf = rows["confusion"].iloc[0] if "confusion" in rows else None
    return int(sum(map(sum, conf))) if isinstance(conf, (list, tuple)) else None


def accuracy_interval(rows: pd.DataFrame, level: float = stats.LEVEL, col: str = "accuracy",
                      domain: str | None = None) -> stats.Interval:
    """The interval of the mean of `col` over the runs (one per seed) of one configuration."""
    rows = _runs(rows)
    values = rows[col].astype(float).to_numpy()
    items = _items(rows, domain)
    if items is not None:
        return stats.mean_interval(values, items, level=level).within(0.0, 1.0)
    n, p = _n_test(rows) if domain is None else None, float(np.mean(values))
    return stats.mean_interval(values, item_var=p * (1 - p) if n else None, n_items=n, level=level).within(0.0, 1.0)


def accuracy_difference(rows: pd.DataFrame, ref: pd.DataFrame, level: float = stats.LEVEL):
    """(interval of accuracy(rows) - accuracy(ref), McNemar p) over their common seeds, paired
    by seed and, when both recorded them on the same test items, item by item."""
    a, r = _runs(rows), _runs(ref)
    common = sorted(set(a.seed) & set(r.seed))
    if not common:
        return None, math.nan
    a, r = a[a.seed.isin(common)], r[r.seed.isin(common)]
    ia, ir = _items(a), _items(r)
    same = (ia is not None and ir is not None and ia.shape == ir.shape
            and ("test_items" not in a or set(a.test_items.astype(str)) == set(r.test_items.astype(str))))
    va, vr = a.accuracy.astype(float).to_numpy(), r.accuracy.astype(float).to_numpy()
    if same:
        iv, p = stats.paired_difference(va, vr, ia, ir, level=level)
    else:
        n, pa, pr = _n_test(a), float(va.mean()), float(vr.mean())
        iv, p = stats.paired_difference(va, vr, a_var=pa * (1 - pa) if n else None,
                                        b_var=pr * (1 - pr) if n else None, n_items=n, level=level)
    return iv.within(-1.0, 1.0), p


def paired_ratio(rows: pd.DataFrame, ref: pd.DataFrame, col: str, level: float = stats.LEVEL):
    """The ratio col(rows) / col(ref) over their common seeds: a geometric mean with its interval."""
    a, r = _runs(rows), _runs(ref)
    common = sorted(set(a.seed) & set(r.seed))
    if not common:
        return None
    a, r = a.set_index("seed").loc[common], r.set_index("seed").loc[common]
    return stats.ratio_interval(a[col].astype(float), r[col].astype(float), level)


def _setup(row) -> tuple:
    return tuple(str(row.get(c)) for c in SETUP)


def find_reference(df: pd.DataFrame, reference: str, setup: tuple) -> pd.DataFrame | None:
    """The runs of the reference configuration (a method name or a label) in one set-up."""
    mine = df[[_setup(r) == setup for r in df.to_dict("records")]]
    hit = mine[(mine.get("method") == reference) | (mine.label == reference)]
    if hit.empty:
        return None
    if hit.config.nunique() > 1:
        raise ValueError(f"reference={reference!r} matches {hit.config.nunique()} configurations "
                         f"({', '.join(sorted(set(hit.label + ' lr ' + hit.lr.map('{:g}'.format))))}); "
                         "pass a label, or keep one of them.")
    return hit


def summarize(results, by: str | list | None = None, reference: str | None = "full",
              level: float = stats.LEVEL) -> pd.DataFrame:
    """One row per configuration (`by`, default: the configuration without its seed) of compare()'s
    rows: mean accuracy over seeds with its interval (`interval` says how it was computed), the
    paired difference to `reference` (a method name or label; None for none) with its interval
    and verdict (`vs_reference`: "higher", "lower" or "cannot tell at this precision"), and the
    median step time, peak memory and size with theirs. Rows with no reference run leave it empty."""
    df = _frame(results)
    by = by or "config"
    out = []
    for _, rows in df.groupby(by, sort=False, dropna=False):
        runs = _runs(rows)
        first = runs.iloc[-1]
        acc = accuracy_interval(runs, level)
        row = {"label": first["label"], "method": first.get("method"), "lr": first.get("lr"),
               "seeds": ",".join(str(int(s)) for s in runs.seed), "n_seeds": len(runs),
               "accuracy": acc.estimate, "accuracy_lo": acc.lo, "accuracy_hi": acc.hi, "accuracy_sd": acc.sd,
               "interval": acc.method}
        for col in ("f1_macro", "val_accuracy"):
            if col in runs:
                row[col], row[f"{col}_sd"] = float(runs[col].mean()), float(runs[col].std(ddof=1)) if len(runs) > 1 else math.nan
        for col in EXACT:
            if col in runs:
                row[col] = first[col]
                if col == "adapter_bytes":
                    row[f"{col}_lo"] = row[f"{col}_hi"] = first[col]
        if "trainable_pct" in row and "trainable_fraction" not in row:
            row["trainable_fraction"] = row["trainable_pct"] / 100
        for col in COSTS:
            if col in runs and runs[col].notna().all():
                iv = stats.median_interval(runs[col].astype(float), level)
                row[col], row[f"{col}_lo"], row[f"{col}_hi"] = iv.estimate, iv.lo, iv.hi
                row["cost_interval"] = iv.method
        for col in (*SETUP, "config", "spec"):
            if col in runs:
                row[col] = first[col]
        row["n_test"] = _n_test(runs)
        out.append(row)
    summary = pd.DataFrame(out)
    if reference is not None:
        summary = _with_reference(summary, df, by, reference, level)
    return summary


def _with_reference(summary: pd.DataFrame, df: pd.DataFrame, by, reference: str, level: float) -> pd.DataFrame:
    cols = {"reference": None, "diff": math.nan, "diff_lo": math.nan, "diff_hi": math.nan,
            "diff_interval": "", "vs_reference": "", "mcnemar_p": math.nan}
    extra = []
    groups = dict(list(df.groupby(by, sort=False, dropna=False)))
    for key, rows in groups.items():
        ref = find_reference(df, reference, _setup(rows.iloc[0]))
        r = dict(cols)
        if ref is not None:
            r["reference"] = ref.label.iloc[0]
            if ref.config.iloc[0] == rows.config.iloc[0]:
                r.update({"diff": 0.0, "diff_lo": 0.0, "diff_hi": 0.0, "diff_interval": "the reference",
                          "vs_reference": "reference"})
            else:
                iv, p = accuracy_difference(rows, ref, level)
                if iv is not None:
                    r.update({"diff": iv.estimate, "diff_lo": iv.lo, "diff_hi": iv.hi, "diff_interval": iv.method,
                              "vs_reference": stats.direction(iv.lo, iv.hi), "mcnemar_p": p})
        extra.append(r)
    add = pd.DataFrame(extra, index=summary.index)
    at = summary.columns.get_loc("interval") + 1
    return pd.concat([summary.iloc[:, :at], add, summary.iloc[:, at:]], axis=1)


def _pct(v, lo, hi, digits=1, sign=False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    core = f.format(100 * v)
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return core
    return f"{core} [{f.format(100 * lo)}, {f.format(100 * hi)}]"


def _num(v, lo, hi, fmt="{:.3g}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi) or lo == hi:
        return fmt.format(v)
    return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def format_summary(summary: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """`summarize`'s table for reading: accuracy % and the difference in points with their 95%
    intervals in brackets, the verdict, costs as median [interval], and how each interval was made."""
    ref = next((r for r in summary.get("reference", pd.Series(dtype=object)).dropna()), None)
    rows = []
    for r in summary.to_dict("records"):
        row = {"method": readable(r["label"]), "lr": f"{r['lr']:g}" if r.get("lr") == r.get("lr") and r.get("lr") else "",
               "seed ids": r["seeds"], "accuracy % [95%]": _pct(r["accuracy"], r["accuracy_lo"], r["accuracy_hi"], digits)}
        if ref is not None:
            row[f"vs {readable(ref)} (points) [95%]"] = ("" if r.get("vs_reference") == "reference"
                                               else _pct(r.get("diff"), r.get("diff_lo"), r.get("diff_hi"), digits, sign=True))
            row["verdict"] = r.get("vs_reference", "")
            p = r.get("mcnemar_p")
            row["McNemar p"] = f"{p:.3g}" if p == p and p is not None else ""
        if "sec_per_step" in r:
            row["s/step [95%]"] = _num(r["sec_per_step"], r.get("sec_per_step_lo"), r.get("sec_per_step_hi"))
        if "peak_mem_mib" in r:
            row["peak MiB [95%]"] = _num(r["peak_mem_mib"], r.get("peak_mem_mib_lo"), r.get("peak_mem_mib_hi"), "{:,.0f}")
        if "trainable_pct" in r:
            row["trainable %"] = f"{r['trainable_pct']:.3g}"
        row["interval"] = r["interval"]
        rows.append(row)
    return pd.DataFrame(rows)


def transfer_cells(df: pd.DataFrame, level: float = stats.LEVEL) -> pd.DataFrame:
    """Cross-domain accuracy with intervals, one row per (training domain, test domain): from
    compare() rows with acc_<domain> columns (the last configuration trained on each domain)."""
    from ..data import FILES
    df = _frame(df)
    out = []
    for train in [d for d in FILES if d in set(df.domain)]:
        rows = df[df.domain == train]
        rows = rows[rows.config == rows.config.iloc[-1]]
        for test in FILES:
            if f"acc_{test}" not in rows or rows[f"acc_{test}"].isna().any():
                continue
            iv = accuracy_interval(rows, level, col=f"acc_{test}", domain=test)
            out.append({"train": train, "test": test, "accuracy": iv.estimate, "lo": iv.lo, "hi": iv.hi,
                        "seeds": iv.n_seeds, "interval": iv.method})
    return pd.DataFrame(out)
