"""A Deployer on disk: every registered adapter as safetensors + JSON (with its SHA-256), and a
manifest.json that names the base and the active adapter. Saving writes a whole new folder and
swaps it in (`storage.atomic_folder`): a crash leaves the old deployment or the new one, and
nothing is ever written through a symlink left inside an earlier save. Loading checks every
adapter again, as `register` does; nothing is unpickled."""

from __future__ import annotations

from pathlib import Path

from .._version import __version__
from ..files.adapter_file import AdapterFileError, read_json, write_adapter_files, write_json
from ..storage import atomic_folder

MANIFEST = "manifest.json"


def save_deployment(dep, directory) -> Path:
    """Write `dep`'s adapters and manifest as the folder `directory`: absent, empty, or an earlier
    save (replaced whole). A folder holding other files is refused, so nothing of yours is deleted."""
    d = Path(directory)
    entries, active = dep.snapshot()
    with atomic_folder(d, marker=MANIFEST, what="Deployer.save()") as tmp:
        for e in entries:
            sub = tmp / "adapters" / e.name
            sub.mkdir(parents=True)
            # the tensors as held (names sorted, the base's dtype): a new checksum for these bytes
            write_adapter_files(sub, dict(zip(e.keys, e.tensors)), e.meta)
        manifest = {"format": "peftkit-deployment", "peftkit_version": __version__, "base": dep.base,
                    "num_labels": dep.num_labels, "seed": dep.seed, "max_length": dep.max_length,
                    "merged": dep.merged, "label_names": dep.label_names, "active": active,
                    "adapters": [{"name": e.name, "folder": f"adapters/{e.name}"} for e in entries]}
        write_json(tmp / MANIFEST, manifest)
    return d


def load_deployment(cls, directory, device: str = "auto"):
    """A `cls` (Deployer) rebuilt from save_deployment's folder."""
    d = Path(directory)
    m = read_json(d / MANIFEST, "Deployer.load")
    if m.get("format") != "peftkit-deployment":
        raise AdapterFileError(f"{d / MANIFEST} is not a peftkit deployment manifest (format "
                               f"{m.get('format')!r}); was the folder written by Deployer.save()?")
    try:
        entries = [(a["name"], a["folder"]) for a in m["adapters"]]
        if not all(isinstance(n, str) and isinstance(f, str) for n, f in entries):
            raise TypeError("'adapters' entries need string 'name' and 'folder'")
        if m.get("active") is not None and m["active"] not in [n for n, _ in entries]:
            raise KeyError(f"active {m['active']!r} is no listed adapter")
        dep = cls(m["base"], num_labels=m["num_labels"], device=device, merged=m["merged"],
                  max_length=m["max_length"], seed=m["seed"], label_names=m.get("label_names"))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{d / MANIFEST} lacks or garbles the entry {e}; save the deployment again.") from None
    for name, folder in entries:
        sub = (d / folder).resolve()
        if d.resolve() not in sub.parents:
            raise AdapterFileError(f"{d / MANIFEST} points adapter {name!r} outside the folder ({folder}).")
        dep.register(name, sub)
    if m.get("active") is not None:
        dep.activate(m["active"])
    return dep
