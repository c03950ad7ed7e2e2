"""What `optimize_for_inference(precision="auto")` measures with: calibration batches, the
predictions compared with fp32's, interleaved timing, and the per-machine cache of the timings
(its location and key are described in `compress.precision`)."""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import runtime
from .bf16 import plain_class

CACHE_FILE = "inference_precision.json"
CACHE_VERSION = 1



def default_calibration(per_domain: int = 32, seed: int = 0) -> list[str]:
    """`per_domain` training texts of each domain of the bundled corpus: the calibration a Deployer
    uses when it is given none."""
    from ..data import FILES, CorpusError, load_corpus, sample_rows, split
    try:
        return [t for d in FILES for t in sample_rows(split(load_corpus(d), seed=seed)["train"], per_domain, seed).text]
    except CorpusError as e:
        raise ValueError(f"precision='auto' needs calibration texts, and none were given: pass calibration=[...] "
                         f"(texts like the ones you will serve). The bundled corpus would do, but: {e}") from None


def calibration_batches(calibration, tokenizer=None, batch_size: int = 32, max_length: int = 128) -> list[dict]:
    """Model-input batches from `calibration`: a list of texts (tokenized here, `batch_size` at a
    time, each batch padded to its longest text) or a list of model-input dicts (used as they are)."""
    if calibration is None:
        return []
    if isinstance(calibration, (str, bytes)):
        raise TypeError("calibration takes a list of texts, got a single string; wrap it: [text].")
    items = list(calibration)
    if not items:
        raise ValueError("calibration is empty: pass a few hundred texts like the ones you will serve.")
    if all(isinstance(t, dict) for t in items):
        return [{k: v for k, v in b.items() if k != "labels"} for b in items]
    if not all(isinstance(t, str) for t in items):
        raise TypeError("calibration must be a list of texts or a list of model-input dicts (a mix, or other "
                        f"items such as {type(next(t for t in items if not isinstance(t, (str, dict)))).__name__}, is not).")
    if tokenizer is None:
        raise ValueError("calibration texts need the model's tokenizer: optimize_for_inference(..., tokenizer=tok).")
    return [dict(tokenizer(items[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(items), batch_size)]


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    out = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    return out.float()


@torch.inference_mode()
def predictions(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """Argmax of the logits over every batch, in order."""
    return torch.cat([_logits(model, b).argmax(-1).reshape(-1) for b in batches])


def clock():
    """(clock, its name): this thread's CPU time when torch runs one thread (immune to other
    processes on a shared machine), else wall time."""
    return (time.thread_time, "thread CPU time") if torch.get_num_threads() == 1 else (time.perf_counter, "wall time")


@torch.inference_mode()
def time_models(models: dict[str, nn.Module], batches: list[dict], repeats: int = 5) -> dict[str, float]:
    """Median milliseconds per batch of each model over `batches`: one warm-up pass each, then
    `repeats` rounds in which every model runs every batch, the order rotating each round."""
    tick, _ = clock()
    names = list(models)
    for n in names:
        for b in batches:
            models[n](**b)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = tick()
            for b in batches:
                models[n](**b)
            times[n].append((tick() - t0) / len(batches))
    return {n: 1000 * statistics.median(v) for n, v in times.items()}


# --------------------------------------------------------------------------- the cache

def cache_path() -> Path:
    """Where "auto" keeps its timings (see the module docstring)."""
    if os.environ.get("PEFTKIT_CACHE_DIR"):
        return Path(os.environ["PEFTKIT_CACHE_DIR"]) / CACHE_FILE
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "peftkit" / CACHE_FILE


def model_signature(model: nn.Module) -> str:
    """What the timing depends on in the model: its class and parameter count (and, for
    transformers models, hidden size, layers and heads)."""
    cfg = getattr(model, "config", None)
    shape = ""
    if cfg is not None:
        shape = "/".join(str(getattr(cfg, k, "")) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                             "intermediate_size"))
    n = sum(p.numel() for p in model.parameters())
    return f"{plain_class(model).__name__}:{n}" + (f":{shape}" if shape else "")


def cache_key(model: nn.Module, batches: list[dict], candidates) -> str:
    """The CPU (model and flags), torch, threads, model, batch shape and candidates: one entry each."""
    first = batches[0]
    ids = first.get("input_ids", next(iter(first.values())))
    return "|".join([f"cpu={runtime.cpu_summary()}", f"torch={torch.__version__}", f"threads={torch.get_num_threads()}",
                     f"model={model_signature(model)}", f"batch={tuple(ids.shape)}x{len(batches)}",
                     f"candidates={','.join(sorted(candidates))}"])


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
            return data
        warnings.warn(f"{path} is not a peftkit precision cache of version {CACHE_VERSION}: starting it afresh.",
                      RuntimeWarning, stacklevel=3)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        warnings.warn(f"could not read the precision cache {path} ({e}): timing again.", RuntimeWarning, stacklevel=3)
    return {"version": CACHE_VERSION, "entries": {}}


def write_cache(path: Path, key: str, entry: dict) -> None:
    data = read_cache(path)
    data["entries"][key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    except OSError as e:
        warnings.warn(f"could not write the precision cache {path} ({e}); the choice still holds.",
                      RuntimeWarning, stacklevel=3)
