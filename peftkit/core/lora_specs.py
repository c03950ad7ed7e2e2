"""The LoRA family's specs: LoRA (with rsLoRA, PiSSA's init and LoRA+'s learning-rate ratio) and DoRA.

LoRA+ (Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024):
B learns `lr_ratio` (their lambda) times faster than A. The spec does not reach into training:
each LoRA layer answers `lr_multipliers()` ({"lora_B": lambda}), a duck-typed hook that `fit`
reads when it builds its parameter groups, so the loop still knows nothing about methods.

PiSSA (`init="pissa"`, layers/lora.py) decomposes each target's weight with a full SVD in
float32 before anything changes; `plan` refuses a layer whose SVD would not fit in the memory
this machine has free (`svd_bytes`), naming the layer and its size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..layers.lora import INITS, check_lora_args
from ..layers.names import under
from .architectures import architecture, unknown_architecture
from .kinds import LORA_KINDS, lora_layer, lora_problem
from .spec import DEFAULT_TARGETS, Knob, Method, _aliases, _as_tuple, register
from .targets import TargetError, replace_module, resolve


@register("lora")
@dataclass(frozen=True)
class LoRA(Method):
    """Low-rank update s * B A on each target layer (query and value, as in the LoRA paper).

    The default targets stand for the architecture's defaults (`core.architectures`): query and
    value on BERT, `c_attn` on GPT-2, q and v on T5, q_proj and v_proj on Llama. Targets may be
    Linear, GPT-2's Conv1D, convolutions, embeddings or nn.MultiheadAttention (`core.kinds`)."""

    label: ClassVar[str] = "LoRA"
    color: ClassVar[str] = "#1f77b4"
    knobs: ClassVar[tuple[Knob, ...]] = (
        Knob("r", int, "LoRA rank", (2, 64, "log")),  # log: 2 -> 4 matters as much as 32 -> 64
        Knob("alpha", float, "LoRA alpha: the update is scaled by alpha/r", (2.0, 64.0, "log")),
        Knob("dropout", float, "dropout on the LoRA path", (0.0, 0.2), flag="lora-dropout"),
        Knob("targets", tuple, "comma-separated names of the layers to adapt"),
        Knob("rslora", bool, "scale by alpha/sqrt(r) (rsLoRA)"),
        Knob("init", str, "lora (kaiming A, zero B) or pissa (top-r singular vectors of W0)", flag="lora-init"),
        Knob("lr_ratio", float, "LoRA+: B's learning rate over A's (1: plain LoRA)", flag="lr-ratio"),
    )
    default_lr: ClassVar[float] = 5e-3
    lr_reason: ClassVar[str] = (
        "chosen on movies validation for 2,000 snippets (63 steps): of 1e-3, 2e-3, 5e-3 and 1e-2, "
        "5e-3 scored best; the usual 1e-3 is too low for so few steps")
    lr_grid: ClassVar[tuple[float, ...]] = (2e-3, 5e-3, 1e-2)
    variants: ClassVar[dict[str, dict]] = {"": {}, "rslora": {"rslora": True}, "pissa": {"init": "pissa"},
                                           "plus": {"lr_ratio": 16.0}}

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False
    init: str = "lora"      # "pissa": A and B from W0's top-r singular vectors (Meng et al., 2024)
    lr_ratio: float = 1.0   # LoRA+: B's learning rate is lr_ratio x A's; the paper suggests 16 (Hayou et al., 2024)

    def __post_init__(self):
        check_lora_args(self.r, self.alpha, self.dropout)
        if self.init not in INITS:
            raise ValueError(f"unknown LoRA init {self.init!r}; choose one of {INITS} (pissa: PiSSA's "
                             "principal singular vectors).")
        ok = isinstance(self.lr_ratio, (int, float)) and not isinstance(self.lr_ratio, bool)
        if not (ok and math.isfinite(self.lr_ratio) and self.lr_ratio > 0):
            raise ValueError(f"LoRA+ lr_ratio is B's learning rate over A's and must be a positive number, got "
                             f"{self.lr_ratio!r}; 1.0 is plain LoRA, and LoRA+'s paper suggests 16.")
        object.__setattr__(self, "lr_ratio", float(self.lr_ratio))
        _as_tuple(self, "targets")

    def to_dict(self) -> dict:
        # PiSSA's and LoRA+'s settings appear only when set, so the files and cache keys of a
        # plain LoRA are the ones written before they existed.
        d = super().to_dict()
        if d.get("init") == "lora":
            del d["init"]
        if d.get("lr_ratio") == 1.0:
            del d["lr_ratio"]
        return d

    def describe(self):
        extra = (" rs" if self.rslora else "") + (" pissa" if self.init == "pissa" else "")
        return f"{self.name} r={self.r}{extra}" + (f" lr_ratio={self.lr_ratio:g}" if self.lr_ratio != 1.0 else "")

    dora: ClassVar[bool] = False  # DoRA's spec sets it: each layer also learns a magnitude

    def targets_for(self, model: nn.Module) -> tuple[str, ...]:
        """The targets on `model`: the architecture's defaults when this spec has the default ones."""
        arch = architecture(model) if self.targets == DEFAULT_TARGETS else None
        return arch.lora if arch else self.targets

    def plan(self, model, exclude=()):
        targets = self.targets_for(model)
        try:
            names = resolve(model, targets, LORA_KINDS, "LoRA", exclude=exclude)
        except TargetError as e:
            if self.targets == DEFAULT_TARGETS and architecture(model) is None:
                raise TargetError(f"{e} {unknown_architecture(model, 'LoRA')}") from None
            raise
        for n in names:
            problem = lora_problem(model, n, model.get_submodule(n), self.dropout)
            if problem:
                raise TargetError(f"LoRA cannot adapt {n!r}: {problem}.")
            inside = [m for m in names if under(m, n) and m != n]
            if inside:
                raise TargetError(f"LoRA targets {n!r} and {inside[0]!r}, which lies inside it; target one of them.")
        if self.init == "pissa":
            for n in names:
                pissa_problem(n, model.get_submodule(n))
        return names

    def merges_into(self, model, exclude=()):
        return self.plan(model, exclude)

    def inject(self, model, names):
        for n in names:
            base = model.get_submodule(n)
            layer = lora_layer(base, self.r, self.alpha, self.dropout, self.rslora, init=self.init,
                               dora=self.dora)
            layer.lr_ratio = self.lr_ratio
            for alias in _aliases(model, base) or [n]:
                replace_module(model, alias, layer)




