"""The base of every method spec (`Method`, `Knob`) and the one registry, `METHODS`.

`methods` re-exports all of this, and registers the specs in the order tables list them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

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


