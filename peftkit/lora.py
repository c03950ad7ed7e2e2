"""LoRA: low-rank adaptation of a frozen linear layer.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), section 4.1:

    h = W0 x + (alpha / r) * B A x,     A: (r, in), B: (out, r)

W0 stays frozen; only A and B train. A starts kaiming-uniform and B starts at zero, so the
layer equals its base at initialisation. rsLoRA (Kalajdzievski, 2023) scales by
alpha / sqrt(r) instead, which keeps the update's magnitude stable as r grows.

The fast path. With dropout 0 the update is linear in x, so

    y = x (W0 + s B A)^T + b

and forming W0 + s B A costs r * in * out multiply-adds, about r / tokens of the main matmul
(0.4% at r=8 and 2,048 tokens). One GEMM then does the work a plain nn.Linear does, instead of
a GEMM plus two skinny ones and an extra add over the (tokens, out) output. The backward pass
gets dA and dB from skinny products in the r-dimensional space:

    g_r = g B            (tokens, r)      dA = s * g_r^T x      (r, in)
    x_r = x A^T          (tokens, r)      dB = s * g^T x_r      (out, r)

With dropout > 0 each token sees a different mask, so the update no longer folds into the
weight and the plain two-path formula is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .names import LORA_PREFIX


class MergeError(RuntimeError):
    """Merging would write NaN or inf into a base weight."""


class _LoRAFunction(torch.autograd.Function):
    """y = x (W + s B A)^T + b, with gradients for x, A and B (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale):
        # (out, r) @ (r, in): the merged weight, formed on the fly, never stored on the layer.
        w_eff = torch.addmm(weight, lora_B, lora_A, alpha=scale)
        y = F.linear(x, w_eff, bias)
        # (r, T): taken while x is still warm in cache from the main GEMM; dB needs it.
        x_rT = lora_A @ x.reshape(-1, x.shape[-1]).t() if ctx.needs_input_grad[4] else None
        ctx.save_for_backward(x, w_eff, lora_A, lora_B, x_rT)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, w_eff, lora_A, lora_B, x_rT = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.contiguous().view(-1, grad_out.shape[-1])  # (T, out), one copy at most
        # Under autocast the forward ran in a lower precision than the fp32 factors: do the
        # products in the gradient's dtype, and hand each gradient back in its input's dtype.
        dt = g.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (T, in)
        grad_x = grad_A = grad_B = None
        # The skinny products are laid out (r, T) @ (T, n): on CPU BLAS that is 2-3x faster than
        # the (T, n) @ (n, r) orientation, because the long T axis is the reduction.
        if ctx.needs_input_grad[3]:
            g_rT = lora_B.to(dt).t() @ g.t()  # (r, T)
            grad_A = (g_rT @ x2).mul_(s).to(lora_A.dtype)  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_B = (x_rT.to(dt) @ g).mul_(s).t().contiguous().to(lora_B.dtype)  # (out, r)
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w_eff.to(dt)).view(x.shape).to(x.dtype)  # (T, in)
        return grad_x, None, None, grad_A, grad_B, None


def check_lora_args(r: int, alpha: float, dropout: float) -> None:
    """Raise ValueError with the accepted range when a LoRA hyperparameter is out of range."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}; try r=8.")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}; alpha=2*r is common.")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")


class LoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` and adds a trainable low-rank update ``s * B A``.

    Args:
        base: the layer to adapt. It is kept as ``self.base`` and frozen, never copied.
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by alpha/r (alpha/sqrt(r) with rslora).
        dropout: dropout on the input of the low-rank path only.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}.")
        check_lora_args(r, alpha, dropout)
        self.base = base
        self.r, self.alpha, self.rslora = r, float(alpha), bool(rslora)
        self.scale = self.alpha / (math.sqrt(r) if rslora else r)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        kw = dict(dtype=w.dtype, device=w.device)
        setattr(self, LORA_PREFIX + "A", nn.Parameter(torch.empty(r, base.in_features, **kw)))
        setattr(self, LORA_PREFIX + "B", nn.Parameter(torch.zeros(base.out_features, r, **kw)))
        # Same init as nn.Linear's weight (and as the paper's reference code): B = 0 makes the
        # update zero at the start while A already spreads the input over r directions.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def delta_weight(self) -> torch.Tensor:
        """The update s * B A, shape (out, in), in the base weight's dtype."""
        return (self.lora_B @ self.lora_A).mul(self.scale).to(self.base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.base.weight, self.base.bias
        if self.merged:
            return F.linear(x, w, b)
        if self.dropout_p > 0 and self.training:
            # Plain path: a fresh mask per token means the update cannot fold into W.
            h = F.linear(self.lora_dropout(x), self.lora_A)  # (..., r)
            return F.linear(x, w, b) + F.linear(h, self.lora_B) * self.scale
        A, B = self.lora_A, self.lora_B
        if w.requires_grad or (b is not None and b.requires_grad):
            # Someone unfroze the base: let autograd see every term.
            return F.linear(x, w, b) + F.linear(F.linear(x, A), B) * self.scale
        if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or x.requires_grad):
            return _LoRAFunction.apply(x, w, b, A, B, self.scale)
        return F.linear(x, torch.addmm(w, B, A, alpha=self.scale), b)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight. Calling it twice changes nothing."""
        if self.merged:
            return
        merged = self.base.weight + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise MergeError(
                "merging this LoRA would put NaN or inf into the base weight; the weight is "
                "unchanged. Check the adapter's A and B for NaN (a diverged run?) before merging.")
        self.base.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again, restoring W0 up to float rounding. Idempotent."""
        if not self.merged:
            return
        self.base.weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        rs = ", rslora" if self.rslora else ""
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout_p}{rs}, merged={self.merged}"
