"""Training checkpoints: trainable tensors, optimizer, scheduler, RNG and position, no pickles.

Layout under `checkpoint_dir`:
    step-00000120/state.safetensors   trainable parameters, optimizer tensors, RNG states
    step-00000120/state.json          step, epoch, batch position, scheduler, history, the run's
                                      record (TrainConfig, data signature, method spec) and the
                                      SHA-256 of state.safetensors
    latest.json                       {"dir": "step-00000120"}, replaced atomically
A checkpoint folder is written whole under a temporary name and renamed into place
(`storage.atomic_folder`) before `latest.json` points at it, so a run killed at any moment (even
mid-write) resumes from the last complete checkpoint.

Loading is in two steps, so that nothing changes before everything is known to fit: `read`
checks the checksum and the JSON, `restore` checks every tensor against the live parameters and
optimizer (exact shape, floating dtype, finite values: a (1, 32) tensor is never broadcast into
a (4, 32) parameter) and only then copies. Errors are CheckpointError, which says what to do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from ..storage import atomic_folder, is_sha256, sha256_bytes, sha256_file

LATEST = "latest.json"
STEP_RE = re.compile(r"^step-\d{8}$")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit this run. Nothing was changed."""


def pack(named_params, optimizer, scheduler, meta: dict) -> tuple[dict, dict]:
    """(tensors, json) describing the full training state."""
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in named_params}
    opt = optimizer.state_dict()
    opt_json = {"param_groups": opt["param_groups"], "scalars": {}}
    for i, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):  # exp_avg, exp_avg_sq and AdamW's tensor `step`
                tensors[f"opt/{i}/{k}"] = v.detach().cpu().contiguous()
            else:
                opt_json["scalars"][f"{i}/{k}"] = v
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    return tensors, {**meta, "optimizer": opt_json, "scheduler": sched}


def save(directory, named_params, optimizer, scheduler, meta: dict, keep: int = 1) -> Path:
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{meta['step']:08d}"
    tensors, js = pack(named_params, optimizer, scheduler, meta)
    final = root / name
    with atomic_folder(final) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        js["sha256"] = sha256_file(tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(js))
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(json.dumps({"dir": name, "step": meta["step"]}))
    os.replace(pointer, root / LATEST)  # the commit point
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.is_symlink() and p.name != name)
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest(directory) -> Path | None:
    """The checkpoint `latest.json` names; None when there is none yet. An unreadable pointer
    falls back to the newest complete step folder (with a warning), never to a fresh start."""
    root = Path(directory)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
        if not (isinstance(name, str) and STEP_RE.match(name)):
            raise ValueError(name)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError, OSError):
        steps = sorted(p.name for p in root.glob("step-*") if STEP_RE.match(p.name) and (p / "state.json").is_file())
        if not steps:
            raise CheckpointError(f"{pointer} is unreadable and {root} holds no complete checkpoint; remove "
                                  "the folder to start afresh, or point checkpoint_dir elsewhere.") from None
        warnings.warn(f"{pointer} is unreadable; resuming from the newest complete checkpoint, {steps[-1]}.",
                      stacklevel=3)
        name = steps[-1]
    path = root / name
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {name}, which holds no state.json; remove {root} to start afresh, "
                              "or point checkpoint_dir elsewhere.")
    return path


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    tensors: dict
    meta: dict


