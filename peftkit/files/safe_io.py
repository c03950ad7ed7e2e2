"""Reading and writing peftkit's files safely, whatever their bytes: the error every file check
raises (AdapterFileError), atomic writes (a temporary file renamed over the old one, so a crash
leaves the old file or the new one), JSON read within a size bound, and safetensors read whole,
hashed against a recorded SHA-256 before it is parsed. Nothing is ever unpickled: a missing
safetensors file beside pickle files says so rather than loading them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from ..storage import sha256_bytes

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
