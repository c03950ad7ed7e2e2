"""SmoothQuant-style smoothing before int8 (Xiao et al., 2022): input channels rescaled so that
per-batch activation scales leave every channel enough int8 levels."""

from __future__ import annotations

import torch
from torch import nn

from ..core.targets import replace_module
from .common import linear_layers, merged_plain


class Smoothed(nn.Module):
    """``inner(x * inv_scale)``: a Linear whose input channels were rescaled before quantization.

    SmoothQuant's idea (Xiao et al., 2022): a few input channels carry most of an activation's
    range, and with one activation scale per batch they leave the other channels only a few int8
    levels. Dividing channel j of the input by s_j and multiplying column j of W by s_j changes
    nothing in exact arithmetic, and moves the range from the activations (quantized per batch)
    to the weights (quantized per output row, where it is cheap). BERT normalizes *after* the
    residual add, so 1/s cannot be folded into the LayerNorm: it stays here, as one
    multiply per input element, small beside the GEMM.
    """

    def __init__(self, inner: nn.Module, inv_scale: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("inv_scale", inv_scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.inv_scale.to(x.dtype))


@torch.no_grad()
def input_absmax(model: nn.Module, calibration, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |x| each of `layers` sees over the calibration batches."""
    stats, hooks = {}, []
    for name, m in layers.items():
        def hook(mod, inp, out, name=name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().amax(0).float()
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in calibration:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not stats:
        raise ValueError("the calibration data gave no batches: pass a few batches of model inputs.")
    return stats


def smooth(model: nn.Module, calibration, alpha: float = 0.8, skip="head", inplace: bool = False) -> nn.Module:
    """Wrap every Linear outside `skip` in `Smoothed`, with s_j = max|x_j|^alpha / max|W_j|^(1-alpha).

    calibration: an iterable of model-input dicts (a few hundred real examples is plenty).
    alpha: how much of the activation range moves to the weights (0: none, 1: all). 0.8 kept
    MiniLM within a point of fp32 on every domain (notebook 05; 0.5, SmoothQuant's default for
    large LMs, did not).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must lie in [0, 1].")
    model = merged_plain(model, inplace)
    layers = linear_layers(model, skip)
    stats = input_absmax(model, calibration, layers)
    with torch.no_grad():
        for name, lin in layers.items():
            if name not in stats:
                continue  # never reached by the calibration data: left as it is
            w_max = lin.weight.detach().abs().amax(0).float().clamp_min(1e-5)
            s = (stats[name].clamp_min(1e-5) ** alpha / w_max ** (1 - alpha)).clamp_min(1e-5)
            lin.weight.mul_(s.to(lin.weight.dtype))
            replace_module(model, name, Smoothed(lin, 1.0 / s))
    return model
