"""The seed article's evaluation and monitoring (sections 4.2, 4.3 and 6.3), under its names and
arguments, done correctly on peftkit; and `ArticleError`, the refusal every article function raises.

    evaluate_model, compare_methods, train_and_compare          4.2 and 4.3 (metrics, train.fit)
    ModelMonitor                                                6.3 (monitor.Monitor)

They share one pass over a loader (`_outputs`), which takes the article's (inputs, labels) batches
or peftkit's dicts. The rest of the article's API, which uses these, is in article.py; line
numbers are the article's.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import pandas as pd
import torch

from ..core.surgery import adapter_layers, lora_layers
from ..files.adapter_file import write_json
from ..runtime import resolve_device
from ..serving.monitor import Monitor
from ..training.loop import TrainConfig, fit
from ..training.metrics import f1_scores, model_logits, to_device


class ArticleError(ValueError):
    """The article's interface cannot be honoured as written; the message says what to use instead."""


# --- section 4.2 and 4.3: evaluating and comparing ------------------------------------------------

def _as_batch(batch, model) -> dict:
    """A peftkit batch dict; an (inputs, labels) pair feeds `inputs` to the model's first argument."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise ArticleError("a batch dict needs a 'labels' entry (peftkit's loaders give input_ids, "
                               "attention_mask and labels).")
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
        first = next(iter(inspect.signature(model.forward).parameters))
        inputs = dict(inputs) if isinstance(inputs, dict) else {first: inputs}
        return {**inputs, "labels": torch.as_tensor(labels)}
    raise ArticleError(f"a batch must be the article's (inputs, labels) pair or a peftkit batch dict, "
                       f"got {type(batch).__name__}.")


@torch.no_grad()
def _outputs(model, dataloader, device=None):
    """(labels, predictions, confidences, texts) over a loader, in eval mode; the mode is restored.
    texts: each example's token ids as a string (what the Monitor counts as its length)."""
    device = resolve_device(device) if isinstance(device, str) else device
    device = device or next(model.parameters()).device
    model.to(device)
    was_training = model.training
    model.eval()
    ys, ps, cs, texts = [], [], [], []
    try:
        for batch in dataloader:
            batch = to_device(_as_batch(batch, model), device)
            logits = model_logits(model, batch).float()
            if logits.dim() != 2:
                raise ArticleError(f"the model returns outputs of shape {tuple(logits.shape)}, one per token; "
                                   "evaluate_model scores one label per example, so it needs a sequence "
                                   "classifier's (batch, classes) logits, such as load_base's models give.")
            prob = torch.softmax(logits, -1)
            ys.append(batch["labels"].cpu())
            ps.append(prob.argmax(-1).cpu())
            cs.append(prob.max(-1).values.cpu())
            ids, mask = batch.get("input_ids"), batch.get("attention_mask")
            for i in range(len(logits)):
                row = [] if ids is None else ids[i] if mask is None else ids[i][mask[i].bool()]
                texts.append(" ".join(str(int(t)) for t in row) or "?")
    finally:
        model.train(was_training)
    if not ys:
        raise ArticleError("the evaluation loader yielded no examples.")
    return torch.cat(ys).numpy(), torch.cat(ps).numpy(), torch.cat(cs).numpy(), texts


def evaluate_model(model, dataloader, device=None) -> tuple[float, float]:
    """The article's `evaluate_model` (lines 278-297): (accuracy, support-weighted F1), as it returns them.

    Done correctly: `device` may be left out (as the article's own calls at lines 556 and 576 do) and
    the model is moved to it (the article moved only the inputs); its train/eval mode is restored.
    Batches are the article's (inputs, labels) pairs (no attention mask, as in the article) or
    peftkit's dicts. A model with one output per token (the article's toy models) is refused rather
    than scored per token against per-example labels.
    """
    y, p, _, _ = _outputs(model, dataloader, device)
    num_labels = int(max(y.max(), p.max()) + 1)
    _, f1_weighted = f1_scores(y, p, num_labels)
    return float((y == p).mean()), f1_weighted


def _check_trained_pair(lora_model, adapter_model, what: str, where: str, instead: str) -> None:
    if lora_model is None or adapter_model is None or where is None:
        raise ArticleError(f"{what}, as the article wrote it, builds two fresh toy models and reads loaders and a "
                           f"device it never defines. Pass them: {instead}")
    if not lora_layers(lora_model):
        raise ArticleError("lora_model has no LoRA layer: apply one first, e.g. peftkit.apply(model, peftkit.LoRA()).")
    if not adapter_layers(adapter_model):
        raise ArticleError("adapter_model has no adapter: apply one first, e.g. peftkit.apply(model, peftkit.Adapter()).")


