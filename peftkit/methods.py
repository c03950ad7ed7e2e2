"""Methods as small frozen specs: what to adapt and how, separate from the model it is applied to.

A spec validates its own settings when built, names the layers it would change with `plan`
(which raises before anything is touched), and performs the change with `inject`. Everything
that lists methods reads `METHODS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from .adapters import PLACEMENTS, AdapterLinear, BottleneckAdapter, check_adapter_args
from .lora import LoRALinear, check_lora_args
from .targets import TargetError, replace_module, resolve, suffix_matches

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


class Method:
    """Base of every method spec. Subclasses are frozen dataclasses."""

    name: ClassVar[str] = ""
    trains_base: ClassVar[bool] = False  # True: every base parameter trains (full fine-tune)

    def plan(self, model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
        """The module names `inject` would change. Raises TargetError; never modifies."""
        return []

    def inject(self, model: nn.Module, names: list[str]) -> None:
        """Wrap the planned modules in place."""

    def apply(self, model: nn.Module, head: str | None = "auto") -> nn.Module:
        from .surgery import apply
        return apply(model, self, head=head)

    def to_dict(self) -> dict:
        out = {"method": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Method) else list(v) if isinstance(v, tuple) else v
        return out

    @staticmethod
    def from_dict(d: dict) -> "Method":
        """Rebuild any registered method from `to_dict()` output."""
        d = dict(d)
        name = d.pop("method", None)
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}.")
        cls = METHODS[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - fields
        if extra:
            raise ValueError(f"{name} has no setting(s) {sorted(extra)}; its settings are {sorted(fields)}.")
        for k, v in d.items():
            if isinstance(v, dict) and "method" in v:
                d[k] = Method.from_dict(v)
            elif isinstance(v, list):
                d[k] = tuple(v)
        return cls(**d)


def _as_tuple(obj, attr):
    v = getattr(obj, attr)
    if isinstance(v, str):
        v = (v,)
    object.__setattr__(obj, attr, tuple(v) if v is not None else None)


@register("lora")
@dataclass(frozen=True)
class LoRA(Method):
    """Low-rank update s * B A on each target Linear (query and value, as in the LoRA paper)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")
    rslora: bool = False

    def __post_init__(self):
        check_lora_args(self.r, self.alpha, self.dropout)
        _as_tuple(self, "targets")

    def plan(self, model, exclude=()):
        return resolve(model, self.targets, nn.Linear, "LoRA", exclude=exclude)

    def inject(self, model, names):
        for n in names:
            base = model.get_submodule(n)
            replace_module(model, n, LoRALinear(base, self.r, self.alpha, self.dropout, self.rslora))


@register("adapter")
@dataclass(frozen=True)
class Adapter(Method):
    """A bottleneck adapter after the chosen sublayers (`placement`, or explicit `targets`)."""

    size: int | None = None
    reduction: int = 16
    placement: str = "pfeiffer"
    activation: str = "gelu"
    variant: str = "simple"
    dropout: float = 0.0
    layernorm: bool = False
    targets: tuple[str, ...] | None = None  # overrides `placement` for models it does not know

    def __post_init__(self):
        check_adapter_args(self.size, self.reduction, self.activation, self.dropout, self.variant)
        if self.targets is None and self.placement not in PLACEMENTS:
            raise ValueError(f"unknown adapter placement {self.placement!r}; choose one of "
                             f"{sorted(PLACEMENTS)}, or give targets=(...) explicitly.")
        _as_tuple(self, "targets")

    def plan(self, model, exclude=()):
        if self.targets is not None:
            return resolve(model, self.targets, nn.Linear, "Adapter", exclude=exclude)
        names = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and not any(n == e or n.startswith(e + ".") for e in exclude)]
        chosen = [n for n in names if any(suffix_matches(n, p) for p in PLACEMENTS[self.placement])]
        if not chosen:
            raise TargetError(
                f"adapter placement {self.placement!r} found no layer in this "
                f"{type(model).__name__}: it looks for names ending in "
                f"{' or '.join(PLACEMENTS[self.placement])}. Give targets=(...) with the names of "
                f"the sublayer outputs to adapt.")
        return chosen

    def inject(self, model, names):
        for n in names:
            base = model.get_submodule(n)
            ad = BottleneckAdapter(base.out_features, self.size, self.reduction, self.activation,
                                   self.dropout, self.layernorm, self.variant)
            w = base.weight
            replace_module(model, n, AdapterLinear(base, ad.to(dtype=w.dtype, device=w.device)))


@register("hybrid")
@dataclass(frozen=True)
class Hybrid(Method):
    """LoRA on the attention projections plus bottleneck adapters after the sublayers."""

    lora: LoRA = field(default_factory=LoRA)
    adapter: Adapter = field(default_factory=Adapter)

    def __post_init__(self):
        if not isinstance(self.lora, LoRA) or not isinstance(self.adapter, Adapter):
            raise TypeError("Hybrid(lora=LoRA(...), adapter=Adapter(...)) takes a LoRA and an Adapter spec.")

    def plan(self, model, exclude=()):
        # Both halves are resolved against the untouched model, so either can fail cleanly.
        return [("lora", self.lora.plan(model, exclude)), ("adapter", self.adapter.plan(model, exclude))]

    def inject(self, model, names):
        (_, lora_names), (_, adapter_names) = names
        self.lora.inject(model, lora_names)
        self.adapter.inject(model, adapter_names)  # an adapter may wrap a LoRALinear: fine


@register("full")
@dataclass(frozen=True)
class FullFineTune(Method):
    """Every parameter trains: the quality reference, at full cost."""

    trains_base: ClassVar[bool] = True


@register("head_only")
@dataclass(frozen=True)
class HeadOnly(Method):
    """Only the task head trains: the frozen-features baseline."""
