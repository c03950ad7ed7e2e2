"""What fine-tuning forgets: accuracy gained on a target domain against accuracy lost on the others.

Biderman et al. ("LoRA Learns Less and Forgets Less", TMLR 2024) found that LoRA learns a new
domain less than a full fine-tune does and forgets the source domain less. Here, per method:

1. "before": a model that already knows the source domain. Either a saved source adapter
   (`source_adapter`, e.g. notebook 04's movies LoRA) merged into the base with its head, or, with
   none given, LoRA r=8 trained for one epoch on `source_n_train` source snippets and merged. Every
   method starts from this same plain model (no wrappers left), so their differences are the
   method's alone. (An earlier version trained the head alone on the target's few snippets: that
   left a constant predictor, and every method ended on the same constant predictor too.)
2. The method (LoRA r=8, a bottleneck adapter, the full fine-tune, the head only) trains on the
   target domain for `epochs` epochs from there (`training.fit`, at the registry's learning rate).
3. After each epoch, every domain's test items are scored (the items `experiments.run` tests).

The gain is the target's accuracy minus its accuracy before; the forgetting is the change in mean
accuracy on the three other domains (their items pooled), after minus before, so a negative value is
accuracy forgotten. Both are paired by seed and test item
(`stats.paired_difference`), so the intervals carry the spread of seeds and items.

**Spectra and intruder dimensions.** For the attention projections LoRA adapts (query and
value), the update dW is W_after - W_before (the full fine-tune's) or s B A (LoRA's). Its singular
values show how many directions a method moved (a LoRA update has at most r). Shuttleworth et al.
("LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024) found that LoRA's fine-tuned
weights hold "intruder dimensions": singular vectors among the top k of W_after whose largest
cosine similarity with every singular vector of W_before stays below a threshold, i.e. new
high-ranking directions that a full fine-tune rarely creates; they tie them to forgetting.
`intruder_dimensions` counts them (k = 10 and threshold 0.5 here; the paper sweeps both).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import data
from ..bases.models import load_base
from ..core.methods import Adapter, FullFineTune, HeadOnly, LoRA, Method
from ..core.surgery import apply, lora_layers, unload
from ..files.adapter_file import as_adapter, load_adapter
from ..data.loaders import make_loaders
from ..training.loop import TrainConfig, fit
from ..training.metrics import evaluate
from .experiments import append_cache, as_seeds, config_key, read_cache
from .stats import correct_array, direction, paired_difference
from ..storage import runs_dir

DEFAULT_METHODS = (LoRA(r=8, alpha=16), Adapter(), FullFineTune(), HeadOnly())
DEFAULT_CACHE = runs_dir() / "forgetting.jsonl"
VAL_ITEMS = 8  # fit calls on_eval after each epoch's validation, which decides nothing here: keep it tiny
TARGET_LAYERS = ("query", "value")  # the layers whose dW spectra are compared (LoRA's default targets)


def intruder_dimensions(w_before: torch.Tensor, w_after: torch.Tensor, k: int = 10, threshold: float = 0.5) -> int:
    """How many of the top-k left singular vectors of `w_after` have a cosine similarity below
    `threshold` with every left singular vector of `w_before` (Shuttleworth et al., 2024)."""
    u0 = torch.linalg.svd(w_before.float(), full_matrices=False)[0]
    u1 = torch.linalg.svd(w_after.float(), full_matrices=False)[0][:, :k]
    best = (u1.T @ u0).abs().amax(dim=1)  # (k,): each new direction's closest old one
    return int((best < threshold).sum())


def _weights(model, layers=TARGET_LAYERS) -> dict[str, torch.Tensor]:
    """{layer name: its effective weight W (+ s B A for a LoRA layer)} for the named projections."""
    loras = {id(m): m for m in lora_layers(model)}
    out = {}
    for name, m in model.named_modules():
        if name.split(".")[-1] not in layers:
            continue
        if id(m) in loras:
            out[name] = (m.base.weight + m.delta_weight()).detach().float().cpu().clone()
        elif isinstance(m, torch.nn.Linear):
            out[name] = m.weight.detach().float().cpu().clone()  # a copy: a full fine-tune trains it in place
    return out


def spectrum_row(before: dict, after: dict, top: int = 32, k: int = 10, threshold: float = 0.5) -> dict:
    """Per layer: the top singular values of dW, its effective rank at 1% of the largest, and the
    intruder dimensions of W_after against W_before."""
    layers = {}
    for name, w0 in before.items():
        s = torch.linalg.svdvals(after[name] - w0)
        layers[name] = {"sv": s[:top].tolist(), "rank_1pct": int((s > 0.01 * s[0]).sum()) if s[0] > 0 else 0,
                        "intruders": intruder_dimensions(w0, after[name], k, threshold)}
    return layers


def _head_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.classifier.state_dict().items()}


def forgetting_run(method: Method, source: str = "movies", target: str = "tweets", seed: int = 0,
                   n_train: int | None = 400, epochs: int = 2, n_eval: int | None = 200, split_seed: int = 0,
                   base: str = "minilm", batch_size: int = 32, max_length: int = 128, spectra: bool = False,
                   _before=None, source_n_train: int | None = 1000, _before_scores: list | None = None) -> dict:
    """One method, one seed: accuracy on every domain before training on `target` and after each epoch.
    _before_scores: the model before's epoch-0 scores (`before_scores`), when the caller has them already."""
    splits = {d: data.split(data.load_corpus(d), seed=split_seed) for d in data.FILES}
    model, tok = _before if _before is not None else source_model(source, seed, source_n_train, split_seed, base,
                                                                  batch_size, max_length)
    scores = list(_before_scores) if _before_scores is not None else before_scores(model, tok, n_eval, split_seed,
                                                                                    max_length)
    model = copy.deepcopy(model)
    tests = _test_loaders(tok, n_eval, split_seed, max_length)
    tgt = data.subset(splits[target], n_train, VAL_ITEMS, split_seed, target)  # val: only fit's per-epoch hook
    loaders = make_loaders(tok, tgt, batch_size=batch_size, max_length=max_length, seed=seed)
    w_before = _weights(model) if spectra else None
    apply(model, method)

    def score(epoch):
        scores.extend(_scores(model, tests, epoch))

    cfg = TrainConfig(epochs=epochs, lr=method.default_lr, batch_size=batch_size, seed=seed, progress=False)
    fit(model, loaders["train"], loaders["val"], cfg, on_eval=lambda row: score(int(row["epoch"])))  # history epochs count from 1
    row = {"method": method.name, "label": method.describe(), "spec": method.to_dict(), "seed": seed,
           "source": source, "target": target, "epochs": epochs, "lr": cfg.lr, "n_train": len(tgt["train"]),
           "scores": scores}
    if spectra and method.name in ("lora", "full"):
        row["spectra"] = spectrum_row(w_before, _weights(model))
    return row


