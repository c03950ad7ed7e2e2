"""Adapter files: peftkit's own format and Hugging Face PEFT's LoRA layout.

peftkit's format is a folder with
  - adapter.safetensors: only the adapter and head tensors, under their unwrapped-model names;
  - adapter.json: the method spec, the peftkit version, the head name and a base fingerprint
    (architecture, the names and shapes of the base parameters, and a digest of frozen values).
Nothing is ever unpickled: tensors are safetensors, metadata is JSON. Every file is written to
a temporary name and renamed, so a crash never leaves a half-written adapter behind. Loading
reads and checks everything before it touches the model, and rolls back if applying fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..core.methods import Method
from ..core.surgery import applied, apply, canonical_name, lora_layers, remove, wrapper_names
from ..layers.names import is_adapter_param, under_any

WEIGHTS, CONFIG = "adapter.safetensors", "adapter.json"


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt, or does not fit this model. The model is unchanged."""


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    _atomic_write(Path(path), lambda t: Path(t).write_text(json.dumps(obj, indent=2, sort_keys=True)))


def write_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    # safetensors writes the header's metadata map in hash order, so two or more keys make the
    # bytes differ from run to run. Callers pass at most one key; everything else goes to JSON.
    if metadata is not None and len(metadata) > 1:
        raise ValueError("write_tensors keeps files byte-reproducible: pass at most one metadata key")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda t: save_file(tensors, t, metadata=metadata))


def read_json(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(f"{path} not found: {what} needs it. Was the folder written by "
                               "save_adapter/export_peft, and is the path right?")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path} is not valid JSON ({e}); the file is corrupt. Save the adapter again.") from None
    if not isinstance(obj, dict):
        raise AdapterFileError(f"{path} should hold a JSON object, found {type(obj).__name__}.")
    return obj


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        pickled = [p.name for p in path.parent.glob("*.bin")] + [p.name for p in path.parent.glob("*.pt")]
        hint = (f" Found {pickled}: pickle files are never loaded, since unpickling runs arbitrary "
                "code; convert them to safetensors in a trusted environment." if pickled else "")
        raise AdapterFileError(f"{path} not found.{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({e}); it may be truncated "
                               "or corrupt. Save the adapter again.") from None


def _unwrapped_names(model: nn.Module):
    """(parameter, its unwrapped names): each parameter once; a tied one has several names."""
    wraps = wrapper_names(model)
    groups: dict[int, tuple] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), (p, []))[1].append(canonical_name(name, wraps))
    return groups.values()


def base_items(model: nn.Module, skip_head):
    """(unwrapped name, parameter) for every base parameter: no adapter tensors, none the head
    holds under any of its names (a name, a tuple of names, or None)."""
    for p, names in _unwrapped_names(model):
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


