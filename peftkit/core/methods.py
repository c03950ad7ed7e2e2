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

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from ..layers.adapters import (
    PLACEMENTS,
    AdapterLinear,
    BottleneckAdapter,
    check_adapter_args,
)
from ..layers.lora import check_lora_args
from ..layers.names import under
from .architectures import architecture, unknown_architecture
from .kinds import ADAPTER_KINDS, LORA_KINDS, adapter_width, lora_layer, lora_problem
from .targets import TargetError, replace_module, resolve, suffix_matches

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    """Class decorator: add a method spec to `METHODS` under `name`."""
    def deco(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__name__}).")
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


@dataclass(frozen=True)
class Knob:
    """One setting of a method that a user (command line) or a search (tuning) may change."""

    field: str                       # the spec's dataclass field
    kind: type                       # int, float, bool, str, or tuple (comma-separated on the command line)
    help: str
    space: tuple | list | None = None  # the default search range for tuning; None: not searched
    name: str | None = None          # its name in a search space, when not the field's
    flag: str | None = None          # its command-line option without "--", when not the name's

    @property
    def key(self) -> str:
        return self.name or self.field

    @property
    def option(self) -> str:
        return self.flag or self.key.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.option.replace("-", "_")


class Method:
    """Base of every method spec. Subclasses are frozen dataclasses, registered with `register`."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""        # how tables and figures name the method
    color: ClassVar[str] = "#7f7f7f"  # its colour in every figure of the project
    trains_base: ClassVar[bool] = False  # True: every base parameter trains (full fine-tune)
    needs_head: ClassVar[bool] = False   # True: the head is all that trains, so a model without one is an error
    knobs: ClassVar[tuple[Knob, ...]] = ()
    default_lr: ClassVar[float] = 1e-3
    lr_reason: ClassVar[str] = ""
    lr_space: ClassVar[tuple] = (1e-5, 1e-2, "log")  # the learning rates a search tries
    lr_grid: ClassVar[tuple[float, ...]] = ()  # the rates lr="val" chooses from; () gives default/2, default, 2*default
    variants: ClassVar[dict[str, dict]] = {"": {}}  # settings the test matrix runs, by variant name

    @classmethod
    def all_knobs(cls) -> tuple[Knob, ...]:
        return cls.knobs

    @classmethod
    def lr_choices(cls) -> tuple[float, ...]:
        """The learning rates `compare(lr="val")` chooses this family's from, on validation."""
        return tuple(cls.lr_grid) or (cls.default_lr / 2, cls.default_lr, cls.default_lr * 2)

    @classmethod
    def from_knobs(cls, values: dict, by: str = "key") -> "Method":
        """The spec whose knobs take `values` (keyed by each knob's `key`, or its command-line
        `dest` with by="dest"); knobs absent or None keep the spec's defaults."""
        kwargs = {}
        for k in cls.knobs:
            v = values.get(getattr(k, by))
            if v is not None:
                kwargs[k.field] = tuple(t for t in v.split(",") if t) if k.kind is tuple and isinstance(v, str) else v
        return cls(**kwargs)

    def describe(self) -> str:
        """A short label for this configuration: 'lora r=8', 'adapter pfeiffer simple m=24', 'full'."""
        return self.name

    def plan(self, model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
        """The module names `inject` would change. Raises TargetError; never modifies."""
        return []

    def inject(self, model: nn.Module, names: list[str]) -> None:
        """Wrap the planned modules in place."""

    def merges_into(self, model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
        """The modules of an unwrapped `model` whose weights a merge of this method would change."""
        return []

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


DEFAULT_TARGETS = ("query", "value")  # LoRA()'s targets: the architecture's defaults (BERT's are these)


def _aliases(model: nn.Module, module: nn.Module) -> list[str]:
    """Every name under which `module` is registered (T5 may hold one embedding as `shared` and
    as `encoder.embed_tokens`): a wrapper must replace all of them, or some calls miss it."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module and n]


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
    )
    default_lr: ClassVar[float] = 5e-3
    lr_reason: ClassVar[str] = (
        "chosen on movies validation for 2,000 snippets (63 steps): of 1e-3, 2e-3, 5e-3 and 1e-2, "
        "5e-3 scored best; the usual 1e-3 is too low for so few steps")
    lr_grid: ClassVar[tuple[float, ...]] = (2e-3, 5e-3, 1e-2)
    variants: ClassVar[dict[str, dict]] = {"": {}, "rslora": {"rslora": True}}

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False

    def __post_init__(self):
        check_lora_args(self.r, self.alpha, self.dropout)
        _as_tuple(self, "targets")

    def describe(self):
        return f"lora r={self.r}" + (" rs" if self.rslora else "")

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
        return names

    def merges_into(self, model, exclude=()):
        return self.plan(model, exclude)

    def inject(self, model, names):
        for n in names:
            base = model.get_submodule(n)
            layer = lora_layer(base, self.r, self.alpha, self.dropout, self.rslora)
            for alias in _aliases(model, base) or [n]:
                replace_module(model, alias, layer)


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
