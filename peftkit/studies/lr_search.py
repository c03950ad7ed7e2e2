"""Learning rates chosen fairly: each family's rate picked on the validation split, with seeds.

A ranking of methods at one learning rate for all, or at each one's usual rate, measures the
recipe as much as the methods (Lee et al. 2026, arXiv 2602.04998: once each LoRA variant's rate is
tuned, nine variants land within 1-2 points of plain LoRA). `lr_search` trains the first method
of each family in `methods` at every rate of its registry grid (`Method.lr_choices()`), once per
seed, and keeps the rate with the best mean validation accuracy. Every run is an ordinary cached
compare() row, so a search asked again reads its choice back from the cache. Test accuracy plays no
part in the choice; `rate_ranking` is the one view that shows it at the default rates, beside the
chosen ones, to say whether tuning changed the ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.methods import METHODS
from . import stats
from .experiments import as_seeds, compare
from .summary import accuracy_interval


@dataclass
class LRSearch:
    """What `lr_search` found: `rates` (family -> chosen rate), `table` (validation accuracy per
    family and rate, with its interval; no test accuracy) and `runs` (the search's result rows)."""

    rates: dict
    table: pd.DataFrame
    runs: pd.DataFrame

    def chosen(self) -> pd.DataFrame:
        return self.table[self.table.chosen].reset_index(drop=True)


def lr_search(methods, seeds=(0,), grid: dict | None = None, **compare_kw) -> LRSearch:
    """Choose each family's learning rate on validation. methods: the first of each family
    (`method.name`) is trained at every rate of `grid[family]` (default: its registry grid) for
    every seed; compare_kw go to `compare` (base, domain, n_train, cfg, n_eval, cache, ...)."""
    seeds = as_seeds(seeds)
    cfg = compare_kw.get("cfg")
    if cfg is not None and not getattr(cfg, "validate", True):
        raise ValueError("lr='val' chooses each rate on validation accuracy, but cfg has validate=False, so no run "
                         "would evaluate on the validation split. Drop validate=False, or give fixed rates (lr=...).")
    reps = {}
    for m in methods:
        reps.setdefault(m.name, m)
    frames, rows = [], []
    for family, rep in reps.items():
        rates = tuple(grid[family]) if grid and family in grid else type(rep).lr_choices()
        for rate in rates:
            df = compare([rep], lr=float(rate), seeds=seeds, **compare_kw)
            frames.append(df)
            vals = df["val_accuracy"].astype(float)
            if vals.isna().any():
                raise ValueError(f"{rep.describe()} at lr {rate:g} has no validation accuracy; lr_search needs "
                                 "runs that evaluate on the validation split.")
            n = int(df["n_val"].iloc[0]) if "n_val" in df and df["n_val"].notna().all() else None
            p = float(vals.mean())
            iv = stats.mean_interval(vals, item_var=p * (1 - p) if n else None, n_items=n, what="validation items")
            rows.append({"family": family, "label": rep.describe(), "lr": float(rate), "seeds": ",".join(map(str, seeds)),
                         "val_accuracy": iv.estimate, "val_lo": iv.lo, "val_hi": iv.hi, "interval": iv.method,
                         "default": bool(np.isclose(rate, type(rep).default_lr))})
    table = pd.DataFrame(rows)
    best = table.groupby("family", sort=False)["val_accuracy"].idxmax()
    table["chosen"] = table.index.isin(best.to_numpy())
    rates = {f: float(table.loc[i, "lr"]) for f, i in best.items()}
    return LRSearch(rates, table, pd.concat(frames, ignore_index=True))


def rate_ranking(search: LRSearch, results: pd.DataFrame) -> pd.DataFrame:
    """Each searched method's test accuracy (with its interval) and rank at its registry default
    rate (from the search's runs) beside those at its chosen rate (from `results`, e.g. compare's
    rows at the chosen rates, with all their seeds). Rank 1 is the most accurate."""
    out = []
    for family, rate in search.rates.items():
        label = search.table.loc[search.table.family == family, "label"].iloc[0]
        runs = search.runs[(search.runs.label == label) & (search.runs.method == family)]
        default = METHODS[family].default_lr
        at_default = runs[np.isclose(runs.lr.astype(float), default)]
        mine = results[(results.label == label) & np.isclose(results.lr.astype(float), rate)]
        row = {"family": family, "label": label, "default lr": default, "chosen lr": rate}
        for what, rows in (("default", at_default), ("chosen", mine)):
            if rows.empty:
                row.update({f"accuracy at {what}": np.nan, f"lo at {what}": np.nan, f"hi at {what}": np.nan,
                            f"seeds at {what}": 0})
                continue
            iv = accuracy_interval(rows)
            row.update({f"accuracy at {what}": iv.estimate, f"lo at {what}": iv.lo, f"hi at {what}": iv.hi,
                        f"seeds at {what}": iv.n_seeds})
        out.append(row)
    view = pd.DataFrame(out)
    for what in ("default", "chosen"):
        view[f"rank at {what}"] = view[f"accuracy at {what}"].rank(ascending=False, method="min")
    view["rank changed"] = view["rank at default"] != view["rank at chosen"]
    return view


def ranking_text(view: pd.DataFrame) -> str:
    """One computed sentence on `rate_ranking`'s view: is the order the same at both rates?"""
    def order(what):
        d = view.dropna(subset=[f"accuracy at {what}"]).sort_values(f"accuracy at {what}", ascending=False)
        acc = d[f"accuracy at {what}"].tolist()
        names = [f"{r['label']} ({100 * r[f'accuracy at {what}']:.1f}%)" for r in d.to_dict("records")]
        text = names[0] if names else ""
        for prev, cur, name in zip(acc, acc[1:], names[1:]):
            text += (" = " if abs(prev - cur) < 1e-12 else " > ") + name
        return text, view.set_index("label")[f"rank at {what}"].to_dict()
    (a, ra), (b, rb) = order("default"), order("chosen")
    same = ra == rb
    head = ("The order by test accuracy is the same at the default and at the chosen rates" if same else
            "Tuning the rate changes the order by test accuracy")
    d = view.dropna(subset=["accuracy at chosen"]).sort_values("accuracy at chosen", ascending=False).to_dict("records")
    ties = [f"{x['label']} and {y['label']}" for x, y in zip(d, d[1:]) if x["lo at chosen"] <= y["hi at chosen"]]
    tail = (f" At the chosen rates the intervals of {'; of '.join(ties)} overlap: their order there "
            f"is not settled at this precision." if ties else "")
    return f"{head}: at the default rates {a}; at the chosen rates {b}.{tail}"
