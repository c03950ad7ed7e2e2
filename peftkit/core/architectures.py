"""Architecture defaults as data: for each transformers architecture, where LoRA and adapters go.

`ARCHITECTURES` maps a config's `model_type` to an `Architecture`: the default LoRA targets
(PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` where it has the architecture: the
query and value projections, GPT-2's packed `c_attn`, GPT-NeoX's `query_key_value`), and the
sublayer outputs a bottleneck adapter follows: the feed-forward output (Pfeiffer) and the
attention outputs (Houlsby adds them). Names are dotted tails matched as regexes, as the adapter
placements always were.

`architecture(model)` reads `model.config.model_type`, then the config of any submodule (a model
built around a transformers model), and falls back to the classes of the modules (a model that
contains a `LlamaAttention` places like Llama). A model it does not know gets None, and
`unknown_architecture` says so with the table's closest entries.

Adding an architecture is one entry here; nothing else changes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

# BERT and its descendants: layer.N.attention.output.dense after attention, layer.N.output.dense
# after the feed-forward block (the lookbehind keeps the first from matching the second).
_BERT_FFN, _BERT_ATTN = r"(?<!attention\.)output\.dense", r"attention\.output\.dense"


@dataclass(frozen=True)
class Architecture:
    """Where each method goes on one architecture (names are dotted tails, regexes allowed)."""

    lora: tuple[str, ...]        # default LoRA targets
    ffn_output: str              # the feed-forward block's output layer (Pfeiffer adapters follow it)
    attention_output: str        # the attention blocks' output layers (Houlsby adds adapters there)
    classes: tuple[str, ...]     # module classes that identify the architecture without a config

    @property
    def placements(self) -> dict[str, tuple[str, ...]]:
        return {"pfeiffer": (self.ffn_output,), "houlsby": (self.attention_output, self.ffn_output)}


def _decoder(model: str) -> Architecture:  # Llama and the decoders that copied its names
    return Architecture(("q_proj", "v_proj"), r"mlp\.down_proj", r"self_attn\.o_proj", (f"{model}Attention",))


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(("query", "value"), _BERT_FFN, _BERT_ATTN, ("BertSelfAttention",)),
    "roberta": Architecture(("query", "value"), _BERT_FFN, _BERT_ATTN, ("RobertaSelfAttention",)),
    "xlm-roberta": Architecture(("query", "value"), _BERT_FFN, _BERT_ATTN, ("XLMRobertaSelfAttention",)),
    "electra": Architecture(("query", "value"), _BERT_FFN, _BERT_ATTN, ("ElectraSelfAttention",)),
    "albert": Architecture(("query", "value"), r"ffn_output", r"attention\.dense", ("AlbertAttention",)),
    "deberta-v2": Architecture(("query_proj", "value_proj"), _BERT_FFN, _BERT_ATTN, ("DisentangledSelfAttention",)),
    "distilbert": Architecture(("q_lin", "v_lin"), r"ffn\.lin2", r"attention\.out_lin",
                               ("DistilBertSelfAttention", "MultiHeadSelfAttention")),
    "gpt2": Architecture(("c_attn",), r"mlp\.c_proj", r"attn\.c_proj", ("GPT2Attention",)),
    "gpt_neox": Architecture(("query_key_value",), r"mlp\.dense_4h_to_h", r"attention\.dense", ("GPTNeoXAttention",)),
    "llama": _decoder("Llama"),
    "mistral": _decoder("Mistral"),
    "qwen2": _decoder("Qwen2"),
    "phi": Architecture(("q_proj", "v_proj", "fc1", "fc2"), r"mlp\.fc2", r"self_attn\.dense", ("PhiAttention",)),
    "t5": Architecture(("q", "v"), r"DenseReluDense\.wo", r"(?:SelfAttention|EncDecAttention)\.o", ("T5Attention",)),
    "mt5": Architecture(("q", "v"), r"DenseReluDense\.wo", r"(?:SelfAttention|EncDecAttention)\.o", ("MT5Attention",)),
    "bart": Architecture(("q_proj", "v_proj"), r"fc2", r"(?:self_attn|encoder_attn)\.out_proj", ("BartAttention",)),
    "vit": Architecture(("q_proj", "v_proj"), r"mlp\.fc2", r"attention\.o_proj", ("ViTAttention",)),
    "clip": Architecture(("q_proj", "v_proj"), r"mlp\.fc2", r"self_attn\.out_proj", ("CLIPAttention",)),
}


def _model_type(module: nn.Module) -> str | None:
    t = getattr(getattr(module, "config", None), "model_type", None)
    return t if isinstance(t, str) else None


def architecture_name(model: nn.Module) -> str | None:
    """The table's key for `model`: its config's model_type, a submodule's, or by module classes."""
    own = _model_type(model)
    if own in ARCHITECTURES:
        return own
    for m in model.modules():
        if _model_type(m) in ARCHITECTURES:
            return _model_type(m)
    classes = {type(m).__name__ for m in model.modules()}
    return next((k for k, a in ARCHITECTURES.items() if classes & set(a.classes)), None)


def architecture(model: nn.Module) -> Architecture | None:
    name = architecture_name(model)
    return ARCHITECTURES[name] if name else None


def closest(model: nn.Module, n: int = 3) -> list[str]:
    """The table's entries nearest `model`: by name (its model_type or class), then by the
    layer names they would target that the model has."""
    key = (_model_type(model) or type(model).__name__).lower()
    by_name = difflib.get_close_matches(key, list(ARCHITECTURES), n=n, cutoff=0.5)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    overlap = sorted(ARCHITECTURES, key=lambda k: -len(leaves & set(ARCHITECTURES[k].lora)))
    overlap = [k for k in overlap if leaves & set(ARCHITECTURES[k].lora)]
    return list(dict.fromkeys(by_name + overlap))[:n]


def unknown_architecture(model: nn.Module, what: str) -> str:
    """The sentence that says `model` is not in the table, with its closest entries."""
    t = _model_type(model)
    named = f"model_type {t!r}" if t else "no transformers config"
    near = closest(model)
    if near:
        listed = "; ".join(f"{k} (LoRA {', '.join(ARCHITECTURES[k].lora)}; adapters after "
                           f"{ARCHITECTURES[k].ffn_output})" for k in near)
        near_text = f" The closest entries: {listed}."
    else:
        near_text = ""
    return (f"This {type(model).__name__} ({named}) is not in peftkit's architecture table "
            f"(peftkit.core.architectures.ARCHITECTURES: {', '.join(ARCHITECTURES)}), so {what} has no "
            f"default for it.{near_text} Give targets=(...) explicitly.")
