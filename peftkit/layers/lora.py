"""LoRA: low-rank adaptation of a frozen linear layer (nn.Linear, or transformers' Conv1D).

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

x_r is taken in the forward pass, right after the main GEMM has brought x into cache. The scale
s rides on the dA and dB GEMMs (addmm's alpha) rather than on a separate pass.

Folding is not free: it reads W0 and writes and re-reads an (out, in) matrix, while the two-path
formula costs rank-r passes over the (tokens, in) input and (tokens, out) output. So folding
pays from about in * out / (in + out) tokens on (192 at 384x384, 2,048 at 4096x4096); with
fewer tokens, e.g. generating one token at a time, the layer uses the two-path formula.

With dropout > 0 each token sees a different mask, so the update no longer folds into the
weight and the plain two-path formula is used.

GPT-2's `Conv1D` is a linear layer that stores its weight transposed, (in, out) ("fan_in_fan_out"
in PEFT). `LoRALinear` wraps it too: A and B keep their (r, in) and (out, r) shapes, the formulas
run on a transposed view of the weight, and a merge adds (s B A)^T.

`LoRALayer` holds what every LoRA wrapper shares (this one, and those for convolutions,
embeddings and nn.MultiheadAttention in the sibling modules): r, alpha, the scale, and merges
that are idempotent, refuse NaN or inf, and restore W0 on unmerge.

PiSSA (Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation", 2024)
starts A and B from the top-r singular triplets of W0 = U S V^T instead of (kaiming, 0):

    B0 = U_r sqrt(S_r / s),   A0 = sqrt(S_r / s) V_r^T,   so  s B0 A0 = U_r S_r V_r^T

and trains them on the residual W0 - s B0 A0. peftkit never writes into a base weight (a base is
shared between adapters), so `init="pissa"` keeps W0 and the frozen B0, A0 (buffers, not saved:
the truncated SVD of the same base is the same product) and computes with

    W = (W0 - s B0 A0) + s B A

which is PiSSA's weight exactly, and W0 again at initialisation. Its update against W0 is
s (B A - B0 A0): a rank-2r LoRA [B, -B0] [A; A0], which is how `export_peft` hands it to PEFT
(PEFT converts PiSSA to plain LoRA the same way when it saves one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .names import LORA_PREFIX
from .wrap import WrapsBase


INITS = ("lora", "pissa")  # kaiming A and zero B (the paper's); PiSSA's principal singular vectors


class MergeError(RuntimeError):
    """Merging would write NaN or inf into a base weight."""


class _LoRAFunction(torch.autograd.Function):
    """y = x (W + s B A)^T + b, with gradients for x, A and B (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale):
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        # (out, in) + s * (out, r) @ (r, in) in one addmm: the merged weight, formed on the fly and
        # never stored on the layer.
        w_eff = torch.addmm(weight, lora_B, lora_A, alpha=scale)
        y = F.linear(x, w_eff, bias)  # (..., out): the one big GEMM, as in nn.Linear
        x2 = x.reshape(-1, x.shape[-1])  # (T, in); a view unless x is non-contiguous
        # x_r = x A^T, (T, r); only dB needs it. Taken now, while x is still warm in cache from the
        # main GEMM. As F.linear ((T, in) @ (in, r), A transposed inside BLAS) it measured as fast
        # as or faster than A @ x^T -> (r, T), and its transpose feeds dB below without a copy.
        x_r = F.linear(x2, lora_A) if need_B else None
        # Save only what backward reads: x for dA, B for g_r and dA, w_eff for dx, x_r for dB.
        ctx.save_for_backward(x2 if need_A else None, w_eff if need_x else None,
                              lora_B if need_A else None, x_r)
        ctx.scale, ctx.x_shape = scale, x.shape
        ctx.dtype_x, ctx.dtype_A, ctx.dtype_B = x.dtype, lora_A.dtype, lora_B.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x2, w_eff, lora_B, x_r = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (T, out)
        if not g.is_contiguous():
            g = g.contiguous()  # one copy at most; every product below wants unit inner stride
        # Under autocast the forward ran in a lower precision than the fp32 factors: do the
        # products in the gradient's dtype (.to is free when they already agree), and hand each
        # gradient back in its input's dtype.
        dt = g.dtype
        if x2 is not None:
            x2 = x2.to(dt)
        if lora_B is not None:
            lora_B = lora_B.to(dt)
        if x_r is not None:
            x_r = x_r.to(dt)
        grad_x = grad_A = grad_B = None
        # The skinny products are laid out (r, T) @ (T, n): on CPU BLAS that is faster than
        # the (T, n) @ (n, r) orientation (benchmarks/bench_layers.py), because the long T axis is the reduction. addmm with
        # beta=0 applies the scale s inside the GEMM (its 0-d `input` is never read), which saves a
        # separate mul_ over the result.
        if ctx.needs_input_grad[3]:
            g_rT = lora_B.t() @ g.t()  # (r, T) = (g B)^T
            grad_A = torch.addmm(g.new_zeros(()), g_rT, x2, beta=0, alpha=s).to(ctx.dtype_A)  # (r, in)
        if ctx.needs_input_grad[4]:
            # (r, T) @ (T, out) -> (r, out), then into B's (out, r) layout: a copy of out*r floats.
            grad_B = torch.addmm(g.new_zeros(()), x_r.t(), g, beta=0, alpha=s).t().contiguous().to(ctx.dtype_B)
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w_eff.to(dt)).view(ctx.x_shape).to(ctx.dtype_x)  # (T, out) @ (out, in): the other big GEMM
        return grad_x, None, None, grad_A, grad_B, None