def available_memory() -> int | None:
    """Bytes of memory this machine has free now (Linux's MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def svd_bytes(out_features: int, in_features: int) -> int:
    """Memory a float32 thin SVD of an (out, in) matrix takes: the copy, U, S, V^T and LAPACK's
    workspace (about as much again as the copy)."""
    k = min(out_features, in_features)
    return 4 * (2 * out_features * in_features + out_features * k + k + k * in_features)


def pissa_problem(name: str, module: nn.Module) -> None:
    """Raise TargetError when PiSSA cannot initialise the layer `name`: a kind it has no SVD for,
    or a weight whose SVD would not fit in free memory."""
    w = getattr(module, "weight", None)
    if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D") or w is None or w.dim() != 2:
        raise TargetError(f"PiSSA initialises Linear layers (and GPT-2's Conv1D) from their SVD; {name!r} is a "
                          f"{type(module).__name__}. Leave it out of targets, or use init='lora'.")
    need, free = svd_bytes(*w.shape), available_memory()
    if free is not None and need > free:
        raise TargetError(
            f"PiSSA cannot decompose {name!r}: the SVD of its {w.shape[0]} x {w.shape[1]} weight needs about "
            f"{need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is free. Leave {name!r} out of targets, free "
            "memory, or use init='lora'.")


@register("dora")
@dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA (Liu et al., 2024): LoRA's update on the direction, plus a trainable magnitude per
    output unit, W = m (W0 + s B A) / ||W0 + s B A|| (layers/dora.py). Linear layers and GPT-2's
    Conv1D; it merges exactly."""

    label: ClassVar[str] = "DoRA"
    color: ClassVar[str] = "#08519c"  # LoRA's blue, darker: a LoRA variant
    dora: ClassVar[bool] = True
    lr_reason: ClassVar[str] = "LoRA's rate: DoRA's paper trains it with LoRA's hyperparameters"
    variants: ClassVar[dict[str, dict]] = {"": {}}

    def __post_init__(self):
        super().__post_init__()
        if self.init != "lora":
            raise ValueError(f"DoRA takes init='lora' only, got {self.init!r}: peftkit has no DoRA with PiSSA's init.")

    def plan(self, model, exclude=()):
        names = super().plan(model, exclude)
        for n in names:
            m = model.get_submodule(n)
            if not (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"):
                raise TargetError(f"DoRA adapts Linear layers (and GPT-2's Conv1D); {n!r} is a {type(m).__name__}. "
                                  "Leave it out of targets, or use LoRA for it.")
        return names
