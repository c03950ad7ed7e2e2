"""Simulated k-bit quantization (2 to 8 bits, per tensor or per channel), and the orders in
which a LoRA and a quantized base can be merged and rounded."""

from __future__ import annotations

import copy

import pandas as pd
import torch
from torch import nn

from ..core.surgery import lora_layers
from ..core.targets import replace_module
from ..layers.lora import LoRALinear
from ..layers.names import under
from .common import merged_plain, row_scale, skip_prefix, linear_layers

# --------------------------------------------------------------------------- simulated k-bit

def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: simulated quantization supports whole numbers of bits from 2 to 8.")


def quantize_codes(w: torch.Tensor, bits: int, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: integer codes in [-(2^(b-1)-1), 2^(b-1)-1] and their scale(s).

    per_channel=True keeps one scale per output row (shape (out, 1)), False one for the tensor.
    """
    _check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().float()
    scale = row_scale(w, qmax) if per_channel else (w.abs().max() / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scale).clamp(-qmax, qmax).to(torch.int8)
    return codes, scale


def fake_quantize(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """`w` rounded to a `bits`-bit symmetric grid and mapped back to float (same dtype as `w`)."""
    codes, scale = quantize_codes(w, bits, per_channel)
    return (codes.float() * scale).to(w.dtype)


def quantization_error(model: nn.Module, bits: int, per_channel: bool = True, skip="head") -> pd.DataFrame:
    """Per Linear weight: MSE and max absolute error of `bits`-bit quantization, with a TOTAL row."""
    rows = []
    for name, m in linear_layers(merged_plain(model, False), skip).items():
        w = m.weight.detach().float()
        err = fake_quantize(w, bits, per_channel) - w
        rows.append({"layer": name, "params": w.numel(), "mse": float(err.pow(2).mean()),
                     "max_abs": float(err.abs().max()), "rel_err": float(err.norm() / w.norm())})
    df = pd.DataFrame(rows)
    total = {"layer": "TOTAL", "params": int(df.params.sum()),
             "mse": float((df.mse * df.params).sum() / df.params.sum()), "max_abs": float(df.max_abs.max()),
             "rel_err": float(df.rel_err.mean())}
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)


def error_sweep(model: nn.Module, bits=range(2, 9), skip="head") -> pd.DataFrame:
    """TOTAL error per (bits, scheme): how much per-channel scales buy at each width."""
    rows = []
    for b in bits:
        for pc in (False, True):
            t = quantization_error(model, b, pc, skip).iloc[-1]
            rows.append({"bits": b, "scheme": "per-channel" if pc else "per-tensor", "mse": t.mse,
                         "max_abs": t.max_abs, "rel_err": t.rel_err})
    return pd.DataFrame(rows)


def simulate_kbit(model: nn.Module, bits: int, per_channel: bool = True, skip="head", inplace: bool = False) -> nn.Module:
    """A copy whose Linear weights (LoRA merged first) are rounded to `bits` bits, in float."""
    _check_bits(bits)
    model = merged_plain(model, inplace)
    with torch.no_grad():
        for m in linear_layers(model, skip).values():
            m.weight.copy_(fake_quantize(m.weight, bits, per_channel))
    return model


def quantize_base(model: nn.Module, bits: int = 4, per_channel: bool = True, skip="head", inplace: bool = False) -> nn.Module:
    """QLoRA's starting point, simulated: every base Linear frozen at `bits` bits.

    Apply a LoRA to the result and train it: the LoRA learns on top of the rounded base, so its
    update can make up for part of the rounding. (Real QLoRA also stores the base in 4 bits and
    uses the NF4 grid; this keeps float storage and the symmetric grid, so it shows the accuracy
    effect only.)
    """
    if lora_layers(model):
        raise ValueError("quantize_base expects the plain base model: quantize it first, then apply the LoRA.")
    model = simulate_kbit(model, bits, per_channel, skip, inplace)
    return model


def merge_into_quantized(codes: torch.Tensor, scale: torch.Tensor, delta: torch.Tensor, bits: int,
                         per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge an update into an already-quantized weight: dequantize, add `delta`, requantize."""
    if delta.shape != codes.shape:
        raise ValueError(f"the update has shape {tuple(delta.shape)} but the quantized weight {tuple(codes.shape)}.")
    return quantize_codes(codes.float() * scale + delta.float(), bits, per_channel)


ORDERS = ("merge then quantize", "quantize then merge", "unmerged LoRA on quantized base")


def quantized_with_lora(model: nn.Module, bits: int, order: str, per_channel: bool = True, skip="head") -> nn.Module:
    """A copy of a LoRA model deployed on a `bits`-bit base in one of the three ORDERS.

    "merge then quantize" rounds W + sBA; "quantize then merge" rounds W, then merges sBA into
    the rounded weight (dequantize, add, requantize); "unmerged LoRA on quantized base" rounds W
    and keeps the LoRA beside it in float (QLoRA's deployment). Every other Linear is rounded too.
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not one of {list(ORDERS)}.")
    if not lora_layers(model):
        raise ValueError("quantized_with_lora needs a model with LoRA layers.")
    if order == "merge then quantize":
        return simulate_kbit(model, bits, per_channel, skip)
    model = copy.deepcopy(model)
    was_merged = {m: m.merged for m in lora_layers(model)}
    for m in was_merged:
        m.unmerge()
    prefixes = skip_prefix(model, skip)
    with torch.no_grad():
        for name, m in model.named_modules():
            if type(m) is nn.Linear and not any(under(name, p) for p in prefixes):
                m.weight.copy_(fake_quantize(m.weight, bits, per_channel))
    if order == "unmerged LoRA on quantized base":
        return model
    with torch.no_grad():
        for m in lora_layers(model):
            codes, scale = quantize_codes(m.base.weight, bits, per_channel)
            codes, scale = merge_into_quantized(codes, scale, m.delta_weight(), bits, per_channel)
            m.base.weight.copy_(codes.float() * scale)
    _strip_without_merge(model)
    return model


def _strip_without_merge(model: nn.Module) -> None:
    """Drop LoRA wrappers whose update is already inside the base weight."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        replace_module(model, name, m.base)
    if hasattr(model, "peftkit"):
        del model.peftkit


def merge_order_errors(model: nn.Module, bits: int = 4, per_channel: bool = True) -> pd.DataFrame:
    """Per LoRA layer and order, the error against the exact merged weight W + sBA (MSE, relative
    to W + sBA, and relative to the update sBA itself) for three deployments:

    * merge then quantize: Q(W + sBA);
    * quantize then merge: dequantize Q(W), add sBA, requantize (`merge_into_quantized`);
    * quantized base, LoRA kept unmerged in float: Q(W) + sBA.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("merge_order_errors needs a model with LoRA layers.")
    rows = []
    for name, m in layers.items():
        w = m.base.weight.detach().float()
        if m.merged:
            w = w - m.delta_weight().float()
        d = m.delta_weight().detach().float()
        exact = w + d
        codes, scale = quantize_codes(w, bits, per_channel)
        orders = {"merge then quantize": fake_quantize(exact, bits, per_channel),
                  "quantize then merge": (lambda c, s: c.float() * s)(*merge_into_quantized(codes, scale, d, bits, per_channel)),
                  "unmerged LoRA on quantized base": codes.float() * scale + d}
        for order, approx in orders.items():
            err = approx - exact
            rows.append({"layer": name, "order": order, "mse": float(err.pow(2).mean()),
                         "rel_err": float(err.norm() / exact.norm()),
                         # above 1: the error is larger than the whole LoRA update it was meant to add
                         "err_vs_update": float(err.norm() / d.norm().clamp_min(1e-12))})
    return pd.DataFrame(rows)