def check_lora_args(r: int, alpha: float, dropout: float) -> None:
    """Raise ValueError with the accepted range when a LoRA hyperparameter is out of range."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}; try r=8.")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}; alpha=2*r is common.")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")


class LoRALayer(WrapsBase, nn.Module):
    """What every LoRA wrapper shares: the frozen `base`, r, alpha, the scale, and exact, idempotent,
    NaN-checked merges. A subclass creates its factors (names starting with `lora_`) and says which
    base weights a merge changes, and by how much, in `deltas()`."""

    def _setup(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        check_lora_args(r, alpha, dropout)
        self.base = base
        self.r, self.alpha, self.rslora = r, float(alpha), bool(rslora)
        self.scale = self.alpha / (math.sqrt(r) if rslora else r)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)
        self.merged = False
        self.lr_ratio = 1.0  # LoRA+: B's learning rate over A's, read by fit through lr_multipliers()

    _B_NAME = LORA_PREFIX + "B"  # the factor LoRA+ speeds up: B, (out, r)

    def lr_multipliers(self) -> dict[str, float]:
        """{local parameter name: learning-rate multiplier} for `fit`'s parameter groups: LoRA+'s
        lr_ratio on B; empty for plain LoRA."""
        return {self._B_NAME: self.lr_ratio} if self.lr_ratio != 1.0 else {}

    def weights(self) -> list[torch.Tensor]:
        """The base weights the layer adapts (the ones a merge changes)."""
        return [self.base.weight]

    def deltas(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(base weight, the update merging adds to it, in that weight's layout and dtype), one pair
        per weight the layer adapts."""
        return [(self.base.weight, self.delta_weight())]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight(s). Calling it twice changes nothing."""
        if self.merged:
            return
        merged = [(w, w + d) for w, d in self.deltas()]
        if not all(torch.isfinite(m).all() for _, m in merged):
            raise MergeError(
                "merging this LoRA would put NaN or inf into the base weight; the weight is "
                "unchanged. Check the adapter's A and B for NaN (a diverged run?) before merging.")
        for w, m in merged:
            w.copy_(m)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again, restoring W0 up to float rounding. Idempotent."""
        if not self.merged:
            return
        for w, d in self.deltas():
            w.sub_(d)
        self.merged = False

    def extra_repr(self) -> str:
        rs = ", rslora" if self.rslora else ""
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout_p}{rs}, merged={self.merged}"


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2's projections): a linear layer whose weight is stored
    (in, out), "fan_in_fan_out". Recognised by shape, so layers need not import transformers."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, torch.Tensor)
            and w.dim() == 2 and w.shape[1] == module.nf)


