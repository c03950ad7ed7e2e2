"""Applying a method to a model, reporting what trains, and merging LoRA back into the base.

`apply` works in two phases: the method resolves every layer it will change (and raises with
the model untouched if anything is wrong), then it wraps them and sets `requires_grad`:
adapter parameters (by the naming contract in `names.py`) and the task head train, the rest is
frozen. The model remembers what was applied in `model.peftkit`.

Heads. A task head is freshly initialised for the task, so it trains with every method and its
tensors are saved with the adapter: the top-level modules PEFT's classifiers save (`classifier`,
`score`, and, by PEFT's name-ending rule, DistilBERT's `pre_classifier`), `head` and BART's
`classification_head`. A language model's `lm_head` is pretrained (often tied to the input
embedding): it stays frozen, and is the head only for `HeadOnly`, which has nothing to train
without a head and says so.

Tied weights. A weight held by two modules (GPT-2's `lm_head` and `wte`) is counted once, and a
LoRA on it warns at `apply`: merging would change both modules, so `merge` refuses unless called
with `allow_tied=True`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pandas as pd
from torch import nn

from ..layers.adapters import AdapterLinear
from ..layers.lora import LoRALayer, MergeError
from ..layers.names import is_adapter_param, under, under_any
from .methods import Method
from .peft_method import PEFT_MODEL_ATTR, is_peft_layer, peft_layers
from .targets import TargetError, replace_module

HEAD_NAMES = ("classifier", "score", "head", "classification_head")  # what task models call it
HEAD_ENDINGS = ("classifier", "score")  # PEFT saves every module whose name ends so (pre_classifier)
LM_HEADS = ("lm_head",)  # a language model's output layer: pretrained, trained only by HeadOnly
WRAPPERS = (LoRALayer, AdapterLinear)


@dataclass(frozen=True)
class Applied:
    """What `apply` did, kept on the model as `model.peftkit`: the method, the primary head and
    every head module that trains (DistilBERT: pre_classifier and classifier)."""

    method: Method
    head: str | None
    heads: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.heads and self.head:
            object.__setattr__(self, "heads", (self.head,))


def _with_params(model: nn.Module, name: str) -> bool:
    return any(True for _ in model.get_submodule(name).parameters())


def task_heads(model: nn.Module) -> tuple[str, ...]:
    """The top-level modules that are the task head, in the model's order."""
    return tuple(n for n, _ in model.named_children()
                 if (n in HEAD_NAMES or n.endswith(HEAD_ENDINGS)) and _with_params(model, n))


def lm_head(model: nn.Module) -> str | None:
    """A language model's output layer (`lm_head`), or None."""
    children = dict(model.named_children())
    return next((n for n in LM_HEADS if n in children and _with_params(model, n)), None)


def find_heads(model: nn.Module, head="auto", lm: bool = False) -> tuple[str, ...]:
    """The head modules: `head` itself (a name or a tuple of names), or with "auto" the task
    heads, and, with `lm`, a language model's `lm_head` when there is no task head."""
    if head is None:
        return ()
    if head == "auto":
        found = task_heads(model)
        if not found and lm and lm_head(model):
            found = (lm_head(model),)
        return found
    names = (head,) if isinstance(head, str) else tuple(head)
    children = [n for n, _ in model.named_children()]
    for h in names:
        try:
            model.get_submodule(h)
        except AttributeError:
            raise TargetError(f"head {h!r} is not a module of this {type(model).__name__}; its "
                              f"top-level modules are {children}. Pass head=None for no head.") from None
    return names


def primary_head(heads: tuple[str, ...]) -> str | None:
    """The head that names the task (DistilBERT's classifier, not its pre_classifier)."""
    return next((h for h in heads if h in HEAD_NAMES), heads[-1] if heads else None)


def find_head(model: nn.Module, head: str | None = "auto") -> str | None:
    """The task head's module name: `head` itself, or with "auto" the first of HEAD_NAMES found."""
    return primary_head(find_heads(model, head))


def _names_by_param(model: nn.Module) -> dict[int, tuple[nn.Parameter, list[str]]]:
    """Every parameter once, with all the names it has (a tied weight has several)."""
    out: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), (p, []))[1].append(n)
    return out