def _heads_arg(done):
    """The head as `apply` takes it: one name (as every file before several heads), or a tuple."""
    return done.heads if len(done.heads) > 1 else done.head


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


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: every trainable tensor, under unwrapped names."""
    done = applied(model)
    if done is None:
        raise ValueError("this model has no peftkit method applied: apply(model, method) first.")
    state = {}
    for p, names in _unwrapped_names(model):
        in_head = [n for n in names if under_any(n, done.heads)]
        if is_adapter_param(names[0]) or done.method.trains_base:
            state[names[0]] = p
        elif in_head:  # under the head's name, also when the weight is tied (GPT-2's lm_head is wte's)
            state[in_head[0]] = p
    return state


def save_adapter(model: nn.Module, directory) -> Path:
    """Write adapter.safetensors and adapter.json into `directory` (created if needed)."""
    done = applied(model)
    state = adapter_state(model)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format": "peftkit-adapter", "peftkit_version": __version__, "method": done.method.to_dict(),
            "head": done.head, "base": fingerprint(model, _heads_arg(done), done.method),
            **({"heads": list(done.heads)} if len(done.heads) > 1 else {}),
            "tensors": {k: list(v.shape) for k, v in state.items()}}
    write_tensors(d / WEIGHTS, state, {"format": "pt"})
    write_json(d / CONFIG, meta)
    return d


@dataclass(frozen=True)
class AdapterFile:
    """An adapter folder read and checked for itself, not yet applied to any model."""

    path: Path
    method: Method
    head: str | None
    tensors: dict  # unwrapped name -> CPU tensor
    meta: dict     # adapter.json as written


def read_adapter(directory) -> AdapterFile:
    """Read adapter.json and adapter.safetensors and check that they describe a peftkit adapter.
    Touches no model; raises AdapterFileError for a missing, corrupt or pickled file."""
    d = Path(directory)
    meta = read_json(d / CONFIG, "load_adapter")
    if meta.get("format") != "peftkit-adapter":
        hint = " It looks like a PEFT adapter: use import_peft." if (d / "adapter_config.json").exists() else ""
        raise AdapterFileError(f"{d / CONFIG} is not a peftkit adapter description.{hint}")
    try:
        method = Method.from_dict(meta["method"])
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{d / CONFIG} holds an invalid method spec: {e}") from None
    heads = meta.get("heads")
    head = tuple(heads) if isinstance(heads, list) and len(heads) > 1 else meta.get("head")
    return AdapterFile(d, method, head, read_tensors(d / WEIGHTS), meta)


def check_base(model: nn.Module, adapter: AdapterFile) -> None:
    """Raise AdapterFileError unless `model` is the base `adapter` was saved from (by its
    fingerprint: architecture, parameter names and shapes, and the frozen non-Linear values)."""
    want, have = adapter.meta.get("base", {}), fingerprint(model, adapter.head, adapter.method)
    for key, what in (("architecture", "architecture"), ("params_sha256", "parameter names and shapes")):
        if want.get(key) != have[key]:
            raise AdapterFileError(
                f"this adapter was trained on a different base: its {what} differ "
                f"(adapter: {want.get('architecture')}, {want.get('n_params')} base parameters; "
                f"model: {have['architecture']}, {have['n_params']}). Load it into the base it was "
                "saved from.")
    if want.get("stable_values_sha256") != have["stable_values_sha256"]:
        raise AdapterFileError("this adapter was trained on a base with the same architecture but "
                               "different weights (its embeddings and norms differ). Load it into the base it was saved from.")


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Apply the saved method to a fresh base `model` and load its tensors. Checks the base
    fingerprint and every shape first; on any error the model is left as it was."""
    adapter = read_adapter(directory)
    if applied(model) is not None:
        raise ValueError("load_adapter needs a fresh base model, but this one already has "
                         f"{applied(model).method} applied. Load the base again with load_base().")
    check_base(model, adapter)
    return apply_and_fill(model, adapter.method, adapter.head, adapter.tensors, str(adapter.path / WEIGHTS))


def check_tensors(state: dict, tensors: dict, source: str) -> None:
    """Raise AdapterFileError unless `tensors` has exactly the names and shapes of `state`."""
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise AdapterFileError(f"{source} does not match the method: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}.")
    bad = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in state.items()
           if tensors[k].shape != v.shape]
    if bad:
        k, got, exp = bad[0]
        raise AdapterFileError(f"{source}: tensor {k} has shape {got}, the model expects {exp} "
                               f"({len(bad)} mismatches; e.g. a different num_labels or rank).")


def apply_and_fill(model, method, head, tensors, source: str):
    """Apply `method`, copy `tensors` into it, and roll back completely if anything is off."""
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    apply(model, method, head=head)
    try:
        state = adapter_state(model)
        check_tensors(state, tensors, source)
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(tensors[k])
    except BaseException:
        remove(model, grads)
        raise
    return model


def adapter_bytes(model: nn.Module) -> int:
    """The size on disk of the model's adapter file (adapter and head tensors plus JSON)."""
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d)
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
