"""Tiny random models of every family peftkit adapts, built from transformers config classes and
plain torch, offline: for the family test matrix, the notebooks and the benchmarks.

`FAMILIES` names each one with how to build it, an example batch, and, for the plain modules,
the layers LoRA and adapters target (transformers models use the architecture table's defaults):

    gpt2 llama t5 bart            generative language models (GPT-2's Conv1D, tied embeddings)
    distilbert roberta            sequence classifiers (DistilBERT's pre_classifier, RoBERTa's head module)
    vit                           an image classifier (patch embedding Conv2d, q_proj...fc2)
    mlp cnn embedding mha         plain modules: Linear; Conv2d; Embedding + Conv1d;
                                  nn.TransformerEncoderLayer (nn.MultiheadAttention)

Widths are 16 to 32 and there are one or two layers, so each model builds and runs in
milliseconds; `tiny_model(family, seed)` gives the same weights for the same seed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import transformers as T
from torch import nn

from .models import MLP

VOCAB = 64


class CNN(nn.Module):
    """A small image classifier: two 3x3 convolutions (ReLU, 2x2 max-pool), fc, classifier.
    Sized for 8x8 images (scikit-learn's digits) by default."""

    def __init__(self, in_channels: int = 1, num_labels: int = 10, width: int = 16, image_size: int = 8,
                 hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        side = image_size // 4
        self.fc = nn.Linear(2 * width * side * side, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, x):
        h = self.pool(self.act(self.conv1(x)))
        h = self.pool(self.act(self.conv2(h)))
        return self.classifier(self.act(self.fc(h.flatten(1))))


class TokenCNN(nn.Module):
    """Token ids -> nn.Embedding -> nn.Conv1d over the sequence -> mean -> proj -> classifier."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, num_labels: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.proj = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, input_ids):
        h = self.act(self.conv(self.embed(input_ids).transpose(1, 2))).mean(-1)  # (N, dim)
        return self.classifier(self.act(self.proj(h)))


class AttentionClassifier(nn.Module):
    """Token ids -> nn.Embedding -> nn.TransformerEncoderLayer (its self_attn is an
    nn.MultiheadAttention) -> mean -> classifier."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, heads: int = 2, num_labels: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, input_ids):
        return self.classifier(self.encoder(self.embed(input_ids)).mean(1))


def _text(n: int = 6, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB - 1, (batch, n), generator=g)}


def _seq2seq(batch: int = 2, seed: int = 0) -> dict:
    x = _text(6, batch, seed)
    x["decoder_input_ids"] = _text(4, batch, seed + 1)["input_ids"]
    return x


def _layers(d: int = 16) -> dict:
    return dict(hidden_size=d, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * d,
                vocab_size=VOCAB, max_position_embeddings=40)


_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB,
                                                   n_positions=40, **_IDS)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_layers(), num_key_value_heads=1, **_IDS)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
        d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=VOCAB, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=2)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=VOCAB, max_position_embeddings=40)),
    "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        dim=16, n_layers=2, n_heads=2, hidden_dim=32, vocab_size=VOCAB, max_position_embeddings=40)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**_layers(), pad_token_id=1)),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8,
        patch_size=4, num_channels=1, num_labels=3)),
    "mlp": lambda: MLP(),
    "cnn": lambda: CNN(num_labels=3),
    "embedding": lambda: TokenCNN(),
    "mha": lambda: AttentionClassifier(),
}


@dataclass(frozen=True)
class Family:
    """One family of the matrix: its example batch, and for plain modules the targets."""

    inputs: Callable[[int], dict]
    lora_targets: tuple[str, ...] | None = None     # None: the architecture table's defaults
    adapter_targets: tuple[str, ...] | None = None  # None: the placement (pfeiffer, houlsby)
    generative: bool = False
    notes: str = ""


FAMILIES: dict[str, Family] = {
    "gpt2": Family(lambda s: _text(seed=s), generative=True, notes="Conv1D, lm_head tied to wte"),
    "llama": Family(lambda s: _text(seed=s), generative=True),
    "t5": Family(lambda s: _seq2seq(seed=s), generative=True, notes="lm_head tied to shared"),
    "bart": Family(lambda s: _seq2seq(seed=s), generative=True, notes="scaled, tied embeddings"),
    "distilbert": Family(lambda s: _text(seed=s), notes="pre_classifier and classifier"),
    "roberta": Family(lambda s: _text(seed=s), notes="the head is a module"),
    "vit": Family(lambda s: {"pixel_values": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(s))}),
    "mlp": Family(lambda s: {"x": torch.randn(2, 16, generator=torch.Generator().manual_seed(s))},
                  ("fc1", "fc2"), ("fc1", "fc2")),
    "cnn": Family(lambda s: {"x": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(s))},
                  ("conv1", "conv2", "fc"), ("fc",)),
    "embedding": Family(lambda s: _text(seed=s), ("embed", "conv", "proj"), ("proj",)),
    "mha": Family(lambda s: _text(seed=s), ("self_attn", "linear1"), ("linear2",)),
}


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A tiny random model of `family` (see FAMILIES), in eval mode; the same seed, the same weights."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {list(_BUILDERS)}.")
    torch.manual_seed(seed)
    with _quiet():
        model = _BUILDERS[family]()
    if hasattr(model, "generation_config"):
        model.generation_config.pad_token_id = model.config.pad_token_id
    return model.eval()


def tiny_inputs(family: str, seed: int = 0) -> dict:
    """An example batch of two for `family`'s model."""
    return FAMILIES[family].inputs(seed)
