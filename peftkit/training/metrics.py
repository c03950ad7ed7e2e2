"""Evaluation and measurement: accuracy and F1, confusion matrices, step time, memory, bytes.

Tweets are 69% positive, so a majority guess already scores 0.69 accuracy there: report macro F1
beside accuracy. Peak memory is measured honestly: on CPU each measured run lives in its own
process (see experiments.py) and reports ru_maxrss; on CUDA, max_memory_allocated.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..data import FILES, load_corpus, sample_rows, split
from ..data.loaders import make_loaders


def model_logits(model, batch: dict) -> torch.Tensor:
    """Logits for a batch dict (labels are not passed to the model: the loss is ours)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def f1_scores(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> tuple[float, float]:
    """(macro F1, support-weighted F1). A class never predicted nor present scores 0."""
    f1s, support = [], []
    for c in range(num_labels):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        support.append(np.sum(y_true == c))
    support = np.asarray(support, dtype=float)
    weighted = float(np.dot(f1s, support) / support.sum()) if support.sum() else 0.0
    return float(np.mean(f1s)), weighted


@torch.no_grad()
def predict(model, loader, device=None) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, predictions, mean cross-entropy) over a loader, in eval mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    ys, ps, loss_sum, n = [], [], 0.0, 0
    rng = torch.get_rng_state()
    batches = iter(loader)  # creating a DataLoader iterator draws from the global RNG
    torch.set_rng_state(rng)
    for batch in batches:
        batch = to_device(batch, device)
        logits = model_logits(model, batch).float()
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        ys.append(batch["labels"].cpu().numpy())
        ps.append(logits.argmax(-1).cpu().numpy())
        n += len(batch["labels"])
    model.train(was_training)
    if n == 0:
        raise ValueError("the evaluation loader yielded no examples.")
    return np.concatenate(ys), np.concatenate(ps), loss_sum / n


def evaluate(model, loader, device=None, num_labels: int | None = None, per_item: bool = False) -> dict:
    """accuracy, f1_macro, f1_weighted, loss, n, and the confusion matrix (rows: true label).

    per_item=True adds "correct": one '1' or '0' per example, in the dataset's row order (the
    loader may go through it in another order), for paired tests and bootstraps over test items.
    """
    y, p, loss = predict(model, loader, device)
    k = num_labels or int(max(y.max(), p.max()) + 1)
    f1_macro, f1_weighted = f1_scores(y, p, k)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, p), 1)
    out = {"accuracy": float((y == p).mean()), "f1_macro": f1_macro, "f1_weighted": f1_weighted,
           "loss": loss, "n": int(len(y)), "confusion": cm.tolist()}
    if per_item:
        sampler = getattr(loader, "batch_sampler", None)
        order = ([i for b in sampler.global_batches() for i in b] if hasattr(sampler, "global_batches")
                 else list(range(len(y))))
        if sorted(order) != list(range(len(y))):
            raise ValueError("per_item needs a loader that visits every example once.")
        correct = np.empty(len(y), dtype=bool)
        correct[np.asarray(order)] = y == p
        out["correct"] = "".join("1" if c else "0" for c in correct)
    return out


def confusion_frame(result: dict, labels=("negative", "positive")) -> pd.DataFrame:
    cm = np.asarray(result["confusion"])
    names = list(labels)[: len(cm)] if len(labels) >= len(cm) else [str(i) for i in range(len(cm))]
    return pd.DataFrame(cm, index=[f"true {n}" for n in names], columns=[f"pred {n}" for n in names])


def step_time(model, batch: dict, repeats: int = 10, warmup: int = 2) -> dict:
    """Median seconds of one training step (forward, backward, AdamW) and tokens per second."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-9)
    model.train()
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model_logits(model, batch), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(batch["labels"])
    return {"sec_per_step": med, "tokens_per_sec": tokens / med}


@torch.no_grad()
def latency(model, batch: dict, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one inference forward pass on `batch` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        model_logits(model, batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    model.train(was_training)
    return statistics.median(times)


def state_bytes(model) -> int:
    """Bytes of every distinct parameter and buffer: about the size of a full checkpoint."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def compare_latency(models: dict, batch: dict, repeats: int = 20, warmup: int = 2) -> pd.DataFrame:
    """Median inference latency of several models, interleaved so machine noise hits all alike."""
    for m in models.values():
        m.eval()
        for _ in range(warmup):
            model_logits(m, batch)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            model_logits(m, batch)
            times[name].append(time.perf_counter() - t0)
    df = pd.DataFrame({"model": list(times), "ms per batch": [1000 * statistics.median(t) for t in times.values()]})
    df["vs first"] = (df["ms per batch"] / df["ms per batch"].iloc[0]).round(3)
    return df


def test_split(domain: str, seed: int = 0, n_eval: int | None = None) -> pd.DataFrame:
    """The seed-`seed` test split of `domain`, capped at `n_eval` rows (a seeded sample)."""
    return sample_rows(split(load_corpus(domain), seed=seed)["test"], n_eval, seed)


def evaluate_domains(model, tokenizer, domains=None, n_eval: int | None = None, seed: int = 0,
                     batch_size: int = 64, max_length: int = 128) -> pd.DataFrame:
    """Accuracy and macro F1 of `model` on the test split of each domain (all four by default)."""
    rows = []
    for d in domains or list(FILES):
        loader = make_loaders(tokenizer, {"test": test_split(d, seed, n_eval)}, batch_size=batch_size,
                              max_length=max_length)["test"]
        r = evaluate(model, loader)
        rows.append({"domain": d, "accuracy": r["accuracy"], "f1_macro": r["f1_macro"], "n": len(loader.dataset)})
    return pd.DataFrame(rows)