def tied_lora_layers(model: nn.Module) -> dict[str, list[str]]:
    """LoRA layers whose base weight is also held by another module: {layer: [other names]}."""
    by_param = _names_by_param(model)
    tied = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer):
            others = [o for w in m.weights() for o in by_param[id(w)][1] if not under(o, name)]
            if others:
                tied[name] = others
    return tied


def _tied_message(tied: dict[str, list[str]]) -> str:
    return "; ".join(f"{k}'s weight is also {', '.join(v)}" for k, v in tied.items())


def applied(model: nn.Module) -> Applied | None:
    return getattr(model, "peftkit", None)


def apply(model: nn.Module, method: Method, head="auto") -> nn.Module:
    """Apply `method` in place and freeze everything but its parameters and the head.

    `head`: "auto" (the task head, see the module docstring), a module name, a tuple of names,
    or None."""
    if not isinstance(method, Method):
        raise TypeError(f"apply() takes a method spec such as peftkit.LoRA(), got {type(method).__name__}.")
    if applied(model) is not None or any(isinstance(m, WRAPPERS) or is_peft_layer(m) for m in model.modules()):
        done = applied(model)
        raise RuntimeError(
            f"this model already has {done.method if done else 'peftkit layers'} applied. Applying "
            "a second method would stack wrappers; start from a fresh base (load_base), or call "
            "peftkit.unload(model) first to merge and remove the LoRA.")
    heads = find_heads(model, head, lm=method.needs_head)
    if method.needs_head and not heads:
        raise TargetError(
            f"{method.name} trains the head only, and this {type(model).__name__} has none: no top-level "
            f"module named {', '.join(HEAD_NAMES + LM_HEADS)} or ending in {' or '.join(HEAD_ENDINGS)}. "
            "Pass head='<module name>' to say which module to train, or choose another method.")
    plan = method.plan(model, exclude=heads)  # raises here, with the model untouched
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    method.inject(model, plan)
    for p, names in _names_by_param(model).values():
        # An adapter tensor trains unless its layer made it a constant (AdaLoRA's ranknum, in PEFT).
        new = p.requires_grad and any(is_adapter_param(n) for n in names)
        p.requires_grad_(method.trains_base or new or any(under_any(n, heads) for n in names))
    if not any(p.requires_grad for p in model.parameters()):
        remove(model, grads)
        raise TargetError(f"{method.name} would train nothing in this {type(model).__name__} (its head "
                          f"{', '.join(heads) or 'is missing'} holds no parameters); the model is unchanged.")
    tied = tied_lora_layers(model)
    if tied:
        warnings.warn(f"LoRA on a tied weight: {_tied_message(tied)}. Unmerged, only this layer sees the "
                      "update; merging would change every module holding the weight, so merge() refuses "
                      "unless called with allow_tied=True.", stacklevel=2)
    head_tied = {n for p, names in _names_by_param(model).values() if p.requires_grad and not method.trains_base
                 and any(under_any(x, heads) for x in names) for n in names if not under_any(n, heads)}
    if head_tied:
        warnings.warn(f"the head {', '.join(heads)} shares its weight with {', '.join(sorted(head_tied))}: "
                      "training the head trains them too.", stacklevel=2)
    model.peftkit = Applied(method, primary_head(heads), heads)
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
    for name, layer in reversed(peft_layers(model)):  # a PEFT-backed method: PEFT's own merge
        if merge_lora:
            _peft_merge(name, layer)
        replace_module(model, name, layer.get_base_layer())
    for attr in ("peft_config", PEFT_MODEL_ATTR):  # what get_peft_model and PeftMethod left on the model
        model.__dict__.pop(attr, None)
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


def _refuse_tied(model: nn.Module, what: str, allow_tied: bool) -> None:
    tied = tied_lora_layers(model)
    if tied and not allow_tied:
        raise MergeError(f"{what} would change tied weights: {_tied_message(tied)}, so the merged model would "
                         f"differ from the unmerged one. Call {what}(model, allow_tied=True) to do it anyway, "
                         "or untie the weights first.")


