"""Training checkpoints: trainable tensors, optimizer, scheduler, RNG and position, no pickles.

Layout under `checkpoint_dir`:
    step-00000120/state.safetensors   trainable parameters, optimizer tensors, RNG states
    step-00000120/state.json          step, epoch, batch position, scheduler, history, ...
    latest.json                       {"dir": "step-00000120"}, replaced atomically
A checkpoint folder is complete before `latest.json` points at it, so a run killed at any
moment (even mid-write) resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest.json"


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
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, js = pack(named_params, optimizer, scheduler, meta)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(js))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(json.dumps({"dir": name, "step": meta["step"]}))
    os.replace(pointer, root / LATEST)  # the commit point
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest(directory) -> Path | None:
    root = Path(directory)
    try:
        pointer = json.loads((root / LATEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    path = root / pointer["dir"]
    return path if (path / "state.json").exists() else None


def load(path: Path, named_params: dict, optimizer, scheduler) -> dict:
    """Restore everything `save` wrote into live objects; returns the JSON metadata."""
    tensors = load_file(str(Path(path) / "state.safetensors"))
    js = json.loads((Path(path) / "state.json").read_text())
    missing = [n for n in named_params if f"param/{n}" not in tensors]
    if missing:
        raise ValueError(f"checkpoint {path} does not hold trainable parameter(s) {missing[:3]}: it "
                         "was written for a different method or model. Use another checkpoint_dir.")
    with torch.no_grad():
        for n, p in named_params.items():
            p.copy_(tensors[f"param/{n}"])
    opt_state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt/"):
            _, i, k = key.split("/", 2)
            opt_state.setdefault(int(i), {})[k] = v
    for key, v in js["optimizer"]["scalars"].items():
        i, k = key.split("/", 1)
        opt_state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": js["optimizer"]["param_groups"]})
    scheduler.load_state_dict({**scheduler.state_dict(), **js["scheduler"]})
    torch.set_rng_state(tensors["rng/cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng/cuda/"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    return js