def _test_loaders(tok, n_eval, split_seed: int, max_length: int) -> dict:
    return {d: make_loaders(tok, {"test": data.sample_rows(data.split(data.load_corpus(d), seed=split_seed)["test"],
                                                           n_eval, split_seed)},
                            batch_size=64, max_length=max_length)["test"] for d in data.FILES}


def _scores(model, tests: dict, epoch: int) -> list[dict]:
    out = []
    for d, loader in tests.items():
        m = evaluate(model, loader, num_labels=2, per_item=True)
        out.append({"epoch": epoch, "domain": d, "accuracy": m["accuracy"], "correct": m["correct"]})
    return out


def before_scores(model, tok, n_eval, split_seed: int = 0, max_length: int = 128) -> list[dict]:
    """Epoch 0: the plain model before, scored on every domain's test items. Every method starts as the identity
    on it (the test matrix checks each), so one scoring serves them all."""
    return _scores(model, _test_loaders(tok, n_eval, split_seed, max_length), 0)


def source_model(source: str, seed: int, n_train: int | None = 1000, split_seed: int = 0, base: str = "minilm",
                 batch_size: int = 32, max_length: int = 128):
    """(model, tokenizer): the base fine-tuned on `source` (LoRA r=8 and the head, one epoch at LoRA's
    registry rate, on `n_train` snippets), merged into a plain model."""
    model, tok = load_base(base, num_labels=2, seed=seed)
    lora = LoRA(r=8, alpha=16)
    apply(model, lora)
    splits = data.subset(data.split(data.load_corpus(source), seed=split_seed), n_train, 64, split_seed, source)
    loaders = make_loaders(tok, splits, batch_size=batch_size, max_length=max_length, seed=seed)
    fit(model, loaders["train"], None, TrainConfig(epochs=1, lr=lora.default_lr, batch_size=batch_size, seed=seed,
                                                   progress=False))
    return unload(model).eval(), tok


