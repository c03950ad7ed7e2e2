"""What identifies a base model, so that an adapter is only ever loaded into the base it was
trained on.

The fingerprint holds the architecture, a SHA-256 of every base parameter's name and shape, the
number of base parameters, and a SHA-256 of the first 256 values of each parameter that no method
except a full fine-tune changes (embeddings and norms: every base parameter not held by a Linear
layer, less any a LoRA merge may have changed). Names are the unwrapped model's and adapter
tensors and the task head are left out, so the fingerprint `save_adapter` takes from a model with
its method applied is the one `check_base` computes on the fresh base it is loaded into.
"""

from __future__ import annotations

import hashlib

from torch import nn

from ..core.methods import Method
from ..core.surgery import canonical_name, lora_layers, wrapper_names
from ..layers.names import is_adapter_param, under_any


def unwrapped_names(model: nn.Module):
    """(parameter, its unwrapped names): each parameter once; a tied one has several names."""
    wraps = wrapper_names(model)
    groups: dict[int, tuple] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), (p, []))[1].append(canonical_name(name, wraps))
    return groups.values()


def base_items(model: nn.Module, skip_head):
    """(unwrapped name, parameter) for every base parameter: no adapter tensors, none the head
    holds under any of its names (a name, a tuple of names, or None)."""
    for p, names in unwrapped_names(model):
        if not is_adapter_param(names[0]) and not any(under_any(n, skip_head) for n in names):
            yield names[0], p


def fingerprint(model: nn.Module, head: str | None, method: Method) -> dict:
    """What identifies a base: architecture, parameter names and shapes, and a digest of the
    values that no method except a full fine-tune changes (embeddings and norms, i.e. every
    base parameter not held by a Linear layer)."""
    items = sorted(base_items(model, head))
    shapes = hashlib.sha256("".join(f"{n}:{tuple(p.shape)};" for n, p in items).encode()).hexdigest()
    digest = None
    if not method.trains_base:
        wraps = wrapper_names(model)
        stable = {canonical_name(f"{mn}.{pn}" if mn else pn, wraps)
                  for mn, m in model.named_modules() if not isinstance(m, nn.Linear)
                  for pn, _ in m.named_parameters(recurse=False) if not is_adapter_param(f"{mn}.{pn}")}
        stable -= _merge_targets(model, head, method)
        h = hashlib.sha256()
        for n, p in items:
            if n in stable:  # the first 256 values of each: enough to tell two bases apart
                h.update(n.encode() + p.detach().flatten()[:256].float().cpu().numpy().tobytes())
        digest = h.hexdigest() if stable else None
    return {"architecture": type(model).__name__, "params_sha256": shapes,
            "n_params": sum(p.numel() for _, p in items), "stable_values_sha256": digest}


def _merge_targets(model: nn.Module, head, method: Method) -> set[str]:
    """Base weights a LoRA merge may have changed (beyond Linear ones): a wrapped model's LoRA
    layers, or where the method would put them on a fresh one. Left out of the value digest, so
    an adapter saved merged loads into its fresh base."""
    wraps = wrapper_names(model)
    if wraps:
        loras = {id(m) for m in lora_layers(model)}
        names = {n for n, m in model.named_modules() if id(m) in loras}
        return {canonical_name(f"{n}.{pn}", wraps) for n in names
                for pn, _ in model.get_submodule(n).base.named_parameters()}
    heads = (head,) if isinstance(head, str) else tuple(head or ())
    try:
        targets = method.merges_into(model, exclude=heads)
    except ValueError:  # a method that does not fit this model: the shapes check says so
        return set()
    return {f"{n}.{pn}" for n in targets for pn, _ in model.get_submodule(n).named_parameters()}
