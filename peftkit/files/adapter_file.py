"""Adapter files: peftkit's own format and Hugging Face PEFT's LoRA layout.

peftkit's format is a folder with
  - adapter.safetensors: only the adapter and head tensors, under their unwrapped-model names;
  - adapter.json: the method spec, the peftkit version, the head name, a base fingerprint
    (architecture, the names and shapes of the base parameters, and a digest of frozen values)
    and `tensors_sha256`, the SHA-256 of adapter.safetensors.
Nothing is ever unpickled: tensors are safetensors, metadata is JSON. `save_adapter` writes a
whole new folder and swaps it in (`storage.atomic_folder`), so a crash leaves the old adapter or
the new one, never new tensors beside old JSON, and nothing is written through a planted symlink.

Loading checks everything before it touches the model, and a refusal (AdapterFileError) leaves
every parameter and `requires_grad` flag as it was:
  - the JSON's shape and types (a clear error, never a TypeError or RecursionError from parsing);
  - the checksum, so a flipped bit anywhere in the tensors is refused. Files saved before
    checksums existed carry none: they still load, with all the checks below and a warning
    that re-saving adds one (refusing them would strand every adapter already on disk);
  - every tensor floating-point (a header that declares a float tensor as I32 is refused),
    finite, and within +-MAX_ABS (1e6; trained weights stay orders of magnitude below, and a
    flipped exponent bit gives values near 1e38 that turn every prediction into NaN);
  - the base fingerprint;
  - the exact names and shapes the method would create, computed on a meta-device skeleton of the
    model, which allocates nothing: a rank of 2**40 in adapter.json is refused as a shape mismatch
    before a single byte is allocated, and no shape is ever broadcast;
  - target patterns, by core.targets (regexes that could backtrack for ever are refused).

The file reading and writing themselves (atomic writes, bounded JSON, checksummed safetensors,
AdapterFileError) are in safe_io.py; the base fingerprint is in fingerprint.py.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..core.methods import Method
from ..core.surgery import applied, apply, remove
from ..layers.names import is_adapter_param, under_any
from ..storage import atomic_folder, is_sha256, sha256_file
from .fingerprint import base_items, fingerprint, unwrapped_names  # noqa: F401  (base_items: importable from here as before)
from .safe_io import (  # noqa: F401  (each importable from here as before)
    MAX_JSON_BYTES,
    AdapterFileError,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)

WEIGHTS, CONFIG = "adapter.safetensors", "adapter.json"
MAX_ABS = 1e6  # no trained weight comes near it; a flipped exponent bit lands far beyond it


def check_method(method: Method, source: str) -> None:
    """Raise AdapterFileError for a setting no training produces: a scale (LoRA's alpha) beyond
    +-MAX_ABS would overflow the outputs however sane the tensors are."""
    for f in dataclasses.fields(method):
        v = getattr(method, f.name)
        if isinstance(v, Method):
            check_method(v, source)
        elif f.name == "alpha" and isinstance(v, (int, float)) and not abs(v) <= MAX_ABS:
            raise AdapterFileError(f"{source}: {method.name} alpha={v!r} is beyond {MAX_ABS:g}; it would overflow "
                                   "every prediction. The file is corrupt or crafted; save the adapter again.")


def check_values(tensors: dict, source: str) -> None:
    """Raise AdapterFileError unless every tensor is floating-point, finite and within +-MAX_ABS."""
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterFileError(f"{source}: tensor {k} is stored as {str(t.dtype).replace('torch.', '')}, not "
                                   "a floating-point type, so its bytes would be read as integers. The file is "
                                   "corrupt or was crafted; save the adapter again.")
        if not t.numel():
            continue
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"{source}: tensor {k} holds NaN or inf (a diverged training run?); it would "
                                   "poison every prediction. Retrain, or pick an earlier checkpoint.")
        peak = t.abs().amax().item()
        if peak > MAX_ABS:
            raise AdapterFileError(f"{source}: tensor {k} holds a value of {peak:.3g}, beyond +-{MAX_ABS:g}, where "
                                   "no trained weight lies (a flipped bit?); it would overflow the predictions to "
                                   "NaN. Save the adapter again from the trained model.")


def _heads_arg(done):
    """The head as `apply` takes it: one name (as every file before several heads), or a tuple."""
    return done.heads if len(done.heads) > 1 else done.head


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: every trainable tensor, under unwrapped names."""
    done = applied(model)
    if done is None:
        raise ValueError("this model has no peftkit method applied: apply(model, method) first.")
    state = {}
    for p, names in unwrapped_names(model):
        in_head = [n for n in names if under_any(n, done.heads)]
        if is_adapter_param(names[0]) or done.method.trains_base:
            state[names[0]] = p
        elif in_head:  # under the head's name, also when the weight is tied (GPT-2's lm_head is wte's)
            state[in_head[0]] = p
    return state


def write_adapter_files(folder: Path, tensors: dict, meta: dict) -> None:
    """adapter.safetensors, then adapter.json recording its names, shapes and SHA-256."""
    folder = Path(folder)
    write_tensors(folder / WEIGHTS, tensors, {"format": "pt"})
    write_json(folder / CONFIG, {**meta, "tensors": {k: list(v.shape) for k, v in tensors.items()},
                                 "tensors_sha256": sha256_file(folder / WEIGHTS)})


def save_adapter(model, directory) -> Path:
    """Write adapter.safetensors and adapter.json as the folder `directory`: a new folder is
    written and swapped in whole. `directory` may be absent, empty, or an earlier adapter folder
    (replaced whole); a folder holding other files is refused, so nothing of yours is deleted.
    `model` may also be an in-memory AdapterFile (a merge's result), checked as a file would be."""
    if isinstance(model, AdapterFile):
        adapter = as_adapter(model)
        state = adapter.tensors
        meta = {**{k: v for k, v in adapter.meta.items() if k not in ("tensors", "tensors_sha256")},
                "format": "peftkit-adapter", "peftkit_version": __version__, "method": adapter.method.to_dict()}
    else:
        done = applied(model)
        state = adapter_state(model)
        meta = {"format": "peftkit-adapter", "peftkit_version": __version__, "method": done.method.to_dict(),
                "head": done.head, "base": fingerprint(model, _heads_arg(done), done.method),
                **({"heads": list(done.heads)} if len(done.heads) > 1 else {})}
    with atomic_folder(directory, marker=CONFIG, what="save_adapter") as tmp:
        write_adapter_files(tmp, state, meta)
    return Path(directory)


@dataclass(frozen=True)
class AdapterFile:
    """An adapter read and checked for itself, not yet applied to any model: a folder's, or one
    built in memory (path None; a merge's result), which load_adapter, save_adapter and
    Deployer.register accept like a folder."""

    path: Path | None
    method: Method
    head: str | None
    tensors: dict  # unwrapped name -> CPU tensor
    meta: dict     # adapter.json as written (an in-memory one: format, method, head, base)

    @property
    def source(self) -> str:
        """Where the tensors come from, for error messages."""
        return str(self.path / WEIGHTS) if self.path is not None else "the in-memory adapter"


def as_adapter(source) -> AdapterFile:
    """An AdapterFile from a folder (read_adapter) or an in-memory one, checked either way: its
    method's settings and every tensor floating-point, finite and within +-MAX_ABS."""
    if not isinstance(source, AdapterFile):
        return read_adapter(source)
    if not isinstance(source.meta.get("base"), dict):
        raise AdapterFileError("the in-memory adapter carries no base fingerprint ('base' in its meta), so no "
                               "model can be checked against it; build it with merge_adapters or read_adapter.")
    check_method(source.method, source.source)
    check_values(source.tensors, source.source)
    return source


def read_adapter(directory) -> AdapterFile:
    """Read adapter.json and adapter.safetensors and check that they describe a peftkit adapter.
    Touches no model; raises AdapterFileError for a missing, corrupt or pickled file."""
    d = Path(directory)
    meta = read_json(d / CONFIG, "load_adapter")
    if meta.get("format") != "peftkit-adapter":
        hint = " It looks like a PEFT adapter: use import_peft." if (d / "adapter_config.json").exists() else ""
        raise AdapterFileError(f"{d / CONFIG} is not a peftkit adapter description.{hint}")
    spec = meta.get("method")
    if not isinstance(spec, dict):
        raise AdapterFileError(f"{d / CONFIG} holds no method spec (a JSON object under 'method'); save the adapter again.")
    try:
        method = Method.from_dict(spec)
    except Exception as e:  # parsing untrusted JSON: a TypeError or RecursionError is the file's fault
        raise AdapterFileError(f"{d / CONFIG} holds an invalid method spec ({type(e).__name__}: {e}); "
                               "save the adapter again.") from None
    check_method(method, str(d / CONFIG))
    head, heads = meta.get("head"), meta.get("heads")
    if head is not None and not (isinstance(head, str) and head):
        raise AdapterFileError(f"{d / CONFIG}: 'head' must be a module name or null, got {head!r}; save the adapter again.")
    if heads is not None:
        if not (isinstance(heads, list) and heads and all(isinstance(n, str) and n for n in heads)):
            raise AdapterFileError(f"{d / CONFIG}: 'heads' must be a list of module names, got {heads!r:.80}; "
                                   "save the adapter again.")
        head = tuple(heads) if len(heads) > 1 else heads[0]
    if not isinstance(meta.get("base", {}), dict):
        raise AdapterFileError(f"{d / CONFIG}: 'base' must be the fingerprint object save_adapter writes; save the adapter again.")
    sha = meta.get("tensors_sha256")
    if sha is None:
        warnings.warn(f"{d / CONFIG} records no SHA-256 of its tensors (saved by an older peftkit), so a damaged "
                      "file can only be caught by the value checks. Save the adapter again to add one.", stacklevel=3)
    elif not is_sha256(sha):
        raise AdapterFileError(f"{d / CONFIG}: 'tensors_sha256' is not a SHA-256 hex digest; the file is corrupt. "
                               "Save the adapter again.")
    tensors = read_tensors(d / WEIGHTS, sha, d / CONFIG)
    check_values(tensors, str(d / WEIGHTS))
    return AdapterFile(d, method, head, tensors, meta)


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
    """Apply the saved method to a fresh base `model` and load its tensors (`directory`: a folder
    or an in-memory AdapterFile). Checks the base fingerprint and every shape first; on any error
    the model is left as it was."""
    adapter = as_adapter(directory)  # a folder, or an in-memory AdapterFile (a merge's result)
    if applied(model) is not None:
        raise ValueError("load_adapter needs a fresh base model, but this one already has "
                         f"{applied(model).method} applied. Load the base again with load_base().")
    check_base(model, adapter)
    return apply_and_fill(model, adapter.method, adapter.head, adapter.tensors, adapter.source)


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device: every name and
    shape, no memory. Used to check an adapter's tensors without touching the live model."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def planned_state(sk: nn.Module, method: Method, head, source: str) -> dict[str, torch.Tensor]:
    """The tensors (meta: names and shapes only) that applying `method` would create on the model
    whose `skeleton` is `sk`. Allocates nothing, whatever the rank; `sk` itself is not changed."""
    return planned(sk, method, head, source)[1]


def planned(sk: nn.Module, method: Method, head, source: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(a copy of the skeleton `sk` with `method` applied, its adapter state): both on the meta
    device, so nothing is allocated whatever the rank. Raises AdapterFileError when it does not fit."""
    sk = copy.deepcopy(sk)
    try:
        with torch.device("meta"):  # layers built without an explicit device (adapters) stay empty too
            apply(sk, method, head=head)
        return sk, adapter_state(sk)
    except Exception as e:  # TargetError, bad settings, an impossible size: all the file's fault
        raise AdapterFileError(f"{source}: its method ({method.describe()}) does not fit this "
                               f"{type(sk).__name__}: {e}") from None


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
    """Check `tensors` against what `method` would create (on a skeleton), then apply `method` and
    copy them in. Every check runs before the model is touched; should applying itself fail, the
    wrappers are removed and every `requires_grad` flag restored."""
    check_tensors(planned_state(skeleton(model), method, head, source), tensors, source)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        apply(model, method, head=head)
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