def adapter_model(adapter, base: str = "minilm"):
    """(model, tokenizer): a saved LoRA adapter (a folder or an AdapterFile) merged into its base, head
    included, as a plain model."""
    adapter = as_adapter(adapter)
    if adapter.method.name not in ("lora", "dora"):
        raise ValueError(f"source_adapter holds a {adapter.method.describe()}; the model before must be a plain "
                         "model, so give a LoRA adapter (it merges exactly), or none to train one on the source.")
    model, tok = load_base(base, num_labels=2, seed=0)
    load_adapter(model, adapter)
    return unload(model).eval(), tok


def forgetting_study(methods=DEFAULT_METHODS, source: str = "movies", target: str = "tweets", seeds=(0, 1, 2),
                     n_train: int | None = 400, epochs: int = 2, n_eval: int | None = 200, split_seed: int = 0,
                     base: str = "minilm", cache=DEFAULT_CACHE, progress: bool = True, source_adapter=None,
                     source_n_train: int | None = 1000, batch_size: int = 32) -> pd.DataFrame:
    """One row per method, seed, epoch and domain (accuracy, per-item `correct`, role); the first
    seed's LoRA and full fine-tune also record their dW spectra (`df.attrs["spectra"]`). Runs are
    cached in runs/forgetting.jsonl by their configuration, the model before included.

    The model before is `source_adapter` (a saved LoRA trained on `source`) merged into the base, the
    same for every seed; with none, a LoRA trained on `source_n_train` source snippets per seed."""
    for d, what in ((source, "source"), (target, "target")):
        if d not in data.FILES:
            raise ValueError(f"unknown {what} domain {d!r}; choose from {list(data.FILES)}.")
    if source == target:
        raise ValueError(f"source and target are both {source!r}: forgetting needs a new domain to train on.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be a positive integer.")
    seeds = as_seeds(seeds)
    if source_adapter is not None:
        adapter = as_adapter(source_adapter)  # read and checked once, before any training
        before_id = {"adapter_sha256": adapter.meta.get("tensors_sha256") or config_key(
            {k: v.flatten()[:64].tolist() for k, v in sorted(adapter.tensors.items())})}
    else:
        before_id = {"lora_r8_n_train": source_n_train}
    cached = read_cache(cache) if cache else {}
    rows, befores, before_scored = [], {}, {}
    jobs = [(m, s) for s in seeds for m in methods]
    bar = tqdm(jobs, desc="forgetting", disable=not progress)
    for method, seed in bar:
        spectra = seed == seeds[0]
        key = config_key({"study": "forgetting", "method": method.to_dict(), "source": source, "target": target,
                          "seed": seed, "n_train": n_train, "epochs": epochs, "n_eval": n_eval,
                          "split_seed": split_seed, "base": base, "spectra": spectra, "before": before_id,
                          "batch_size": batch_size})
        bar.set_postfix_str(f"{method.describe()} seed {seed}")
        row = cached.get(key)
        if row is None:
            who = None if source_adapter is not None else seed  # one model before for all seeds, or one per seed
            if who not in befores:
                befores = {who: adapter_model(adapter, base) if who is None
                           else source_model(source, seed, source_n_train, split_seed, base, batch_size)}
                before_scored = {who: before_scores(*befores[who], n_eval, split_seed)}
            row = {"key": key, **forgetting_run(method, source, target, seed, n_train, epochs, n_eval, split_seed,
                                                base, batch_size, spectra=spectra, _before=befores[who],
                                                _before_scores=before_scored[who])}
            if cache:
                append_cache(row, cache)
        rows.append(row)
    return _frame(rows, target)


