"""The search space of `tuning.tune`: which knobs a method lets a search change (read from the
registry's `Knob`s), how a space is written and checked, how a trial's values become a method and a
training config, and the registry's recipe as a first trial (`default_start`).

    {"lr": (1e-5, 1e-2, "log"), "batch_size": [16, 32, 64], "r": (2, 64, "log"), "dropout": 0.1}

A range is (low, high) or (low, high, "log"), a list is a set of choices, a single value is fixed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from ..core.methods import METHODS
from ..training.loop import TrainConfig

TRAIN_KNOBS = ("lr", "batch_size", "weight_decay", "warmup_ratio", "epochs")


def _searchable(method: str) -> dict:
    """knob key -> Knob, for the knobs of `method` (read from the registry) that a search may change."""
    out = {}
    for k in METHODS[method].all_knobs():
        if k.space is not None:
            out.setdefault(k.key, k)  # a hybrid's "dropout" sets both halves' dropout
    return out


def method_knobs() -> dict[str, tuple[str, ...]]:
    """What each registered method lets a search change, besides the training knobs."""
    return {name: tuple(_searchable(name)) for name in METHODS}


METHOD_KNOBS = method_knobs()  # as of import; call method_knobs() to see methods registered later
INTEGER_KNOBS = ("batch_size", "epochs")
# names people reach for (PEFT's and transformers') -> ours, for "did you mean"
ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr",
           "batch": "batch_size", "size": "adapter_size", "bottleneck": "adapter_size", "reduction": "adapter_size"}


class SpaceError(ValueError):
    """A search space names an unknown knob or gives it an impossible range."""


def default_space(method: str = "lora") -> dict:
    """The search space: name -> (low, high), (low, high, "log"), [choices] or a fixed value."""
    _check_method(method)
    space = {"lr": METHODS[method].lr_space, "batch_size": [16, 32, 64]}
    return space | {key: k.space for key, k in _searchable(method).items()}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise SpaceError(f"cannot tune method {method!r}; choose one of {list(METHODS)}.")


def build(method: str, params: dict, epochs: int = 1, seed: int = 0):
    """(Method, TrainConfig) from one set of sampled values."""
    p = dict(params)
    train = {k: p.pop(k) for k in TRAIN_KNOBS if k in p}
    if "r" in p and "alpha" not in p:
        p["alpha"] = 2 * p["r"]  # a searched rank without a searched alpha keeps alpha/r = 2
    m = METHODS[method].from_knobs(p)
    cfg = TrainConfig(**{"epochs": epochs, "seed": seed, "progress": False, **train})
    return m, cfg


def parse_space(space: dict | None, method: str = "lora") -> dict:
    """Check a space against a method; returns name -> ("fixed" | "int" | "float" | "categorical", ...)."""
    _check_method(method)
    if space is None:
        space = default_space(method)
    if not isinstance(space, dict) or not space:
        raise SpaceError(f"the space must be a non-empty dict of knob -> range, like {default_space(method)}.")
    searchable = _searchable(method)
    knobs = tuple(searchable) + TRAIN_KNOBS
    dims = {}
    for name, spec in space.items():
        if name not in knobs:
            close = [ALIASES[name]] if ALIASES.get(name) in knobs else difflib.get_close_matches(str(name), knobs, n=1)
            raise SpaceError(f"unknown knob {name!r} for {method}" + (f"; did you mean {close[0]!r}?" if close else ".")
                             + f" The knobs for {method} are {list(knobs)}.")
        dims[name] = _parse_dim(name, spec, name in INTEGER_KNOBS or getattr(searchable.get(name), "kind", None) is int)
    # Build the method and config at every corner the space can reach, so an impossible value
    # (dropout 1.5, lr 0) fails now with the knob's name instead of inside trial 7.
    for name, d in dims.items():
        for value in _extremes(d):
            probe = {n: _extremes(o)[0] for n, o in dims.items()} | {name: value}
            try:
                build(method, probe)
            except (ValueError, TypeError) as e:
                raise SpaceError(f"{name}={value!r} is reachable in the space {space[name]!r} but invalid: {e}") from None
    return dims


def _parse_dim(name: str, spec, integer: bool):
    if isinstance(spec, list):
        if not spec:
            raise SpaceError(f"{name}: an empty list of choices; give at least one value.")
        return ("categorical", list(spec))
    if isinstance(spec, tuple):
        log = len(spec) == 3 and spec[2] == "log"
        if len(spec) not in (2, 3) or (len(spec) == 3 and not log):
            raise SpaceError(f"{name}={spec!r}: a range is (low, high) or (low, high, 'log').")
        low, high = spec[:2]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
            raise SpaceError(f"{name}={spec!r}: the bounds must be finite numbers.")
        if not low < high:
            raise SpaceError(f"{name}={spec!r}: low must be below high (for one value, write {name}={low!r}).")
        if log and low <= 0:
            raise SpaceError(f"{name}={spec!r}: a log range needs low > 0.")
        if integer and not (float(low).is_integer() and float(high).is_integer()):
            raise SpaceError(f"{name}={spec!r}: {name} is an integer; give integer bounds.")
        return ("int" if integer else "float", int(low) if integer else float(low),
                int(high) if integer else float(high), log)
    if isinstance(spec, (int, float, str)) and not isinstance(spec, bool):
        return ("fixed", spec)
    raise SpaceError(f"{name}={spec!r}: write (low, high), (low, high, 'log'), [choices] or a single value.")


def _extremes(d) -> list:
    return {"fixed": lambda: [d[1]], "categorical": lambda: d[1], "int": lambda: [d[1], d[2]],
            "float": lambda: [d[1], d[2]]}[d[0]]()


def suggest(trial: optuna.Trial, dims: dict) -> dict:
    out = {}
    for name, d in dims.items():
        if d[0] == "fixed":
            out[name] = d[1]
        elif d[0] == "categorical":
            out[name] = trial.suggest_categorical(name, d[1])
        elif d[0] == "int":
            out[name] = trial.suggest_int(name, d[1], d[2], log=d[3])
        else:
            out[name] = trial.suggest_float(name, d[1], d[2], log=d[3])
    return out


def _fits(d, value) -> bool:
    """Whether a searched dimension `d` (from parse_space) can take `value`."""
    if d[0] == "fixed":
        return False  # not searched: nothing to start from
    if d[0] == "categorical":
        return value in d[1]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return (d[0] != "int" or float(value).is_integer()) and d[1] <= value <= d[2]


def default_start(method: str = "lora", space: dict | None = None, **values) -> dict:
    """The registry's recipe for `method` as the first trial of `tune(start=...)`: the family's default
    rate (`Method.default_lr`), TrainConfig's batch size, its spec's default for every other searched
    knob, and `values` over them (e.g. batch_size=8). Only knobs that `space` searches, at values
    inside their range, are kept; the sampler draws the rest."""
    dims = parse_space(space, method)
    spec = METHODS[method]()
    parts = [spec] + [getattr(spec, f.name) for f in dataclasses.fields(spec)
                      if dataclasses.is_dataclass(getattr(spec, f.name))]  # a hybrid's halves
    start = {"lr": METHODS[method].default_lr, "batch_size": TrainConfig().batch_size}
    for key, knob in _searchable(method).items():
        part = next((x for x in parts if hasattr(x, knob.field)), None)
        if part is not None:
            start[key] = getattr(part, knob.field)
    start |= {k: v for k, v in values.items() if v is not None}
    return {k: _as_dim(dims[k], v) for k, v in start.items() if k in dims and _fits(dims[k], v)}


def _as_dim(d, value):
    """`value` as the dimension's own type (alpha 16 -> 16.0 for a float range)."""
    return float(value) if d[0] == "float" else int(value) if d[0] == "int" else value
