"""LoRA on convolutions (`nn.Conv1d`, `nn.Conv2d`, `nn.Conv3d`), with PEFT's factor shapes.

A convolution with weight W (out, in, k...) is a linear map on each patch of its input. LoRA
adds a rank-r update the way PEFT (and kohya's LoRA for Stable Diffusion) shape it:

    A: (r, in, k...)   a convolution with the base's kernel, stride, padding and dilation
    B: (out, r, 1...)  a 1x1 convolution
    y = conv(x, W) + s * conv(conv(x, A), B)

Composing the two is a single convolution whose weight is s * B A, with B (out, r) and A
(r, in * k...) flattened: so merging is exact, W + s B A reshaped to W's shape.

The fast path. Training runs the two convolutions (their backward is rank-r work, where folding
would compute a full (out, in, k...) weight gradient). Without a gradient and on enough output
positions P, folding first is cheaper: forming s B A costs r * out * in * k, the two-path
costs P * r * (in * k + out).

A is drawn as nn.Conv2d draws its weight (kaiming-uniform, a = sqrt 5), B starts at zero, so the
layer is its base at initialisation. Grouped convolutions are refused: their update is not one
low-rank product (PEFT cannot merge them either).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALayer
from .names import LORA_PREFIX

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FUNCTIONAL = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def conv_problem(base: nn.Module) -> str | None:
    """Why LoRA cannot wrap this convolution, or None when it can."""
    if not isinstance(base, CONVS):
        return f"LoRAConv wraps nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(base).__name__}"
    if base.groups != 1:
        return (f"it is a grouped convolution (groups={base.groups}): its update is not one low-rank "
                "product and could not be merged")
    return None


class LoRAConv(LoRALayer):
    """Wraps a frozen convolution and adds s * conv(conv(x, A), B) (see the module docstring)."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        problem = conv_problem(base)
        if problem:
            raise TypeError(f"cannot apply LoRA to this {type(base).__name__}: {problem}.")
        self._setup(base, r, alpha, dropout, rslora)
        w = base.weight  # (out, in, k...)
        kw = dict(dtype=w.dtype, device=w.device)
        ones = (1,) * (w.dim() - 2)
        setattr(self, LORA_PREFIX + "A", nn.Parameter(torch.empty(r, *w.shape[1:], **kw)))
        setattr(self, LORA_PREFIX + "B", nn.Parameter(torch.zeros(w.shape[0], r, *ones, **kw)))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._conv = _FUNCTIONAL[w.dim()]

    def delta_weight(self) -> torch.Tensor:
        """s * B A in the base weight's shape (out, in, k...) and dtype."""
        w = self.base.weight
        d = self.lora_B.flatten(1) @ self.lora_A.flatten(1)  # (out, r) @ (r, in * k...)
        return d.mul(self.scale).view(w.shape).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if self.merged:
            return base(x)
        A, B, s = self.lora_A, self.lora_B, self.scale
        needs_grad = torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or x.requires_grad
                                                  or base.weight.requires_grad)
        if not needs_grad and not (self.dropout_p > 0 and self.training):
            w = base.weight
            positions = x.numel() // max(w.shape[1], 1)  # about the output positions at stride 1
            k = w[0, 0].numel()
            if positions * (w.shape[1] * k + w.shape[0]) >= w.shape[0] * w.shape[1] * k:
                # Fold: one convolution with W + s B A (the padding mode and bias are the base's).
                return base._conv_forward(x, w + self.delta_weight(), base.bias)
        # Two-path: A runs with the base's stride, padding, dilation and padding mode; B is 1x1.
        h = base._conv_forward(self.lora_dropout(x), A, None)  # (N, r, ...)
        return base(x).add_(self._conv(h, B), alpha=s)
