"""Bottleneck adapters: a small residual MLP inserted after a sublayer.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (ICML 2019), section 2.1:

    h' = h + W_up f(W_down h),      W_down: (m, d), W_up: (d, m), m << d

placed after the attention output and after the feed-forward output of every layer.
Pfeiffer et al., "AdapterFusion" (EACL 2021), section 3, keep only the one after the
feed-forward block, which halves the parameters at about the same accuracy.

``W_up`` starts at zero, so every adapter is the identity at initialisation and training
starts from exactly the pretrained model. Each adapter costs 2 d m + d + m parameters.

Unlike LoRA an adapter has a nonlinearity f between its two projections, so it has no
equivalent linear weight: it can never be merged into the layer it follows, and it always
costs an extra (small) matmul pair at inference.
"""

from __future__ import annotations

from torch import nn

from .names import ADAPTER_PREFIX
from .wrap import WrapsBase

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
VARIANTS = ("simple", "deep")

# Where each placement goes, as module-name regexes (matched against the end of the name).
# The FFN output of a BERT layer is `layer.N.output.dense`; its attention output is
# `layer.N.attention.output.dense`. DistilBERT names them `ffn.lin2` and `attention.out_lin`.
FFN_OUTPUT = r"(?<!attention\.)output\.dense|ffn\.lin2"
ATTENTION_OUTPUT = r"attention\.output\.dense|attention\.out_lin"
PLACEMENTS = {
    "pfeiffer": (FFN_OUTPUT,),
    "houlsby": (ATTENTION_OUTPUT, FFN_OUTPUT),
}


def bottleneck_size(hidden: int, size: int | None, reduction: int) -> int:
    """The adapter width m: `size` when given, else hidden // reduction (at least 1)."""
    return size if size is not None else max(1, hidden // reduction)


class BottleneckAdapter(nn.Module):
    """x + up(dropout(act(down(norm(x))))), the identity at initialisation.

    Args:
        hidden: the width d of the stream the adapter sits on.
        size: the bottleneck width m. When None, hidden // reduction.
        reduction: d / m when `size` is not given (16 in the Pfeiffer configuration).
        activation: "gelu", "relu" or "silu".
        layernorm: put a LayerNorm at the *entry* of the branch. The seed article put it after
            the residual sum, where it rescales the whole stream: the adapter is then no longer
            the identity at init and the pretrained model is disturbed before the first step.
            Inside the branch, up = 0 still makes the output exactly x.
        variant: "simple" (down, act, up) or "deep", the seed's two-stage adapter:
            down, LayerNorm, act, mid, LayerNorm, act, up.
    """

    def __init__(self, hidden: int, size: int | None = None, reduction: int = 16,
                 activation: str = "gelu", dropout: float = 0.0, layernorm: bool = False,
                 variant: str = "simple"):
        super().__init__()
        check_adapter_args(size, reduction, activation, dropout, variant)
        m = bottleneck_size(hidden, size, reduction)
        self.hidden, self.size, self.variant = hidden, m, variant
        self.norm = nn.LayerNorm(hidden) if layernorm else nn.Identity()
        self.down = nn.Linear(hidden, m)
        act = ACTIVATIONS[activation]
        if variant == "deep":
            self.mid = nn.Sequential(nn.LayerNorm(m), act(), nn.Linear(m, m), nn.LayerNorm(m))
        else:
            self.mid = nn.Identity()
        self.act = act()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(m, hidden)
        nn.init.zeros_(self.up.weight)  # the identity at init: the branch adds exactly 0
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = self.down(self.norm(x))  # (..., m)
        h = self.dropout(self.act(self.mid(h)))
        return x + self.up(h)  # (..., d)


def output_width(module: nn.Module) -> int | None:
    """The width of the last axis of a layer's output, for a layer whose output has its features
    last: `out_features` of a Linear (or of a wrapper around one), `nf` of transformers' Conv1D.
    None for anything else (a convolution has its channels on axis 1)."""
    if type(module).__name__ == "Conv1D":
        return getattr(module, "nf", None)
    width = getattr(module, "out_features", None)
    return width if isinstance(width, int) else None


class AdapterLinear(WrapsBase, nn.Module):
    """Runs `base`, then a bottleneck adapter on its output. `base` is kept, never copied.

    Model code that reads the wrapped layer (T5 checks `wo.weight.dtype`) reads it through the
    wrapper: `weight`, `bias`, `in_features`, `out_features`, and any other attribute of `base`."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base = base
        setattr(self, ADAPTER_PREFIX + "branch", adapter)

    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)
    out_features = property(lambda self: output_width(self.base))

    def forward(self, x):
        return self.adapter_branch(self.base(x))


def check_adapter_args(size, reduction, activation, dropout, variant) -> None:
    """Raise ValueError naming the valid choices when an Adapter setting is invalid."""
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"Adapter size must be a positive integer or None, got {size!r}.")
    if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction <= 0:
        raise ValueError(f"Adapter reduction must be a positive integer, got {reduction!r}; 16 is usual.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown adapter activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"Adapter dropout must be in [0, 1), got {dropout!r}.")
    if variant not in VARIANTS:
        raise ValueError(f"unknown adapter variant {variant!r}; choose one of {list(VARIANTS)}.")
