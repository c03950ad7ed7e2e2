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
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..core.methods import Method
from ..core.surgery import applied, apply, canonical_name, lora_layers, remove, wrapper_names
from ..layers.names import is_adapter_param, under_any
from ..storage import atomic_folder, is_sha256, sha256_bytes, sha256_file

WEIGHTS, CONFIG = "adapter.safetensors", "adapter.json"
MAX_ABS = 1e6  # no trained weight comes near it; a flipped exponent bit lands far beyond it
MAX_JSON_BYTES = 16 * 2**20  # an adapter.json is a few KB


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
        if path.stat().st_size > MAX_JSON_BYTES:
            raise AdapterFileError(f"{path} is {path.stat().st_size:,} bytes, far more than any peftkit JSON "
                                   "file; it is not one. Save the adapter again.")
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        if isinstance(e, AdapterFileError):
            raise
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise AdapterFileError(f"{path} is not valid JSON ({why}); the file is corrupt. Save the adapter again.") from None
    except OSError as e:
        raise AdapterFileError(f"{path} cannot be read ({e.strerror}); {what} needs a readable file.") from None
    if not isinstance(obj, dict):
        raise AdapterFileError(f"{path} should hold a JSON object, found {type(obj).__name__}. Save the adapter again.")
    return obj


def read_tensors(path: Path, sha256: str | None = None, described_in=None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read once; with `sha256`, only if its bytes hash to it."""
    path = Path(path)
    if not path.exists():
        pickled = [p.name for p in path.parent.glob("*.bin")] + [p.name for p in path.parent.glob("*.pt")]
        hint = (f" Found {pickled}: pickle files are never loaded, since unpickling runs arbitrary "
                "code; convert them to safetensors in a trusted environment." if pickled else "")
        raise AdapterFileError(f"{path} not found.{hint}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AdapterFileError(f"{path} cannot be read ({e.strerror}).") from None
    if sha256 is not None and sha256_bytes(data) != sha256:
        raise AdapterFileError(f"{path} does not match the SHA-256 recorded in {described_in}: it is truncated "
                               "or corrupt, or was changed after saving. Nothing was loaded; save the adapter again.")
    try:
        return load_bytes(data)
    except Exception as e:  # parsing untrusted bytes: any failure is the file's, never a crash
        raise AdapterFileError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be "
                               "truncated or corrupt. Save the adapter again.") from None


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
