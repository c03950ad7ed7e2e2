"""bf16 inference forms: the model's class swapped for one whose forward runs in bf16 (autocast, or
weights cast once) and returns fp32 outputs; and whether this device has bf16 in hardware."""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from .. import runtime

_CLASSES: dict = {}  # (plain class, mode) -> its subclass with the bf16 forward


def _bf16_forward(self, *args, **kwargs):
    mode = type(self)._peftkit_bf16
    device = next(self.parameters()).device.type
    ctx = torch.autocast(device, dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    with ctx:
        out = super(type(self), self).forward(*args, **kwargs)
    return to_fp32(out)


def to_fp32(out):
    """The output with every floating tensor in fp32 (logits of a bf16 model come out bf16)."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):  # transformers' ModelOutput is a dict: set the fields in place
        for k, v in list(out.items()):
            out[k] = to_fp32(v)
        return out
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(to_fp32(v) for v in out)
    return out


def plain_class(model: nn.Module) -> type:
    """The model's class without peftkit's bf16 forward."""
    cls = type(model)
    return cls.__mro__[1] if getattr(cls, "_peftkit_bf16", None) else cls


def use_bf16(model: nn.Module, mode: str | None) -> nn.Module:
    """Give `model` (in place) the bf16 forward `mode` ("autocast" or "weights"; None: back to its
    plain class). The forward returns fp32 outputs either way. The class is swapped, not wrapped,
    so names, state dict, config and isinstance checks stay as they were; "weights" also casts
    every floating parameter and buffer to bf16 (and None casts them back to fp32)."""
    base = plain_class(model)
    if mode is None:
        model.__class__ = base
        return model
    if mode not in ("autocast", "weights"):
        raise ValueError(f"bf16 mode {mode!r} is not 'autocast' or 'weights'.")
    if (base, mode) not in _CLASSES:
        # Same __name__ as the plain class, so that what reads the architecture's name (the adapter
        # fingerprint, reprs) sees the same model; its own __qualname__, under which pickle finds it here.
        qualname = f"{base.__name__}BF16{mode.capitalize()}"
        cls = type(base.__name__, (base,), {"forward": _bf16_forward, "__module__": __name__,
                                            "__qualname__": qualname, "_peftkit_bf16": mode})
        setattr(sys.modules[__name__], qualname, cls)
        _CLASSES[base, mode] = cls
    model.__class__ = _CLASSES[base, mode]
    if mode == "weights":
        model.to(torch.bfloat16)
    return model


def bf16_support(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(whether bf16 runs in hardware on `device`, the reason in words)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "this GPU multiplies bf16" if ok else "this GPU has no bf16 arithmetic"
    if device.type != "cpu":
        return False, f"bf16 inference is offered on the CPU and CUDA only, not {device.type}"
    if runtime.cpu_has_bf16():
        return True, f"this CPU ({runtime.cpu_name()}) has AVX512-BF16 or AMX"
    return False, (f"this CPU ({runtime.cpu_name()}) has neither AVX512-BF16 nor AMX: torch would emulate "
                   "bf16, which runs slower than fp32")
