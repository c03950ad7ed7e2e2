"""A faster dropout for CPU training, a drop-in for ``nn.Dropout``.

PyTorch's CPU dropout draws one float from the Mersenne twister for every element
(``bernoulli_``), writes a float mask, and keeps that 4-byte mask for the backward pass. On MiniLM
that is 13 dropout layers over (tokens, 384) activations every step.

``FastDropout`` draws 64-bit random words, one per four elements, and reads each word as four
16-bit lanes: an element is kept when its lane is at or above a threshold. So

    P(drop) = k / 65536,   k = round(p * 65536),     kept values are scaled by 65536 / (65536 - k)

which is p to within 1/131072 (p = 0.1 becomes 0.100006), and the scale makes the expectation
exact for the probability actually used. The mask is kept as bool (1 byte an element instead of 4),
and both passes apply it with one ``where`` and one in-place multiply
(`benchmarks/bench_dropout.py` times it against the built-in).

It draws from torch's global CPU generator, so ``torch.manual_seed`` makes it reproducible and a
checkpoint's RNG state resumes it exactly; it is serial, so the masks do not depend on the thread
count. Off the CPU (CUDA, MPS), in eval mode, at p = 0 or with ``inplace=True`` it is the built-in
dropout, unchanged. In eval mode both are the identity, so a model's predictions never change.

`fit` uses it when ``TrainConfig(fast_dropout=True)`` (CLI ``--fast-dropout``). It is not the
default because its masks come from another random stream: a run with it is as good as one
without, but not bit-equal to it, and results cached or published from torch's dropout would
no longer reproduce exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LANES = 65536  # a 16-bit lane takes this many values


def _threshold(p: float) -> tuple[int, float]:
    """(the lowest kept lane value as int16, the scale of kept elements) for dropout probability p."""
    k = min(round(p * _LANES), _LANES - 1)  # p just under 1 still keeps a lane value
    return k - _LANES // 2, _LANES / (_LANES - k)


class _DropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold: int, scale: float):
        n = x.numel()
        words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = words.view(torch.int16)[:n].view(x.shape) >= threshold  # bool, contiguous, x's shape
        ctx.save_for_backward(keep)
        ctx.scale = scale
        # where() then one in-place scale: measured faster than x * keep (a bool-to-float cast
        # per element) and than where(keep, x * scale, 0) (a temporary the size of x).
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None, None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Functional form of ``FastDropout``; falls back to ``F.dropout`` off the CPU."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}.")
    if not training or p == 0 or x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training)
    threshold, scale = _threshold(p)
    return _DropoutFunction.apply(x, threshold, scale)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper CPU mask (see the module docstring). Same arguments, same
    state dict (none), and ``isinstance(m, nn.Dropout)`` holds, so code that sets ``m.p`` works."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return fast_dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every plain ``nn.Dropout`` inside `model` by a ``FastDropout`` with the same p, in
    place; returns how many were replaced. Subclasses of nn.Dropout are left alone. Idempotent."""
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                fast = FastDropout(child.p, inplace=child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                count += 1
    return count


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
