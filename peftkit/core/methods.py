"""Methods as small frozen specs, and the one registry of them, `METHODS`.

A spec validates its own settings when built, names the layers it would change with `plan`
(which raises before anything is touched), and performs the change with `inject`.

Everything that lists methods iterates `METHODS`: the command line, tuning, selection, plots and
the test matrix. So each registered class carries what they need: its `label` and `color`, its
`knobs` (the settings a user or a search may change, with their command-line option and default
search range), its `default_lr` with the reason for it, the `lr_grid` that `compare(lr="val")`
chooses a rate from on validation (three rates around the default, which a wider search at
notebook 04's budget put in the middle), and the `variants` the tests run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..layers.adapters import (
    PLACEMENTS,
    AdapterLinear,
    BottleneckAdapter,
    check_adapter_args,
)
from ..layers.names import under
from .architectures import architecture, unknown_architecture
from .kinds import ADAPTER_KINDS, adapter_width
from .spec import DEFAULT_TARGETS, METHODS, Knob, Method, _aliases, _as_tuple, register  # noqa: F401  (re-exported)
from .lora_specs import DoRA, LoRA  # noqa: F401  (registered first: tables list the LoRA family first)
from .targets import TargetError, replace_module, resolve, suffix_matches


@register("adapter")
@dataclass(frozen=True)
class Adapter(Method):
    """A bottleneck adapter after the chosen sublayers (`placement`, or explicit `targets`)."""

    label: ClassVar[str] = "Adapter"
    color: ClassVar[str] = "#ff7f0e"
    knobs: ClassVar[tuple[Knob, ...]] = (
        Knob("size", int, "bottleneck width (default hidden/reduction)", (8, 128, "log"), name="adapter_size"),
        Knob("reduction", int, "bottleneck width as hidden/reduction when no size is given"),
        Knob("placement", str, "pfeiffer (after the FFN) or houlsby (after attention and FFN)"),
        Knob("variant", str, "simple, or deep (two stages with LayerNorms)"),
        Knob("dropout", float, "dropout inside the bottleneck", (0.0, 0.2), flag="adapter-dropout"),
    )
    default_lr: ClassVar[float] = 5e-3
    lr_reason: ClassVar[str] = (
        "LoRA's rate, chosen on movies validation for 2,000 snippets (63 steps); the adapter's own "
        "best there, 1e-2, scored 0.4 points higher on validation")
    lr_grid: ClassVar[tuple[float, ...]] = (2e-3, 5e-3, 1e-2)
    variants: ClassVar[dict[str, dict]] = {"pfeiffer": {"placement": "pfeiffer"}, "houlsby": {"placement": "houlsby"},
                                           "deep": {"variant": "deep", "layernorm": True}}

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
            names = resolve(model, self.targets, ADAPTER_KINDS, "Adapter", exclude=exclude)
            for n in names:
                adapter_width(model.get_submodule(n))  # raises for a kind it cannot follow
            return names
        arch = architecture(model)
        patterns = arch.placements[self.placement] if arch else PLACEMENTS[self.placement]
        names = [n for n, m in model.named_modules()
                 if isinstance(m, ADAPTER_KINDS) and not any(under(n, e) for e in exclude)]
        chosen = [n for n in names if any(suffix_matches(n, p) for p in patterns)]
        if not chosen:
            known = "" if arch else " " + unknown_architecture(model, "the adapter placement")
            raise TargetError(
                f"adapter placement {self.placement!r} found no layer in this "
                f"{type(model).__name__}: it looks for names ending in "
                f"{' or '.join(patterns)}. Give targets=(...) with the names of "
                f"the sublayer outputs to adapt.{known}")
        return chosen

    def describe(self):
        size = self.size if self.size is not None else f"d/{self.reduction}"
        return f"adapter {self.placement if not self.targets else 'custom'} {self.variant} m={size}"

    def inject(self, model, names):
        for n in names:
            base = model.get_submodule(n)
            ad = BottleneckAdapter(adapter_width(base), self.size, self.reduction, self.activation,
                                   self.dropout, self.layernorm, self.variant)
            w = base.weight
            wrapper = AdapterLinear(base, ad.to(dtype=w.dtype, device=w.device))
            for alias in _aliases(model, base) or [n]:
                replace_module(model, alias, wrapper)


@register("hybrid")
@dataclass(frozen=True)
class Hybrid(Method):
    """LoRA on the attention projections plus bottleneck adapters after the sublayers."""

    label: ClassVar[str] = "Hybrid"
    color: ClassVar[str] = "#2ca02c"
    default_lr: ClassVar[float] = 5e-3
    lr_reason: ClassVar[str] = "the rate of its two halves, LoRA and the adapter"
    lr_grid: ClassVar[tuple[float, ...]] = (2e-3, 5e-3, 1e-2)

    lora: LoRA = field(default_factory=LoRA)
    adapter: Adapter = field(default_factory=Adapter)

    def __post_init__(self):
        if not isinstance(self.lora, LoRA) or not isinstance(self.adapter, Adapter):
            raise TypeError("Hybrid(lora=LoRA(...), adapter=Adapter(...)) takes a LoRA and an Adapter spec.")

    @classmethod
    def all_knobs(cls):
        seen = {}
        for k in LoRA.knobs + Adapter.knobs:
            seen.setdefault(k.dest, k)
        return tuple(seen.values())

    @classmethod
    def from_knobs(cls, values, by="key"):
        return cls(lora=LoRA.from_knobs(values, by), adapter=Adapter.from_knobs(values, by))

    def describe(self):
        return f"hybrid ({self.lora.describe()} + {self.adapter.describe()})"

    def plan(self, model, exclude=()):
        # Both halves are resolved against the untouched model, so either can fail cleanly.
        return [("lora", self.lora.plan(model, exclude)), ("adapter", self.adapter.plan(model, exclude))]

    def merges_into(self, model, exclude=()):
        return self.lora.plan(model, exclude)

    def inject(self, model, names):
        (_, lora_names), (_, adapter_names) = names
        self.lora.inject(model, lora_names)
        self.adapter.inject(model, adapter_names)  # an adapter may wrap a LoRALinear: fine


@register("full")
@dataclass(frozen=True)
class FullFineTune(Method):
    """Every parameter trains: the quality reference, at full cost."""

    label: ClassVar[str] = "Full fine-tune"
    color: ClassVar[str] = "#d62728"
    trains_base: ClassVar[bool] = True
    default_lr: ClassVar[float] = 2e-4
    lr_reason: ClassVar[str] = (
        "chosen on movies validation for 2,000 snippets (63 steps): of 2e-5 to 4e-4, 2e-4 scored best; "
        "the usual BERT rate, 2e-5, is too low for so few steps")
    lr_space: ClassVar[tuple] = (1e-6, 1e-3, "log")
    lr_grid: ClassVar[tuple[float, ...]] = (1e-4, 2e-4, 4e-4)


@register("head_only")
@dataclass(frozen=True)
class HeadOnly(Method):
    """Only the task head trains: the frozen-features baseline."""

    label: ClassVar[str] = "Head only"
    color: ClassVar[str] = "#9467bd"
    needs_head: ClassVar[bool] = True
    default_lr: ClassVar[float] = 1e-3
    lr_reason: ClassVar[str] = "a linear probe on frozen features; 1e-3 is the rate notebook 04 uses for it"
    lr_space: ClassVar[tuple] = (1e-4, 3e-2, "log")
    lr_grid: ClassVar[tuple[float, ...]] = (1e-3, 3e-3, 1e-2)


from .peft_method import PeftMethod  # noqa: E402,F401  (registered last: any PEFT method, by its config)