def read(path) -> Checkpoint:
    """Read and check a checkpoint folder (checksum, JSON layout); touches nothing live."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_bytes().decode("utf-8"))
        data = (path / "state.safetensors").read_bytes()
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is incomplete or "
                              "corrupt. Resume from another checkpoint_dir, or start afresh.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("optimizer"), dict) or not isinstance(meta.get("scheduler"), dict):
        raise CheckpointError(f"{path / 'state.json'} is not a peftkit checkpoint description; start afresh "
                              "or use another checkpoint_dir.")
    sha = meta.get("sha256")
    if sha is not None and (not is_sha256(sha) or sha256_bytes(data) != sha):
        raise CheckpointError(f"{path / 'state.safetensors'} does not match the SHA-256 in its state.json: it is "
                              "truncated or corrupt. Nothing was loaded; resume from an earlier checkpoint or start afresh.")
    try:
        tensors = load_bytes(data)
    except Exception as e:  # parsing untrusted bytes
        raise CheckpointError(f"{path / 'state.safetensors'} is not a readable safetensors file "
                              f"({type(e).__name__}: {e}); resume from another checkpoint or start afresh.") from None
    return Checkpoint(path, tensors, meta)


def _check(path, key, t, shape, floating=True) -> None:
    if t is None:
        raise CheckpointError(f"checkpoint {path} lacks {key}: it was written for a different method or "
                              "model. Use another checkpoint_dir.")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"checkpoint {path}: {key} has shape {tuple(t.shape)}, this run expects "
                              f"{tuple(shape)}. It was written for a different model or method; use another checkpoint_dir.")
    if floating and not t.is_floating_point():
        raise CheckpointError(f"checkpoint {path}: {key} is stored as {t.dtype}, not floating point; the file is corrupt.")
    if floating and t.numel() and not torch.isfinite(t).all():
        raise CheckpointError(f"checkpoint {path}: {key} holds NaN or inf; resume from an earlier checkpoint.")


def restore(ck: Checkpoint, named_params: dict, optimizer, scheduler) -> dict:
    """Check every tensor of `ck` against the live objects, then copy it all in. Returns the
    JSON metadata. On a CheckpointError nothing has changed."""
    path, tensors, js = ck.path, ck.tensors, ck.meta
    for n, p in named_params.items():
        _check(path, f"parameter {n}", tensors.get(f"param/{n}"), p.shape)
    extra = sorted(k[len("param/"):] for k in tensors if k.startswith("param/") and k[len("param/"):] not in named_params)
    if extra:
        raise CheckpointError(f"checkpoint {path} holds parameters this model does not train ({extra[:3]}): it was "
                              "written for a different method. Use another checkpoint_dir.")
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    groups = js["optimizer"].get("param_groups")
    scalars = js["optimizer"].get("scalars", {})
    if (not isinstance(groups, list) or len(groups) != len(optimizer.param_groups)
            or any(not isinstance(g, dict) or len(g.get("params", ())) != len(live["params"])
                   for g, live in zip(groups, optimizer.param_groups))
            or not isinstance(scalars, dict)):
        raise CheckpointError(f"checkpoint {path}: its optimizer groups do not match this run's; it was written "
                              "for a different method. Use another checkpoint_dir.")
    opt_state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt/"):
            parts = key.split("/", 2)
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(flat):
                raise CheckpointError(f"checkpoint {path}: unexpected tensor {key}; the file is corrupt.")
            i, k = int(parts[1]), parts[2]
            _check(path, f"optimizer state {key}", v, () if k == "step" else flat[i].shape)
            opt_state.setdefault(i, {})[k] = v
    for key, v in scalars.items():
        i, _, k = key.partition("/")
        if not i.isdigit() or int(i) >= len(flat):
            raise CheckpointError(f"checkpoint {path}: unexpected optimizer entry {key}; the file is corrupt.")
        opt_state.setdefault(int(i), {})[k] = v
    rng = tensors.get("rng/cpu")
    _check(path, "the random generator state", rng, torch.get_rng_state().shape, floating=False)
    if rng.dtype != torch.uint8:
        raise CheckpointError(f"checkpoint {path}: the random generator state is {rng.dtype}, not uint8; the file is corrupt.")
    # everything fits: from here on, only copies
    with torch.no_grad():
        for n, p in named_params.items():
            p.copy_(tensors[f"param/{n}"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict({**scheduler.state_dict(), **js["scheduler"]})
    torch.set_rng_state(rng)
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng/cuda/"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    return js


def load(path: Path, named_params: dict, optimizer, scheduler) -> dict:
    """Restore everything `save` wrote into live objects; returns the JSON metadata."""
    return restore(read(path), named_params, optimizer, scheduler)
