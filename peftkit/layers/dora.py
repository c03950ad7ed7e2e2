"""DoRA: weight-decomposed low-rank adaptation of a frozen linear layer.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (ICML 2024), eq. (5):

    W = m * (W0 + s B A) / ||W0 + s B A||_c

where ||.||_c is the norm of each output unit's weight vector (a row of PyTorch's (out, in)
weight; the paper's column of its (in, out) one), and m, one magnitude per output unit, trains
beside A and B. m starts at ||W0||_c and B at zero, so the layer is its base at initialisation.
Section 4.3: the norm is treated as a constant in backward (detached), which saves memory and,
the paper reports, changes accuracy little. PEFT's `use_dora=True` does the same, and keeps m
as `lora_magnitude_vector`.

Written with V = W0 + s B A (out, in), n = ||V||_c (constant), f = m / n and z = x V^T:

    y = f * z + b                                            (the bias is not rescaled)
    dm = sum_tokens(g * z) / n,   g' = g * f,   dx = g' V
    dA = s (g' B)^T x,   dB = s g'^T (x A^T)                  (LoRA's backward, on g')

so the fast path is `LoRALinear`'s: one GEMM with the folded V, the skinny dA and dB products,
plus a row norm of V and three elementwise passes over the (tokens, out) output.

A merge writes f * V into the base weight. Unmerging divides by the f of that merge (its norm is
kept) and subtracts s B A again, as PEFT does; a zero magnitude cannot be divided out, so
merging refuses one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALinear, MergeError
from .names import LORA_PREFIX


class _DoRAFunction(torch.autograd.Function):
    """y = (m / ||V||) * x V^T + b with V = W + s B A; gradients for x, A, B and m."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scale):
        V = torch.addmm(weight, lora_B, lora_A, alpha=scale)  # (out, in)
        norm = torch.linalg.vector_norm(V, dim=1)  # (out,): a constant for backward (paper, 4.3)
        f = magnitude / norm  # (out,)
        z = F.linear(x, V)  # (..., out): the one big GEMM
        y = z * f if bias is None else torch.addcmul(bias, z, f)  # one pass over (..., out) for scale and bias
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        x_r = F.linear(x2, lora_A) if ctx.needs_input_grad[4] else None  # (T, r), for dB
        ctx.save_for_backward(x2, V, lora_B, x_r, z if ctx.needs_input_grad[5] else None, f, norm)
        ctx.scale, ctx.x_shape = scale, x.shape
        ctx.dtypes = (x.dtype, lora_A.dtype, lora_B.dtype, magnitude.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x2, V, lora_B, x_r, z, f, norm = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (T, out)
        dt = g.dtype
        grad_x = grad_A = grad_B = grad_m = None
        if ctx.needs_input_grad[5]:
            grad_m = ((g * z.reshape(g.shape).to(dt)).sum(0) / norm.to(dt)).to(ctx.dtypes[3])  # (out,)
        g = (g * f.to(dt)).contiguous()  # g' = g * f: the rest is LoRA's backward
        if ctx.needs_input_grad[3]:
            g_rT = lora_B.to(dt).t() @ g.t()  # (r, T)
            grad_A = torch.addmm(g.new_zeros(()), g_rT, x2.to(dt), beta=0, alpha=s).to(ctx.dtypes[1])
        if ctx.needs_input_grad[4]:
            grad_B = torch.addmm(g.new_zeros(()), x_r.to(dt).t(), g, beta=0, alpha=s).t().contiguous().to(ctx.dtypes[2])
        if ctx.needs_input_grad[0]:
            grad_x = (g @ V.to(dt)).view(ctx.x_shape).to(ctx.dtypes[0])
        return grad_x, None, None, grad_A, grad_B, grad_m, None


class DoRALinear(LoRALinear):
    """`LoRALinear` plus a trainable magnitude per output unit: W = m * V / ||V||, V = W0 + s B A.

    Takes LoRALinear's arguments (PiSSA's `init` too). The magnitude is `lora_magnitude`, (out,),
    under the LoRA prefix, so freezing, counting and saving see it as adapter state."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, fan_in_fan_out: bool | None = None, init: str = "lora"):
        super().__init__(base, r, alpha, dropout, rslora, fan_in_fan_out, init)
        with torch.no_grad():
            w = self._weight()
            m = torch.linalg.vector_norm(torch.addmm(w, self.lora_B, self.lora_A, alpha=self.scale), dim=1)
        setattr(self, LORA_PREFIX + "magnitude", nn.Parameter(m.to(w.dtype)))
        self.register_buffer("_merged_norm", None, persistent=False)

    def _direction(self) -> torch.Tensor:
        """V = W0 + s B A (PiSSA: its residual + s B A), (out, in), from the unmerged weight."""
        return torch.addmm(self._weight(), self.lora_B, self.lora_A, alpha=self.scale)

    def _layout(self, w: torch.Tensor) -> torch.Tensor:
        return w.t() if self.fan_in_fan_out else w

    def _original(self) -> torch.Tensor:
        """W0 in (out, in), also while merged (recovered from the merged weight)."""
        w = self._layout(self.base.weight)
        if not self.merged:
            return w
        f = self.lora_magnitude / self._merged_norm
        return w / f[:, None] - self._layout(super().delta_weight())

    def delta_weight(self) -> torch.Tensor:
        """The merged weight minus W0, in the base weight's layout and dtype."""
        w0 = self._original()
        V = w0 + self._layout(super().delta_weight())
        d = V * (self.lora_magnitude / torch.linalg.vector_norm(V, dim=1))[:, None] - w0
        return self._layout(d.to(self.base.weight.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        V = self._direction()
        norm = torch.linalg.vector_norm(V, dim=1)
        merged = V * (self.lora_magnitude / norm)[:, None]
        if not torch.isfinite(merged).all() or not (self.lora_magnitude != 0).all():
            raise MergeError(
                "merging this DoRA would put NaN or inf into the base weight, or it has a zero "
                "magnitude that unmerge could not divide out; the weight is unchanged. Check the "
                "adapter's A, B and lora_magnitude (a diverged run?) before merging.")
        self.base.weight.copy_(self._layout(merged))
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.copy_(self._layout(self._original()))
        self._merged_norm = None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        b = self.base.bias
        w = self._weight()  # (out, in)
        A, B, m, s = self.lora_A, self.lora_B, self.lora_magnitude, self.scale
        plain = (self.dropout_p > 0 and self.training) or w.requires_grad or (b is not None and b.requires_grad)
        if plain:
            # Dropout (a fresh mask per token) or an unfrozen base: plain autograd, as the paper's
            # eq. (5) reads, with the norm detached.
            with torch.no_grad():
                norm = torch.linalg.vector_norm(torch.addmm(w, B, A, alpha=s), dim=1)
            h = F.linear(self.lora_dropout(x), A)  # (..., r)
            y = F.linear(x, w).add_(F.linear(h, B), alpha=s) * (m / norm)
            return y + b if b is not None else y
        if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or m.requires_grad or x.requires_grad):
            return _DoRAFunction.apply(x, w, b, A, B, m, s)
        V = torch.addmm(w, B, A, alpha=s)
        return F.linear(x, V * (m / torch.linalg.vector_norm(V, dim=1))[:, None], b)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"
