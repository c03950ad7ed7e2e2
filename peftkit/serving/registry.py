"""The adapters a `Deployer` holds: how a name and an adapter are checked before anything changes,
and the in-memory entry (`Registered`) that a switch copies from.

Registering runs every check first and changes nothing until all have passed:

  1. the name (it also names a folder in `Deployer.save`), and that it is free unless replace=True;
  2. the adapter read and checked for itself (files/adapter_file.py: JSON, checksum, values), from
     a folder or an in-memory AdapterFile; a pickle file is refused, never loaded;
  3. what this Deployer can swap: no PEFT-backed method when merged, no full fine-tune ever;
  4. (in the Deployer, which holds the base) the base fingerprint and the exact names and shapes;
  5. every tensor finite, then copied into owned CPU memory in the base's dtype.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.methods import Method
from ..files.adapter_file import (
    CONFIG,
    WEIGHTS,
    AdapterFile,
    AdapterFileError,
    as_adapter,
    check_tensors,
    read_adapter,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a name is also a folder in save()
ROW_COLUMNS = ["name", "method", "tensors", "bytes", "source", "active"]


class UnknownAdapterError(KeyError):
    """No adapter is registered under the requested name."""

    def __str__(self):  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class Registered:
    """One adapter held in memory: what it is, where it came from, and its CPU tensors."""

    name: str
    method: Method
    head: str | None
    keys: tuple  # tensor names, sorted: the order in which a switch copies them
    tensors: tuple  # the CPU tensors, in `keys` order
    meta: dict
    source: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def plan_key(method: Method, head) -> tuple:
    """A hashable key for (method, head), whatever a file's spec held (lists, nested specs)."""
    return json.dumps(method.to_dict(), sort_keys=True, default=str), head if not isinstance(head, list) else tuple(head)


def check_name(name, held: dict, replace: bool) -> None:
    """Raise ValueError unless `name` is a valid adapter name, free in `held` or replace=True."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit (it also names a folder in save()).")
    if name in held and not replace:
        raise ValueError(f"an adapter named {name!r} is already registered (from "
                         f"{held[name].source}); pass replace=True to swap it, or pick another name.")


def read_servable(adapter_dir, merged: bool):
    """(the AdapterFile, its folder or source, where its tensors come from) for `adapter_dir`, a
    folder or an in-memory AdapterFile, checked as a file is and as one a Deployer can hot-swap."""
    if isinstance(adapter_dir, AdapterFile):  # in memory (a merge's result): checked as a file is
        adapter = as_adapter(adapter_dir)
        d, where = adapter.source, adapter.source
    else:
        d = Path(adapter_dir)
        if d.is_file():
            raise AdapterFileError(
                f"{d} is a file; register takes an adapter folder holding {CONFIG} and {WEIGHTS} "
                "(written by save_adapter or experiments.compare). Pickle files (.pt, .bin) are never "
                "loaded, since unpickling runs arbitrary code.")
        adapter, where = read_adapter(d), str(d / WEIGHTS)
    if merged and getattr(adapter.method, "peft_type", None):
        raise AdapterFileError(f"{d} holds a PEFT-backed method ({adapter.method.describe()}); a merged Deployer folds "
                               "peftkit's LoRA into the base and cannot swap PEFT's layers. Serve it with an unmerged "
                               "Deployer (merged=False).")
    if adapter.method.trains_base:
        raise AdapterFileError(f"{d} holds a full fine-tune ({adapter.method.name}): it replaces every base "
                               "weight, so it cannot be hot-swapped on a shared base. Serve it as a model of its own.")
    return adapter, d, where


def held_tensors(adapter: AdapterFile, expected: dict, where: str, dtype, pin: bool) -> tuple[tuple, tuple]:
    """(keys, tensors): `adapter`'s tensors checked against the `expected` names and shapes and for
    NaN or inf, then copied, sorted by name, into owned memory of `dtype` (pinned if `pin`)."""
    check_tensors(expected, adapter.tensors, where)
    keys = tuple(sorted(expected))
    tensors = []
    for k in keys:
        t = adapter.tensors[k]
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"{where}: tensor {k} holds NaN or inf (a diverged training run?); "
                                   "it would poison every prediction. Retrain or pick an earlier checkpoint.")
        t = t.to(dtype).contiguous().clone()  # owned memory, not a view of the file buffer
        tensors.append(t.pin_memory() if pin else t)
    return keys, tuple(tensors)


def lookup(held: dict, name) -> Registered:
    """The entry registered as `name` in `held`, or an UnknownAdapterError naming the registered ones."""
    if name not in held:
        known = sorted(held) or "none yet"
        raise UnknownAdapterError(f"no adapter named {name!r}; registered: {known}. "
                                  "Add one with register(name, adapter_dir).")
    return held[name]


def summary_row(e: Registered, active: str | None) -> dict:
    """One row of `Deployer.adapters()` (ROW_COLUMNS)."""
    return {"name": e.name, "method": e.method.describe(), "tensors": len(e.keys), "bytes": e.nbytes,
            "source": e.source, "active": e.name == active}