def merge(model: nn.Module, allow_tied: bool = False) -> int:
    """Fold every LoRA update into its base weight (idempotent). Returns the layers merged.

    Adapters stay as they are (with a warning); a model with adapters and no LoRA raises. A LoRA
    on a tied weight raises unless `allow_tied` (the merge would change the other holders too).
    """
    loras, ads = lora_layers(model), adapter_layers(model)
    if ads and not loras:
        raise MergeError(f"this model has {len(ads)} adapters and no LoRA layer to merge: "
                         f"{_WHY_NO_MERGE}. Adapters always run as separate modules.")
    _refuse_tied(model, "merge", allow_tied)
    if ads:
        warnings.warn(f"merged the LoRA layers; the {len(ads)} adapters stay separate "
                      f"modules because {_WHY_NO_MERGE}.", stacklevel=2)
    for m in loras:
        m.merge()
    peft = peft_layers(model)
    for name, layer in peft:
        _peft_merge(name, layer)
    return len(loras) + len(peft)


def _peft_merge(name: str, layer: nn.Module) -> None:
    if getattr(layer, "merged", False):
        return
    try:
        layer.merge()
    except (NotImplementedError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise MergeError(f"PEFT's {type(layer).__module__.split('.')[2] if type(layer).__module__.count('.') > 1 else ''} "
                         f"layer {name!r} ({type(layer).__name__}) cannot merge: {e}. Serve it unmerged.") from None


def unmerge(model: nn.Module) -> int:
    """Subtract every LoRA update from its base weight again (idempotent)."""
    loras = lora_layers(model)
    for m in loras:
        m.unmerge()
    peft = peft_layers(model)
    for _, layer in peft:
        if getattr(layer, "merged", False):
            layer.unmerge()
    return len(loras) + len(peft)


def unload(model: nn.Module, allow_tied: bool = False) -> nn.Module:
    """Merge every LoRA and remove all peftkit wrappers: a plain model with the same outputs."""
    ads = adapter_layers(model)
    if ads:
        raise MergeError(f"cannot unload a model with {len(ads)} bottleneck adapters: {_WHY_NO_MERGE}, "
                         "so removing them would change the outputs. Keep the wrapped model.")
    if not any(m.merged for m in lora_layers(model)):
        _refuse_tied(model, "unload", allow_tied)
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
            for base in ("base", "base_layer"):  # peftkit's wrappers; PEFT's
                head = f"{w}.{base}." if w else f"{base}."
                if name.startswith(head):
                    name = (f"{w}." if w else "") + name[len(head):]
                    changed = True
    return name


def wrapper_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, WRAPPERS) or is_peft_layer(m)]


def _row_kind(module: nn.Module, name: str, heads) -> str:
    if isinstance(module, AdapterLinear):
        return "lora+adapter" if isinstance(module.base, LoRALayer) else "adapter"
    if isinstance(module, LoRALayer):
        return "lora"
    if is_peft_layer(module):
        return "peft " + type(module).__module__.split(".")[2] if type(module).__module__.count(".") > 1 else "peft"
    if under_any(name, heads):
        return "head"
    return type(module).__name__


def report(model: nn.Module) -> pd.DataFrame:
    """One row per layer that holds parameters (a wrapped layer counts with its base), and a
    TOTAL row: module, kind, trainable, total, trainable %. A tied weight counts once, in the
    first module that holds it; a later holder's row says "tied" and counts only its own."""
    done = applied(model)
    heads = done.heads if done else ()
    rows, wrapped, counted = [], set(), set()
    for name, module in model.named_modules():
        if any(under(name, s) for s in wrapped):
            continue
        if isinstance(module, WRAPPERS) or is_peft_layer(module):
            wrapped.add(name)
            params = list(module.parameters())
        else:
            params = list(module.parameters(recurse=False))
            if not params:
                continue
        new = [p for p in params if id(p) not in counted]
        counted.update(id(p) for p in params)
        kind = _row_kind(module, name, heads)
        rows.append({"module": name or "(root)", "kind": kind if new else f"{kind} (tied)",
                     "trainable": sum(p.numel() for p in new if p.requires_grad),
                     "total": sum(p.numel() for p in new)})
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