def compare_methods(lora_model=None, adapter_model=None, test_dataloader=None, device=None) -> pd.DataFrame:
    """The article's `compare_methods` (lines 300-310): prints 'LoRA - Accuracy: ..., F1 Score: ...'
    and the same for Adapter; returns those numbers as a DataFrame. The article evaluated two
    untrained models on an undefined `test_dataloader`: here the trained models and the loader are
    arguments, and a model whose update is still exactly zero (never trained) is refused.
    """
    _check_trained_pair(lora_model, adapter_model, "compare_methods", test_dataloader,
                        "compare_methods(lora_model, adapter_model, test_dataloader), with trained models; or "
                        "train and measure both on the corpus with peftkit.experiments.compare([peftkit.LoRA(), "
                        "peftkit.Adapter()]).")
    for name, zero in (("lora_model", all(not m.lora_B.detach().any() for m in lora_layers(lora_model))),
                       ("adapter_model", all(not m.adapter_branch.up.weight.detach().any() for m in adapter_layers(adapter_model)))):
        if zero:
            raise ArticleError(f"{name} was never trained: its update is exactly zero, so it answers as its base does.")
    rows = []
    for name, model in (("LoRA", lora_model), ("Adapter", adapter_model)):
        acc, f1 = evaluate_model(model, test_dataloader, device)
        print(f"{name} - Accuracy: {acc:.4f}, F1 Score: {f1:.4f}")
        rows.append({"method": name, "accuracy": acc, "f1_score": f1})
    return pd.DataFrame(rows)


def train_and_compare(lora_model=None, adapter_model=None, train_dataloader=None, device=None,
                      epochs: int = 5, lr: float = 1e-4) -> pd.DataFrame:
    """The article's `train_and_compare` (lines 317-355): trains each model (5 epochs at 1e-4, as it
    did), prints 'LoRA Training Time: ...s' and 'Adapter Training Time: ...s', and returns seconds,
    steps and trainable parameters. Done correctly with `train.fit`: only trainable parameters are
    optimized (the article gave Adam every one), the loss is cross-entropy per example (its
    `criterion` is undefined), the model goes to the device, and the clock times training alone.
    For comparable timings use peftkit.experiments.compare (a fresh process per run).
    """
    _check_trained_pair(lora_model, adapter_model, "train_and_compare", train_dataloader,
                        "train_and_compare(lora_model, adapter_model, train_dataloader), the models with their "
                        "method applied; or time both on the corpus with peftkit.experiments.compare.")
    cfg = TrainConfig(epochs=epochs, lr=lr, device=str(device) if device is not None else "auto", progress=False)
    rows = []
    for name, model in (("LoRA", lora_model), ("Adapter", adapter_model)):
        t0 = time.perf_counter()
        hist = fit(model, train_dataloader, None, cfg)
        seconds = time.perf_counter() - t0
        print(f"{name} Training Time: {seconds:.2f}s")
        rows.append({"method": name, "seconds": seconds, "steps": int(hist.step.iloc[-1]),
                     "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
    return pd.DataFrame(rows)


# --- section 6.3: monitoring ---------------------------------------------------------------------

class ModelMonitor:
    """The article's `ModelMonitor` (lines 569-598): evaluate a model on the same test data from time
    to time, keep its records (timestamp, accuracy, f1_score, model_type) in `performance_history`,
    warn when performance falls, export the records.

    Done correctly: each evaluation's examples also go to a peftkit `Monitor`, the article's unused
    `anomaly_detector` (made at the first call, its window one evaluation), which judges from the
    first call on (the article waited for six): accuracy below `min_accuracy` (the article's 0.8),
    more than `drop_tolerance` below the first evaluation's (the drop the article's message names but
    never measured), and drift. A degradation prints the article's warning with its reason, once.
    """

    WARNING = "警告:模型性能显著下降"

    def __init__(self, min_accuracy: float = 0.8, drop_tolerance: float = 0.05):
        self.performance_history: list[dict] = []
        self.anomaly_detector: Monitor | None = None
        self.min_accuracy, self.drop_tolerance = min_accuracy, drop_tolerance

    def monitor_performance(self, model, test_data, device=None) -> list[dict]:
        """Evaluate `model` on `test_data`, record it, print a warning on degradation; returns the alerts raised."""
        y, p, conf, texts = _outputs(model, test_data, device)
        if self.anomaly_detector is None:
            if len(y) < 10:
                raise ArticleError(f"test_data holds {len(y)} examples; monitoring needs at least 10 per evaluation.")
            self.anomaly_detector = Monitor(window=len(y), min_accuracy=self.min_accuracy, drop_tolerance=self.drop_tolerance,
                                            drift_test="ks", name="ModelMonitor")
        _, f1 = f1_scores(y, p, int(max(y.max(), p.max()) + 1))
        self.performance_history.append({"timestamp": time.time(), "accuracy": float((y == p).mean()),
                                         "f1_score": f1, "model_type": type(model).__name__})
        alerts = self.anomaly_detector.record(texts, p, conf, y.tolist())
        for a in alerts:
            if a["kind"] == "degradation":
                print(f"{self.WARNING}: {a['reason']}")
        return alerts

    def export_metrics(self, path="model_metrics.json") -> Path:
        """Write performance_history as a JSON list (the article's file), atomically; returns the path."""
        write_json(Path(path), self.performance_history)
        return Path(path)
