"""What the compression modules share: which Linears to touch, and working on a merged copy."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.surgery import find_head, lora_layers, unload
from ..layers.names import under

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def _copy(model: nn.Module, inplace: bool) -> nn.Module:
    return model if inplace else copy.deepcopy(model)


def skip_prefix(model: nn.Module, skip) -> list[str]:
    if skip == "head":
        head = find_head(model)
        return [head] if head else []
    return list(skip or [])


def modules_of_type(model: nn.Module, kind: type, skip="head") -> dict[str, nn.Module]:
    """Every module of exactly `kind` (not a subclass) outside `skip` ("head": the task head; or a
    list of module names)."""
    prefixes = skip_prefix(model, skip)
    return {n: m for n, m in model.named_modules() if type(m) is kind
            and not any(under(n, p) for p in prefixes)}


def linear_layers(model: nn.Module, skip="head") -> dict[str, nn.Linear]:
    """Every plain nn.Linear outside `skip`."""
    return modules_of_type(model, nn.Linear, skip)


def merged_plain(model: nn.Module, inplace: bool) -> nn.Module:
    model = _copy(model, inplace)
    if lora_layers(model):
        unload(model)  # merge every LoRA and drop the wrappers: plain Linears with the same outputs
    return model


def row_scale(w: torch.Tensor, qmax: int) -> torch.Tensor:
    return (w.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
