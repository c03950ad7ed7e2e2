"""Learned merge weights and the evaluation of merges across the four domains.

`learn_merge_weights` is LoraHub's recipe (Huang et al., "LoraHub: Efficient Cross-Task
Generalization via Dynamic LoRA Composition", COLM 2024): a gradient-free search over the mixing
weights w of a merge, scored by the cross-entropy on a handful of labelled examples of the
target domain plus an L1 penalty l1 * sum|w_i| (LoraHub's regulariser, 0.05 there), within
bounds (LoraHub: [-1.5, 1.5]; here [0, 1.5] by default, since the heads are averaged with the
weights normalised and sentiment adapters never help by being subtracted). Optuna runs the
search: TPE by default, CMA-ES (`sampler="cmaes"`) where the `cmaes` package is installed. The
first trial is the plain mean, so the weights found are never worse than it on the examples
(on new test items they can be: with 5 to 50 examples the search can overfit, which notebook 10
measures on the held-out test split).

`evaluate_adapters` scores adapters (folders or in-memory merges) on each domain's test split,
the same items `experiments.run` tests on, with per-item records so that two adapters can be
compared item by item (`stats.paired_difference`).
"""

from __future__ import annotations

import copy
import math

import optuna
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import data
from ..bases.models import load_base
from ..data.loaders import make_loaders
from ..files.adapter_file import adapter_state, load_adapter
from ..training.metrics import evaluate
from .merging import MergeInputError, as_merge_input, check_compatible, merge_adapters

SAMPLERS = ("tpe", "cmaes")


def examples_frame(examples, what: str = "examples", low: int = 5, high: int = 512) -> pd.DataFrame:
    """Labelled examples as a DataFrame with text and label: from a DataFrame or (text, label) pairs."""
    if isinstance(examples, pd.DataFrame):
        if not {"text", "label"} <= set(examples.columns):
            raise MergeInputError(f"{what} must have columns text and label; got {list(examples.columns)}.")
        df = examples[["text", "label"]].reset_index(drop=True)
    else:
        try:
            df = pd.DataFrame([(t, y) for t, y in examples], columns=["text", "label"])
        except (TypeError, ValueError):
            raise MergeInputError(f"{what} must be a DataFrame with text and label, or (text, label) pairs.") from None
    if not low <= len(df) <= high:
        raise MergeInputError(f"{len(df)} {what}: give {low} to {high} labelled examples of the target domain "
                              "(LoraHub's setting is 5 to 50).")
    if not all(isinstance(t, str) and t.strip() for t in df.text):
        raise MergeInputError(f"every text of the {what} must be a non-empty string.")
    labels = pd.to_numeric(df.label, errors="coerce")
    if isinstance(df.label.iloc[0], bool) or not labels.isin([0, 1]).all():
        bad = sorted({repr(y) for y, ok in zip(df.label, labels.isin([0, 1])) if not ok})[:5]
        raise MergeInputError(f"the labels of the {what} must be 0 (negative) or 1 (positive); got {', '.join(bad)}.")
    return df.assign(label=labels.astype(int))


