"""Applying a method to a model, reporting what trains, and merging LoRA back into the base.

`apply` works in two phases: the method resolves every layer it will change (and raises with
the model untouched if anything is wrong), then it wraps them and sets `requires_grad`:
adapter parameters (by the naming contract in `names.py`) and the task head train, the rest is
frozen. The model remembers what was applied in `model.peftkit`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pandas as pd
from torch import nn

from ..layers.adapters import AdapterLinear
from ..layers.lora import LoRALayer, MergeError
from ..layers.names import is_adapter_param, under
from .methods import Method
from .targets import TargetError, replace_module

HEAD_NAMES = ("classifier", "score", "head")  # what sequence-classification models call it
WRAPPERS = (LoRALayer, AdapterLinear)


@dataclass(frozen=True)
class Applied:
    """What `apply` did, kept on the model as `model.peftkit`."""

    method: Method
    head: str | None


def find_head(model: nn.Module, head: str | None = "auto") -> str | None:
    """The task head's module name: `head` itself, or with "auto" the first of HEAD_NAMES found."""
    if head is None:
        return None
    children = [n for n, _ in model.named_children()]
    if head == "auto":
        return next((n for n in HEAD_NAMES if n in children), None)
    try:
        model.get_submodule(head)
    except AttributeError:
        raise TargetError(f"head {head!r} is not a module of this {type(model).__name__}; its "
                          f"top-level modules are {children}. Pass head=None for no head.") from None
    return head


def applied(model: nn.Module) -> Applied | None:
    return getattr(model, "peftkit", None)


def apply(model: nn.Module, method: Method, head: str | None = "auto") -> nn.Module:
    """Apply `method` in place and freeze everything but its parameters and the head."""
    if not isinstance(method, Method):
        raise TypeError(f"apply() takes a method spec such as peftkit.LoRA(), got {type(method).__name__}.")
    if applied(model) is not None or any(isinstance(m, WRAPPERS) for m in model.modules()):
        done = applied(model)
        raise RuntimeError(
            f"this model already has {done.method if done else 'peftkit layers'} applied. Applying "
            "a second method would stack wrappers; start from a fresh base (load_base), or call "
            "peftkit.unload(model) first to merge and remove the LoRA.")
    head_name = find_head(model, head)
    excluded = (head_name,) if head_name else ()
    plan = method.plan(model, exclude=excluded)  # raises here, with the model untouched
    method.inject(model, plan)
    for name, p in model.named_parameters():
        p.requires_grad_(method.trains_base or is_adapter_param(name) or under(name, head_name))
    model.peftkit = Applied(method, head_name)
    return model


def remove(model: nn.Module, requires_grad: dict[str, bool] | None = None) -> nn.Module:
    """Undo `apply` without merging: every wrapper is replaced by its base layer."""
    _strip(model, merge_lora=False)
    if requires_grad is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
    if hasattr(model, "peftkit"):
        del model.peftkit
    return model


def _strip(model: nn.Module, merge_lora: bool) -> None:
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, WRAPPERS)]
    for name, m in reversed(wrapped):  # innermost first does not matter: we re-read by name
        mod = model.get_submodule(name) if name else model
        while isinstance(mod, WRAPPERS):
            if isinstance(mod, LoRALayer):
                mod.merge() if merge_lora else mod.unmerge()
            mod = mod.base
        wrapper = model.get_submodule(name) if name else model
        for alias in [n for n, m in model.named_modules(remove_duplicate=False) if m is wrapper and n] or [name]:
            replace_module(model, alias, mod)


def lora_layers(model: nn.Module) -> list[LoRALayer]:
    """Every LoRA layer of the model, of any kind (Linear, Conv1D, convolution, embedding, attention)."""
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


def adapter_layers(model: nn.Module) -> list[AdapterLinear]:
    return [m for m in model.modules() if isinstance(m, AdapterLinear)]


_WHY_NO_MERGE = ("a bottleneck adapter applies a nonlinearity between its down and up "
                 "projections, so no single weight matrix equals it")


def merge(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight (idempotent). Returns the layers merged.

    Adapters stay as they are (with a warning); a model with adapters and no LoRA raises.
    """
    loras, ads = lora_layers(model), adapter_layers(model)
    if ads and not loras:
        raise MergeError(f"this model has {len(ads)} adapters and no LoRA layer to merge: "
                         f"{_WHY_NO_MERGE}. Adapters always run as separate modules.")
    if ads:
        warnings.warn(f"merged the LoRA layers; the {len(ads)} adapters stay separate "
                      f"modules because {_WHY_NO_MERGE}.", stacklevel=2)
    for m in loras:
        m.merge()
    return len(loras)


def unmerge(model: nn.Module) -> int:
    """Subtract every LoRA update from its base weight again (idempotent)."""
    loras = lora_layers(model)
    for m in loras:
        m.unmerge()
    return len(loras)


def unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA and remove all peftkit wrappers: a plain model with the same outputs."""
    ads = adapter_layers(model)
    if ads:
        raise MergeError(f"cannot unload a model with {len(ads)} bottleneck adapters: {_WHY_NO_MERGE}, "
                         "so removing them would change the outputs. Keep the wrapped model.")
    _strip(model, merge_lora=True)
    if hasattr(model, "peftkit"):
        del model.peftkit
    return model


def canonical_name(name: str, wrapper_prefixes: list[str]) -> str:
    """A parameter's name in the unwrapped model: drops the `.base` that wrapping inserts."""
    changed = True
    while changed:
        changed = False
        for w in wrapper_prefixes:
            head = f"{w}.base." if w else "base."
            if name.startswith(head):
                name = (f"{w}." if w else "") + name[len(head):]
                changed = True
    return name


def wrapper_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, WRAPPERS)]


def _row_kind(module: nn.Module, name: str, head: str | None) -> str:
    if isinstance(module, AdapterLinear):
        return "lora+adapter" if isinstance(module.base, LoRALayer) else "adapter"
    if isinstance(module, LoRALayer):
        return "lora"
    if under(name, head):
        return "head"
    return type(module).__name__


def report(model: nn.Module) -> pd.DataFrame:
    """One row per layer that holds parameters (a wrapped layer counts with its base), and a
    TOTAL row: module, kind, trainable, total, trainable %."""
    done = applied(model)
    head = done.head if done else None
    rows, seen = [], set()
    for name, module in model.named_modules():
        if any(under(name, s) for s in seen):
            continue
        if isinstance(module, WRAPPERS):
            seen.add(name)
            params = list(module.parameters())
        else:
            params = list(module.parameters(recurse=False))
            if not params:
                continue
        rows.append({"module": name or "(root)", "kind": _row_kind(module, name, head),
                     "trainable": sum(p.numel() for p in params if p.requires_grad),
                     "total": sum(p.numel() for p in params)})
    df = pd.DataFrame(rows, columns=["module", "kind", "trainable", "total"])
    total = {"module": "TOTAL", "kind": "total",
             "trainable": int(df["trainable"].sum()), "total": int(df["total"].sum())}
    df = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
    df["trainable %"] = (100 * df["trainable"] / df["total"].clip(lower=1)).round(4)
    return df


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters / all parameters (each shared tensor counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    return sum(p.numel() for p in params if p.requires_grad) / max(total, 1)