class LoRALinear(LoRALayer):
    """Wraps a frozen ``nn.Linear`` (or transformers' ``Conv1D``) and adds a trainable low-rank
    update ``s * B A``.

    Args:
        base: the layer to adapt. It is kept as ``self.base`` and frozen, never copied.
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by alpha/r (alpha/sqrt(r) with rslora).
        dropout: dropout on the input of the low-rank path only.
        fan_in_fan_out: the base stores its weight as (in, out), as GPT-2's ``Conv1D`` does (PEFT's
            name for it). None: detect ``Conv1D``. A and B keep PEFT's shapes, (r, in) and (out, r),
            either way, so files interoperate; only the merge adds the transposed update.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, fan_in_fan_out: bool | None = None, init: str = "lora"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown LoRA init {init!r}; choose one of {INITS}.")
        conv1d = is_conv1d(base)
        if not isinstance(base, nn.Linear) and not conv1d:
            raise TypeError(f"LoRALinear wraps nn.Linear or transformers' Conv1D, got {type(base).__name__}.")
        self.fan_in_fan_out = conv1d if fan_in_fan_out is None else bool(fan_in_fan_out)
        self._setup(base, r, alpha, dropout, rslora)
        w = base.weight
        kw = dict(dtype=w.dtype, device=w.device)
        setattr(self, LORA_PREFIX + "A", nn.Parameter(torch.empty(r, self.in_features, **kw)))
        setattr(self, LORA_PREFIX + "B", nn.Parameter(torch.zeros(self.out_features, r, **kw)))
        # Same init as nn.Linear's weight (and as the paper's reference code): B = 0 makes the
        # update zero at the start while A already spreads the input over r directions.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.init = init
        if init == "pissa":
            self._pissa_init()

    @torch.no_grad()
    def _pissa_init(self) -> None:
        """A and B from W0's top-r singular triplets (module docstring); B0, A0 kept frozen."""
        w = self.base.weight
        w = w.t() if self.fan_in_fan_out else w  # (out, in)
        if w.is_meta:  # a shape-only skeleton (file checks): no values to decompose
            A0, B0 = torch.empty_like(self.lora_A), torch.empty_like(self.lora_B)
        else:
            U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)  # float32 even for bf16 weights
            root = (S[: self.r] / self.scale).sqrt()  # (r,)
            B0 = (U[:, : self.r] * root).to(w.dtype)  # (out, r)
            A0 = (root[:, None] * Vh[: self.r]).to(w.dtype)  # (r, in)
        self.lora_A.copy_(A0)
        self.lora_B.copy_(B0)
        # Not persistent: recomputed from the same base on load, so files hold only A and B.
        self.register_buffer(LORA_PREFIX + "A0", A0.clone(), persistent=False)
        self.register_buffer(LORA_PREFIX + "B0", B0.clone(), persistent=False)

    def _weight(self) -> torch.Tensor:
        """The frozen weight the update is added to, (out, in): W0, or W0 - s B0 A0 under PiSSA."""
        w = self.base.weight
        w = w.t() if self.fan_in_fan_out else w
        if self.init == "pissa":
            w = torch.addmm(w, self.lora_B0, self.lora_A0, alpha=-self.scale)
        return w

    in_features = property(lambda self: self.base.weight.shape[0 if self.fan_in_fan_out else 1])
    out_features = property(lambda self: self.base.weight.shape[1 if self.fan_in_fan_out else 0])
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def delta_weight(self) -> torch.Tensor:
        """The update s * B A in the base weight's layout ((out, in); (in, out) for Conv1D) and dtype."""
        d = self.lora_B @ self.lora_A
        if self.init == "pissa":
            d = d - self.lora_B0 @ self.lora_A0  # exactly zero at initialisation
        d = d.mul(self.scale).to(self.base.weight.dtype)
        return d.t() if self.fan_in_fan_out else d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        b = self.base.bias
        w = self._weight()  # (out, in): a view of W0 (transposed for Conv1D), or PiSSA's residual
        A, B, s = self.lora_A, self.lora_B, self.scale
        if self.dropout_p > 0 and self.training:
            # Plain path: a fresh mask per token means the update cannot fold into W.
            h = F.linear(self.lora_dropout(x), A)  # (..., r)
            # add_ into the base output (its backward does not need it) spares one (..., out) pass.
            return F.linear(x, w, b).add_(F.linear(h, B), alpha=s)
        n_out, n_in = w.shape
        # Folding s*B@A into W costs passes over an (out, in) matrix; the two-path formula costs
        # rank-r passes over (T, in) and (T, out). Below T = in*out/(in+out) tokens (192 at
        # 384x384, 2,048 at 4096x4096), e.g. token-by-token generation, the two-path is cheaper.
        few_tokens = x.numel() * (n_in + n_out) < n_in * n_in * n_out
        if few_tokens or w.requires_grad or (b is not None and b.requires_grad):
            # Two-path; also when someone unfroze the base, so autograd sees every term.
            return F.linear(x, w, b).add_(F.linear(F.linear(x, A), B), alpha=s)
        if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or x.requires_grad):
            return _LoRAFunction.apply(x, w, b, A, B, s)
        return F.linear(x, torch.addmm(w, B, A, alpha=s), b)

    def extra_repr(self) -> str:
        init = f", init={self.init}" if self.init != "lora" else ""
        return super().extra_repr() + (", fan_in_fan_out" if self.fan_in_fan_out else "") + init
