"""The seed article's API, callable by its names and arguments, done correctly on peftkit.

The article (shared/seed/; docs/article.md goes through it) sketches functions and classes that
users reach for by name. Each keeps here the article's name, arguments and documented output, and
peftkit does the work. Where the article's interface cannot be honoured (it reads loaders, devices
and models it never defines, or a pickle file), the call raises `ArticleError` saying what to pass
or use instead. Line numbers are the article's. The evaluation and monitoring sections (and
`ArticleError`) are in `article_eval`, re-exported here. The article checked rather than called
(its layers' defects measured, its chain beside peftkit's rules, its comparison words measured)
is in `article_checks`; `claims_table` is re-exported here.

    choose_finetuning_method, enterprise_finetuning_strategy   section 6.1 (select.ARTICLE_RULES)
    evaluate_model, compare_methods, train_and_compare          4.2 and 4.3 (metrics, train.fit)
    EnterpriseModelDeployer                                     5.2 (serve.Deployer)
    ModelOptimizer                                              5.3 (compress, surgery.merge)
    objective                                                   6.2 (tune.build, train.fit)
    ModelMonitor                                                6.3 (monitor.Monitor)
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..bases.models import load_base
from ..compress import prune_unstructured, quantize_int8
from ..core.surgery import adapter_layers, apply, lora_layers, merge
from ..data import load_corpus, split
from ..data.loaders import make_loaders
from ..files.adapter_file import AdapterFileError, read_adapter, save_adapter
from ..layers.lora import MergeError
from ..serving.deployer import Deployer
from ..training.loop import fit
from .article_checks import claims_table, claims_text  # noqa: F401  (notebook 04 imports them from here)
from .article_eval import (  # noqa: F401  (the article's names, importable from here as before)
    ArticleError,
    ModelMonitor,
    compare_methods,
    evaluate_model,
    train_and_compare,
)
from .search_space import build  # not .tuning: no optuna or sqlalchemy for this
from .selection import ARTICLE_RULES, METHOD_LABELS, choose_method

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".pkl", ".ckpt")
TOY_CONFIG = {"vocab_size", "embed_dim", "hidden_dim", "r", "num_layers", "adapter_size"}  # the article's toy models


# --- section 6.1: choosing a method ---------------------------------------------------------------

def choose_finetuning_method(model_size, available_resources, task_complexity, deployment_constraints) -> str:
    """'LoRA' or 'Adapter', exactly as the article's chain answers (select.ARTICLE_RULES), in its
    words or peftkit's; an unknown word raises select.AnswerError naming the valid ones (the
    article's function answered 'LoRA' to any typo)."""
    rec = choose_method(ARTICLE_RULES, model_size=model_size, available_resources=available_resources,
                        task_complexity=task_complexity, deployment_constraints=deployment_constraints)
    return METHOD_LABELS[rec.method.name]


def enterprise_finetuning_strategy() -> None:
    """The article's two examples (lines 512-519), printed as it prints them: '策略1: LoRA', '策略2: Adapter'."""
    strategy1 = choose_finetuning_method("large", "limited", "simple", "strict")
    print(f"策略1: {strategy1}")
    strategy2 = choose_finetuning_method("medium", "good", "complex", "normal")
    print(f"策略2: {strategy2}")


# --- section 5.2: deployment -----------------------------------------------------------------------

def _refuse_pickle(path, what: str) -> None:
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path}: {what} a pickle file, and torch.load on a pickle runs whatever code it "
                               "holds. peftkit keeps an adapter as a folder of safetensors and JSON: write it with "
                               "peftkit.save_adapter(model, folder) and pass the folder.")


