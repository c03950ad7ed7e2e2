"""Which layer kinds each method wraps, and with which wrapper.

LoRA adapts `nn.Linear`, transformers' `Conv1D` (GPT-2, weight stored (in, out)), `nn.Conv1d`,
`nn.Conv2d`, `nn.Conv3d`, `nn.Embedding` and `nn.MultiheadAttention`: PEFT's LoRA layer kinds, with
its factor shapes and file names. A bottleneck adapter follows a layer whose output has its
features last: `nn.Linear` and `Conv1D`. `lora_problem` says, before anything is touched, why a
selected layer cannot take LoRA.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..layers.adapters import output_width
from ..layers.dora import DoRALinear
from ..layers.lora import LoRALayer, LoRALinear
from ..layers.lora_attention import LoRAMultiheadAttention, attention_problem
from ..layers.lora_conv import CONVS, LoRAConv, conv_problem
from ..layers.lora_embedding import LoRAEmbedding, embedding_problem

LORA_KINDS = (nn.Linear, Conv1D, *CONVS, nn.Embedding, nn.MultiheadAttention)
ADAPTER_KINDS = (nn.Linear, Conv1D)


def lora_layer(module: nn.Module, r: int, alpha: float, dropout: float, rslora: bool,
               init: str = "lora", dora: bool = False) -> LoRALayer:
    """The LoRA wrapper for `module`'s kind (DoRA's, with dora=True; PiSSA's init on Linear kinds)."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return (DoRALinear if dora else LoRALinear)(module, r, alpha, dropout, rslora, init=init)
    if isinstance(module, CONVS):
        return LoRAConv(module, r, alpha, dropout, rslora)
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding(module, r, alpha, dropout, rslora)
    if isinstance(module, nn.MultiheadAttention):
        return LoRAMultiheadAttention(module, r, alpha, dropout, rslora)
    raise TypeError(f"LoRA has no layer for a {type(module).__name__}.")


def lora_problem(model: nn.Module, name: str, module: nn.Module, dropout: float) -> str | None:
    """Why LoRA cannot wrap the module `name` of `model`, or None when it can."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        # Its forward passes out_proj.weight to F.multi_head_attention_forward and never calls
        # out_proj: a LoRA there would never run, and never train.
        return (f"it is the {name.rpartition('.')[2]} of the nn.MultiheadAttention {parent_name!r}, which "
                f"never calls it; target {parent_name!r} itself: LoRA then adapts its in_proj and out_proj")
    if isinstance(module, CONVS):
        return conv_problem(module)
    if isinstance(module, nn.Embedding):
        return embedding_problem(module)
    if isinstance(module, nn.MultiheadAttention):
        return attention_problem(module, dropout)
    return None


def adapter_width(module: nn.Module) -> int:
    """The width of the stream an adapter after `module` sits on."""
    width = output_width(module)
    if width is None:
        raise TypeError(f"an adapter follows a layer whose output has its features last (Linear, Conv1D), "
                        f"not a {type(module).__name__}.")
    return width


def kind_names(kinds) -> str:
    return ", ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
