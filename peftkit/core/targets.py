"""Finding the layers a method adapts, by name, on any model.

A target matches a module name the way Hugging Face PEFT's `target_modules` does:
  - an exact name:     "bert.encoder.layer.0.attention.self.query"
  - a dotted suffix:   "query" or "attention.self.query" (matches at a "." boundary)
  - a regex:           r"layer\\.[0-2]\\..*\\.query" (must match the whole name)
Errors say what was looked for, what is close, and what exists, and are raised before the
model is touched.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from ..layers.names import under


class TargetError(ValueError):
    """A target names no layer, or a layer of the wrong kind. The model is unchanged."""


def name_matches(name: str, target: str) -> bool:
    """True when module `name` is selected by `target` (exact, dotted suffix, or full regex)."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def suffix_matches(name: str, pattern: str) -> bool:
    """True when regex `pattern` matches a dotted tail of `name` (used by adapter placements)."""
    return re.search(rf"(?:^|\.)(?:{pattern})$", name) is not None


def linear_names(model: nn.Module) -> list[str]:
    """Names of every nn.Linear in the model, in definition order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _short_list(names: list[str], limit: int = 12) -> str:
    """Unique last components first (what people type), then a count of the full names."""
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    shown = ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")
    return f"{shown} ({len(names)} Linear layers in all)"


def resolve(model: nn.Module, targets, kind=nn.Linear, what: str = "LoRA",
            exclude: tuple[str, ...] = ()) -> list[str]:
    """The names of the modules selected by `targets`, checked to be instances of `kind`.

    Every target must select at least one module. Raises TargetError otherwise.
    """
    if isinstance(targets, str):
        targets = (targets,)
    if not targets:
        raise TargetError(f"{what} needs at least one target layer name, got none.")
    modules = dict(model.named_modules())
    names = [n for n in modules if n and not any(under(n, e) for e in exclude)]
    chosen: list[str] = []
    for t in targets:
        if not isinstance(t, str) or not t:
            raise TargetError(f"{what} target names must be non-empty strings, got {t!r}.")
        hits = [n for n in names if name_matches(n, t)]
        if not hits:
            raise TargetError(_unknown_message(model, t, what, kind))
        wrong = [n for n in hits if not isinstance(modules[n], kind)]
        if wrong:
            n = wrong[0]
            inside = [x for x in linear_names(modules[n])]
            hint = (f" Linear layers inside it: {', '.join(inside[:6])}." if inside else "")
            raise TargetError(
                f"{what} target {t!r} selects {n!r}, a {type(modules[n]).__name__}; {what} wraps "
                f"{_kind_name(kind)} layers only.{hint} Name the Linear layers instead.")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _kind_name(kind) -> str:
    return ", ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _unknown_message(model: nn.Module, target: str, what: str, kind=nn.Linear) -> str:
    linears = linear_names(model)
    # The other layer kinds the method wraps (GPT-2's Conv1D, embeddings, convolutions), by kind.
    others: dict[str, list[str]] = {}
    for n, m in model.named_modules():
        if n and isinstance(m, kind) and not isinstance(m, nn.Linear):
            others.setdefault(type(m).__name__, []).append(n)
    names = linears + [n for ns in others.values() for n in ns]
    candidates = list(dict.fromkeys([n.rsplit(".", 1)[-1] for n in names] + names))
    close = difflib.get_close_matches(target, candidates, n=3, cutoff=0.6)
    did = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    more = "".join(f"; {k} layers: {_short_list(ns).replace(' Linear layers', ' layers')}" for k, ns in others.items())
    return (f"unknown {what} target {target!r}: no module name equals it, ends with "
            f"'.{target}' or matches it as a regex.{did} Linear layers in this model: "
            f"{_short_list(linears)}{more}.")


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding `name` and the attribute name under which it is held."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, attr = get_parent(model, name)
    setattr(parent, attr, new)