class EnterpriseModelDeployer:
    """The article's `EnterpriseModelDeployer` (lines 380-426) on a peftkit `Deployer`.

    Args:
        model_type: 'lora' or 'adapter'; the loaded adapter must be of that kind.
        config: the Deployer's settings (base, num_labels, device, merged, max_length, seed,
            label_names). The article's config built an untrained toy model from vocab_size,
            embed_dim, hidden_dim and r; those keys are refused: the base is pretrained and the rank
            is read from the adapter file.

    load_model(folder) checks an adapter folder and loads it (never a pickle); predict(input_data)
    returns logits as a numpy array, one row per text or token-id row (the article's were per
    token); save_model(folder) writes the live adapter as a folder.
    """

    NAME = "model"

    def __init__(self, model_type: str = "lora", config: dict | None = None):
        if model_type not in ("lora", "adapter"):
            raise ArticleError(f"model_type={model_type!r}; choose 'lora' or 'adapter' (the article left the "
                               "model unset for any other word and failed later).")
        config = dict(config or {})
        toy = sorted(TOY_CONFIG & set(config))
        if toy:
            raise ArticleError(f"config keys {toy} describe the article's toy model, built untrained from scratch. "
                               "peftkit serves a pretrained base and reads the method's settings from the adapter "
                               "file: use config={'base': 'minilm'} (or 'tiny' for tests).")
        known = set(inspect.signature(Deployer).parameters)
        if set(config) - known:
            raise ArticleError(f"unknown config keys {sorted(set(config) - known)}; the Deployer takes {sorted(known)}.")
        self.model_type, self.config = model_type, config
        self.deployer = Deployer(**config)
        self.device = self.deployer.device

    @property
    def model(self):
        """The served model once load_model has run, else None (as in the article)."""
        return self.deployer.model if self.deployer.active else None

    def load_model(self, model_path) -> None:
        """Load the adapter folder `model_path` onto the base: checked against the base, never unpickled."""
        _refuse_pickle(model_path, "the article loads")
        method = read_adapter(model_path).method
        if method.name != self.model_type:
            raise ArticleError(f"{model_path} holds a {method.name} adapter, but this deployer's model_type is "
                               f"{self.model_type!r}; use model_type={method.name!r}.")
        self.deployer.register(self.NAME, model_path, replace=True)
        self.deployer.activate(self.NAME)

    def predict(self, input_data) -> np.ndarray:
        """Logits, shape (inputs, labels), for a list of texts or of token-id rows (or a 2-D tensor)."""
        if self.deployer.active is None:
            raise ArticleError("no model is loaded; call load_model(folder) first.")
        rows = input_data.tolist() if isinstance(input_data, (torch.Tensor, np.ndarray)) else input_data
        if isinstance(rows, str) or not isinstance(rows, (list, tuple)) or not rows:
            raise ArticleError("predict takes a non-empty list of texts or of token-id rows, e.g. [[101, 2307, 102]].")
        if all(isinstance(r, str) for r in rows):
            rows = self.deployer.encode(list(rows))[0]
        vocab = self.deployer.model.config.vocab_size
        for i, r in enumerate(rows):
            if not isinstance(r, (list, tuple)) or not r or not all(isinstance(t, int) and 0 <= t < vocab for t in r):
                raise ArticleError(f"input_data[{i}] must be a non-empty list of token ids in [0, {vocab}), or a text.")
            if len(r) > self.deployer.max_length:
                raise ArticleError(f"input_data[{i}] has {len(r)} tokens; the model takes at most {self.deployer.max_length}.")
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        self.deployer.activate(self.NAME)  # one adapter only: it stays live for the forward below
        with torch.inference_mode():
            out = self.deployer.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return out.float().cpu().numpy()

    def save_model(self, save_path) -> Path:
        """Write the live adapter (and head) as a peftkit adapter folder; returns its path."""
        _refuse_pickle(save_path, "the article saves")
        if self.deployer.active is None:
            raise ArticleError("no model is loaded; call load_model(folder) first.")
        return save_adapter(self.deployer.model, save_path)


# --- section 5.3: optimization ---------------------------------------------------------------------