def _sampler(name: str, seed: int, budget: int = 40):
    if name == "tpe":
        # TPE draws its first n_startup_trials at random (Optuna's default: 10). With a small budget every trial was
        # such a draw, the same seeded draws whatever the examples, so the weights "learned" for nyt and for tweets
        # came out identical. A quarter of the budget at random (at least the plain mean, enqueued), the rest by TPE.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, budget // 4)))
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401  (Optuna's CmaEsSampler needs it)
        except ImportError:
            raise MergeInputError("sampler='cmaes' needs the cmaes package (pip install cmaes); or use sampler='tpe'.") from None
        return optuna.samplers.CmaEsSampler(seed=seed)
    raise MergeInputError(f"sampler={name!r}: choose one of {list(SAMPLERS)}.")


def learn_merge_weights(adapters, examples, budget: int = 40, *, base: str = "minilm", how: str = "task_arithmetic",
                        sampler: str = "tpe", bounds=(0.0, 1.5), l1: float = 0.05, seed: int = 0,
                        max_length: int = 128, progress: bool = True):
    """(weights, study): mixing weights for `merge_adapters(adapters, how, weights)` searched by
    Optuna on 5 to 50 labelled `examples` of the target domain (LoraHub). `budget` trials; the
    study's trials carry each weight vector, its loss and its accuracy on the examples."""
    items = [as_merge_input(a) for a in adapters]
    check_compatible(items)
    df = examples_frame(examples)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise MergeInputError(f"budget={budget!r} must be a positive number of trials.")
    lo, hi = bounds
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi and hi > 0):
        raise MergeInputError(f"bounds={bounds!r} must be (low, high) with low < high and high > 0.")
    if not (isinstance(l1, (int, float)) and l1 >= 0):
        raise MergeInputError(f"l1={l1!r} must be a non-negative number.")
    smp = _sampler(sampler, seed, budget)
    n = len(items)
    mean = [1.0 / n] * n
    model, tok = load_base(base, num_labels=2, seed=0)
    load_adapter(model, merge_adapters(items, how=how, weights=mean, seed=seed))
    live = adapter_state(model)
    loader = make_loaders(tok, {"test": df}, batch_size=len(df), max_length=max_length)["test"]

    def objective(trial):
        w = [trial.suggest_float(f"w{i}", lo, hi) for i in range(n)]
        if not sum(w) > 0:
            return math.inf  # the heads' weighted mean needs a positive total
        merged = merge_adapters(items, how=how, weights=w, seed=seed)
        with torch.no_grad():
            for k, v in live.items():
                v.copy_(merged.tensors[k])
        m = evaluate(model, loader, num_labels=2)
        trial.set_user_attr("accuracy", m["accuracy"])
        trial.set_user_attr("loss", m["loss"])
        return m["loss"] + l1 * sum(abs(x) for x in w)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=smp)
    study.enqueue_trial({f"w{i}": min(max(x, lo), hi) for i, x in enumerate(mean)})
    bar = tqdm(total=budget, desc="merge weights", disable=not progress)
    study.optimize(objective, n_trials=budget, callbacks=[lambda s, t: bar.update(1)])
    bar.close()
    best = study.best_trial
    return [best.params[f"w{i}"] for i in range(n)], study


def domain_test_items(domain: str, n_eval: int | None = None, split_seed: int = 0) -> pd.DataFrame:
    """The test items `experiments.run` scores a run on for `domain`."""
    return data.sample_rows(data.split(data.load_corpus(domain), seed=split_seed)["test"], n_eval, split_seed)


def evaluate_adapters(adapters: dict, base: str = "minilm", domains=None, n_eval: int | None = None,
                      split_seed: int = 0, batch_size: int = 64, max_length: int = 128,
                      progress: bool = True) -> pd.DataFrame:
    """One row per adapter and domain: accuracy, f1_macro, n and per-item `correct` ('1'/'0'),
    on each domain's test split. adapters: {name: folder or AdapterFile}; the base is loaded once."""
    domains = list(domains or data.FILES)
    for d in domains:
        if d not in data.FILES:
            raise MergeInputError(f"unknown domain {d!r}; choose from {list(data.FILES)}.")
    fresh, tok = load_base(base, num_labels=2, seed=0)
    loaders = {d: make_loaders(tok, {"test": domain_test_items(d, n_eval, split_seed)}, batch_size=batch_size,
                               max_length=max_length)["test"] for d in domains}
    rows = []
    bar = tqdm(total=len(adapters) * len(domains), desc="evaluate", disable=not progress)
    for name, adapter in adapters.items():
        model = load_adapter(copy.deepcopy(fresh), adapter).eval()
        for d in domains:
            m = evaluate(model, loaders[d], num_labels=2, per_item=True)
            rows.append({"adapter": name, "domain": d, "accuracy": m["accuracy"], "f1_macro": m["f1_macro"],
                         "n": m["n"], "correct": m["correct"]})
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows)