def _frame(rows, target) -> pd.DataFrame:
    out = [{"method": r["method"], "label": r["label"], "seed": r["seed"], **s,
            "role": "target" if s["domain"] == target else "other"} for r in rows for s in r["scores"]]
    df = pd.DataFrame(out)
    df.attrs["spectra"] = {r["method"]: r["spectra"] for r in rows if r.get("spectra")}
    return df


def learning_forgetting(df: pd.DataFrame) -> pd.DataFrame:
    """Per method and epoch, against epoch 0: the gain on the target and the change on the other
    domains (`forgetting`, after minus before: negative is forgotten), each with its 95% interval
    (paired by seed and item) and a direction word. (Before 2026-12 `forgetting` was before minus
    after while every sentence and figure read it as the change, so a loss read as "a gain".)"""
    out = []
    for (method, label), g in df.groupby(["method", "label"], sort=False):
        seeds = sorted(g.seed.unique())
        for epoch in sorted(g.epoch.unique()):
            if epoch == 0:
                continue
            rec = {"method": method, "label": label, "epoch": int(epoch)}
            for role, name in (("target", "gain"), ("other", "forgetting")):
                after, before = _items(g, seeds, e=epoch, role=role), _items(g, seeds, e=0, role=role)
                iv, _ = paired_difference(after.mean(1), before.mean(1), after, before)
                rec.update({name: iv.estimate, f"{name}_lo": iv.lo, f"{name}_hi": iv.hi,
                            f"{name}_direction": direction(iv.lo, iv.hi)})
            out.append(rec)
    return pd.DataFrame(out)


def _items(g: pd.DataFrame, seeds, e: int, role: str) -> np.ndarray:
    """Seeds x items: the per-item correctness of one method at epoch e on the role's domains."""
    sel = g[(g.epoch == e) & (g.role == role)].sort_values(["seed", "domain"])
    return np.stack([np.concatenate([correct_array(c) for c in sel[sel.seed == s].correct]) for s in seeds])


def method_difference(df: pd.DataFrame, a: str, b: str, role: str = "other") -> pd.DataFrame:
    """Per epoch after 0: method a's accuracy minus method b's on the role's items ("other": the
    domains not trained on, "target": the new one), paired by seed and item, with its 95% interval and
    a direction word. Every method starts from the same model, so on "other" this is a's forgetting
    minus b's: positive means a kept more. a and b are `method` keys (e.g. "lora", "full")."""
    missing = sorted({a, b} - set(df.method))
    if missing:
        raise ValueError(f"method {missing[0]!r} is not in the study; it has {sorted(set(df.method))}.")
    if role not in ("other", "target"):
        raise ValueError(f"role={role!r}: choose 'other' (the domains not trained on) or 'target'.")
    ga, gb = df[df.method == a], df[df.method == b]
    seeds = sorted(set(ga.seed) & set(gb.seed))
    if not seeds:
        raise ValueError(f"{a!r} and {b!r} share no seed, so nothing can be paired.")
    out = []
    for epoch in sorted(set(ga.epoch) & set(gb.epoch) - {0}):
        x, y = _items(ga, seeds, e=epoch, role=role), _items(gb, seeds, e=epoch, role=role)
        iv, _ = paired_difference(x.mean(1), y.mean(1), x, y)
        out.append({"epoch": int(epoch), "difference": iv.estimate, "lo": iv.lo, "hi": iv.hi,
                    "direction": direction(iv.lo, iv.hi), "n_seeds": len(seeds), "n_items": x.shape[1]})
    return pd.DataFrame(out)


def spectra_frame(spectra: dict) -> pd.DataFrame:
    """One row per method, layer and singular-value index (for the spectrum figure), with the
    layer's effective rank and intruder count."""
    rows = [{"method": m, "layer": layer, "index": i, "singular_value": v, "rank_1pct": d["rank_1pct"],
             "intruders": d["intruders"]}
            for m, layers in spectra.items() for layer, d in layers.items() for i, v in enumerate(d["sv"])]
    return pd.DataFrame(rows)


__all__ = ["DEFAULT_METHODS", "adapter_model", "forgetting_run", "forgetting_study", "intruder_dimensions", "learning_forgetting",
           "method_difference", "source_model", "spectra_frame", "spectrum_row"]