class ModelOptimizer:
    """The article's `ModelOptimizer` (lines 446-477) on peftkit.compress and surgery.merge.

    Each method changes `self.model` in place, as the article's did, and returns it (merge returns
    the number of layers merged). LoRA is merged before quantizing or pruning; the task head is left
    in float and unpruned.
    """

    def __init__(self, model):
        self.model = model

    def quantize_model(self, bits: int = 8):
        """Real int8: weights stored per output row, activations per token (compress.quantize_int8).

        The article rounded each weight matrix with one scale and stored the result back in float32,
        saving nothing. Widths other than 8 have no int8 storage here: their accuracy cost is
        simulated by compress.simulate_kbit(model, bits), which says so.
        """
        if bits != 8:
            raise ArticleError(f"bits={bits}: peftkit stores int8 for real only; to see what {bits} bits would cost, "
                               f"use peftkit.compress.simulate_kbit(model, {bits}) (a simulation in float).")
        self.model = quantize_int8(self.model, inplace=True)
        return self.model

    def prune_model(self, pruning_ratio: float = 0.3):
        """Zero the smallest `pruning_ratio` of each Linear's weights (compress.prune_unstructured,
        per layer as the article); the mask stays, so further training keeps them zero."""
        self.model = prune_unstructured(self.model, pruning_ratio, scope="layer", inplace=True)
        return self.model

    def merge_lora_weights(self) -> int:
        """Fold every LoRA update into its base weight once (surgery.merge: scaled, NaN-checked,
        idempotent, and the LoRA path switched off, so the update is not counted twice)."""
        if not lora_layers(self.model) and not adapter_layers(self.model):  # adapters: merge() says why not
            raise MergeError("this model has no LoRA layer to merge; apply LoRA first (peftkit.apply(model, peftkit.LoRA())).")
        return merge(self.model)


# --- section 6.2: hyperparameter search --------------------------------------------------------------

def objective(trial, train_dataset=None, val_dataset=None, *, base: str = "minilm", domain: str = "movies",
              n_train: int | None = 2000, n_val: int | None = 500, epochs: int = 3, seed: int = 0) -> float:
    """The article's Optuna objective (lines 527-557): samples r in [4, 64], learning_rate in
    [1e-5, 1e-3] (log) and batch_size in {16, 32, 64} under the article's names, trains LoRA for 3
    epochs and returns the accuracy, a float to maximize.

    Done correctly: LoRA on a pretrained base with alpha = 2r, scored on the *validation* split (the
    article chose on the test set, the data meant to report the choice). train_dataset, val_dataset:
    DataFrames with text and label; None draws n_train / n_val snippets from the corpus's splits.
    For a stored, prunable, resumable search use peftkit.tune.tune('lora').
    """
    r = trial.suggest_int("r", 4, 64)
    learning_rate = trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True)
    batch_size = trial.suggest_categorical("batch_size", [16, 32, 64])
    if train_dataset is None or val_dataset is None:
        splits = split(load_corpus(domain), seed=seed)
        train_dataset = splits["train"] if n_train is None else splits["train"].sample(n_train, random_state=seed)
        val_dataset = splits["val"] if n_val is None else splits["val"].sample(n_val, random_state=seed)
    for name, df in (("train_dataset", train_dataset), ("val_dataset", val_dataset)):
        if not isinstance(df, pd.DataFrame) or not {"text", "label"} <= set(df.columns):
            raise ArticleError(f"{name} must be a DataFrame with text and label columns (as peftkit.data.split "
                               f"gives), got {type(df).__name__}.")
    method, cfg = build("lora", {"r": r, "lr": learning_rate, "batch_size": batch_size}, epochs=epochs, seed=seed)
    model, tok = load_base(base, num_labels=2, seed=seed)
    apply(model, method)
    loaders = make_loaders(tok, {"train": train_dataset, "val": val_dataset}, batch_size=batch_size, seed=seed)
    fit(model, loaders["train"], None, cfg)
    accuracy, f1 = evaluate_model(model, loaders["val"])
    trial.set_user_attr("val_f1_weighted", f1)
    return accuracy
