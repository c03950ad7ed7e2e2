"""LoRA on `nn.MultiheadAttention`, with a real gradient.

`nn.MultiheadAttention` never calls its projections as modules: its forward hands
`in_proj_weight` (the packed query, key and value projection, (3E, E)) and `out_proj.weight`
straight to `F.multi_head_attention_forward`. A LoRA wrapped around `out_proj` is therefore never
run, and its factors never see a gradient: it "trains", to nothing.

This wrapper adapts both weights and runs the module's own forward on the adapted ones:

    in_proj_weight  <- W_in  + s B A        A: (r, E), B: (3E, r)
    out_proj.weight <- W_out + s B_o A_o    A_o: (r, E), B_o: (E, r)

through `torch.func.functional_call`, which swaps the two tensors in for the duration of the
call. Every option of the module (masks, batch_first, bias_k, dropout, need_weights, its fast
path) is its own code, and the gradient reaches A, B, A_o and B_o through the two sums. The
shapes and the file names are PEFT's (`lora_A`, `lora_B` on the module, and its out_proj's pair,
here `lora_out_A` and `lora_out_B`), so adapters interoperate. Forming the two adapted weights
costs r * 4E^2 multiply-adds per call, about what a dozen tokens of the projections cost.

`nn.TransformerEncoderLayer` has a fused inference path that reads `self_attn.in_proj_weight`
directly and would skip any wrapper; it is not taken while a forward hook is attached, so this
wrapper carries a no-op one. LoRA's input dropout has no place here (the update is added to the
weights, not computed from the input), so the method refuses dropout > 0 on this layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from .lora import LoRALayer
from .names import LORA_PREFIX


def attention_problem(base: nn.Module, dropout: float = 0.0) -> str | None:
    """Why LoRA cannot wrap this attention module, or None when it can."""
    if not isinstance(base, nn.MultiheadAttention):
        return f"LoRAMultiheadAttention wraps nn.MultiheadAttention, got {type(base).__name__}"
    if not base._qkv_same_embed_dim:
        return "its query, key and value have different widths (kdim/vdim), so it has no packed in_proj_weight"
    if dropout > 0:
        return ("LoRA dropout applies to a layer's input, and this update is added to the attention's "
                "weights; use dropout=0 for this target")
    return None


def _keep_fused_paths_off(module, args):
    """A no-op forward pre-hook: its presence turns off nn.TransformerEncoderLayer's fused path."""
    return None


class LoRAMultiheadAttention(LoRALayer):
    """Wraps a frozen nn.MultiheadAttention; LoRA on its in_proj and its out_proj."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        problem = attention_problem(base, dropout)
        if problem:
            raise TypeError(f"cannot apply LoRA to this {type(base).__name__}: {problem}.")
        self._setup(base, r, alpha, dropout, rslora)
        e = base.embed_dim
        kw = dict(dtype=base.in_proj_weight.dtype, device=base.in_proj_weight.device)
        for name, out in (("A", None), ("B", 3 * e), ("out_A", None), ("out_B", e)):
            shape = (r, e) if out is None else (out, r)
            setattr(self, LORA_PREFIX + name, nn.Parameter(torch.zeros(*shape, **kw)))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_out_A, a=math.sqrt(5))
        self.register_forward_pre_hook(_keep_fused_paths_off)

    def lr_multipliers(self) -> dict[str, float]:
        """LoRA+ speeds up both B factors: in_proj's and out_proj's."""
        return {LORA_PREFIX + n: self.lr_ratio for n in ("B", "out_B")} if self.lr_ratio != 1.0 else {}

    def _weights(self) -> dict[str, torch.Tensor]:
        b, s = self.base, self.scale
        return {"in_proj_weight": torch.addmm(b.in_proj_weight, self.lora_B, self.lora_A, alpha=s),
                "out_proj.weight": torch.addmm(b.out_proj.weight, self.lora_out_B, self.lora_out_A, alpha=s)}

    def delta_weight(self) -> torch.Tensor:
        """s * B A for the packed in_proj, (3E, E)."""
        return (self.lora_B @ self.lora_A).mul(self.scale).to(self.base.in_proj_weight.dtype)

    def out_delta_weight(self) -> torch.Tensor:
        """s * B_o A_o for out_proj, (E, E)."""
        return (self.lora_out_B @ self.lora_out_A).mul(self.scale).to(self.base.out_proj.weight.dtype)

    def weights(self):
        return [self.base.in_proj_weight, self.base.out_proj.weight]

    def deltas(self):
        return list(zip(self.weights(), (self.delta_weight(), self.out_delta_weight())))

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base(*args, **kwargs)
        return functional_call(self.base, self._weights(), args, kwargs)
