"""A Deployer on disk: every registered adapter as safetensors + JSON, and a manifest.json that
names the base and the active adapter. Loading checks every adapter again, as `register` does;
nothing is unpickled."""

from __future__ import annotations

from pathlib import Path

from .._version import __version__
from ..files.adapter_file import (
    CONFIG,
    WEIGHTS,
    AdapterFileError,
    read_json,
    write_json,
    write_tensors,
)

MANIFEST = "manifest.json"


def save_deployment(dep, directory) -> Path:
    """Write `dep`'s adapters and manifest into `directory` (new, empty, or an earlier save)."""
    d = Path(directory)
    if d.exists() and any(d.iterdir()) and not (d / MANIFEST).exists():
        raise FileExistsError(f"{d} is not empty and holds no {MANIFEST}; save into a new or empty "
                              "folder (or one an earlier save() wrote), so files are not mixed.")
    (d / "adapters").mkdir(parents=True, exist_ok=True)
    entries, active = dep.snapshot()
    for e in entries:
        sub = d / "adapters" / e.name
        sub.mkdir(exist_ok=True)
        write_tensors(sub / WEIGHTS, dict(zip(e.keys, e.tensors)), {"format": "pt"})
        write_json(sub / CONFIG, e.meta)
    manifest = {"format": "peftkit-deployment", "peftkit_version": __version__, "base": dep.base,
                "num_labels": dep.num_labels, "seed": dep.seed, "max_length": dep.max_length,
                "merged": dep.merged, "label_names": dep.label_names, "active": active,
                "adapters": [{"name": e.name, "folder": f"adapters/{e.name}"} for e in entries]}
    write_json(d / MANIFEST, manifest)  # last: a folder without it is an unfinished save
    return d


def load_deployment(cls, directory, device: str = "auto"):
    """A `cls` (Deployer) rebuilt from save_deployment's folder."""
    d = Path(directory)
    m = read_json(d / MANIFEST, "Deployer.load")
    if m.get("format") != "peftkit-deployment":
        raise AdapterFileError(f"{d / MANIFEST} is not a peftkit deployment manifest (format "
                               f"{m.get('format')!r}); was the folder written by Deployer.save()?")
    try:
        dep = cls(m["base"], num_labels=m["num_labels"], device=device, merged=m["merged"],
                  max_length=m["max_length"], seed=m["seed"], label_names=m.get("label_names"))
        entries = [(a["name"], a["folder"]) for a in m["adapters"]]
    except (KeyError, TypeError) as e:
        raise AdapterFileError(f"{d / MANIFEST} lacks or garbles the entry {e}; save the deployment again.") from None
    for name, folder in entries:
        sub = (d / folder).resolve()
        if d.resolve() not in sub.parents:
            raise AdapterFileError(f"{d / MANIFEST} points adapter {name!r} outside the folder ({folder}).")
        dep.register(name, sub)
    if m.get("active") is not None:
        dep.activate(m["active"])
    return dep
