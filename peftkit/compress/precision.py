"""An inference precision that fits the CPU: fp32, bf16 or int8, timed here and checked against fp32.

    fast = pk.optimize_for_inference(model, "auto", calibration=texts, tokenizer=tok)
    fast.inference_precision          # which it chose and why, every candidate's figures
    fast(**batch).logits              # fp32 logits, whatever ran inside

The candidates, each a copy of `model` with any LoRA merged first (a merged LoRA is a plain Linear):

* ``"fp32"``: the model as it is.
* ``"bf16-autocast"``: fp32 weights, the forward under ``torch.autocast(..., torch.bfloat16)``:
  matmuls in bf16, norms and softmax in fp32.
* ``"bf16-weights"``: every weight cast to bf16 once; no per-call casts, so usually faster than
  autocast, and a little further from fp32.
* ``"int8"``: `quantize_int8`: every Linear but the head in int8 with per-token activation
  scales (`Int8Linear`), so a text's answer does not depend on its batch; the embedding tables
  stay fp32 (int8 tables make a smaller file, not a faster forward).

Both bf16 forms need bf16 in hardware (AVX512-BF16 or AMX on x86; `runtime.cpu_has_bf16`):
elsewhere torch emulates bf16 and it runs slower than fp32, so "auto" skips them and says so.
``precision="bf16"`` keeps the faster of the two forms here.

**"auto"** times the candidates on the first `timing_batches` batches of the calibration texts
(medians of interleaved repeats; CPU time of this thread when torch runs one thread, else wall
time), runs every candidate on all calibration texts, and keeps the fastest whose predictions
(argmax of the logits) agree with fp32's on at least `min_agreement` of them (99% by default).
The returned model carries the figures and the reason as ``model.inference_precision``
(`PrecisionChoice`).

**The cache.** Timing is what costs; it depends on the CPU, the torch version, the thread count,
the model's architecture and the batch shape, not on the weights. So the measured milliseconds
are kept in a small JSON file, one entry per (CPU model and flags, torch version, threads, model
architecture and size, batch size, max length, candidates), and the next call on the same
machine reuses them; the agreement check runs every time, since it depends on the weights. The
file is ``$PEFTKIT_CACHE_DIR/inference_precision.json``, else
``$XDG_CACHE_HOME/peftkit/inference_precision.json``, else ``~/.cache/peftkit/inference_precision.json``
(`cache_path()`); ``cache=False`` turns it off and ``cache="some/file.json"`` picks another file.

**swappable=True** (a `Deployer`'s base): the result must keep taking adapters, so only the
candidates that change no module and no weight qualify: fp32 and bf16 autocast.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from .. import runtime
from ..layers.lora import MergeError
from .common import merged_plain
from .int8 import int8_backend, quantize_int8

PRECISIONS = ("auto", "fp32", "bf16", "int8", "bf16-autocast", "bf16-weights")
CANDIDATES = ("fp32", "bf16-autocast", "bf16-weights", "int8")
CACHE_FILE = "inference_precision.json"
CACHE_VERSION = 1


# --------------------------------------------------------------------------- the bf16 forms

_CLASSES: dict = {}  # (plain class, mode) -> its subclass with the bf16 forward


def _bf16_forward(self, *args, **kwargs):
    mode = type(self)._peftkit_bf16
    device = next(self.parameters()).device.type
    ctx = torch.autocast(device, dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    with ctx:
        out = super(type(self), self).forward(*args, **kwargs)
    return to_fp32(out)


def to_fp32(out):
    """The output with every floating tensor in fp32 (logits of a bf16 model come out bf16)."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):  # transformers' ModelOutput is a dict: set the fields in place
        for k, v in list(out.items()):
            out[k] = to_fp32(v)
        return out
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(to_fp32(v) for v in out)
    return out


def plain_class(model: nn.Module) -> type:
    """The model's class without peftkit's bf16 forward."""
    cls = type(model)
    return cls.__mro__[1] if getattr(cls, "_peftkit_bf16", None) else cls


def use_bf16(model: nn.Module, mode: str | None) -> nn.Module:
    """Give `model` (in place) the bf16 forward `mode` ("autocast" or "weights"; None: back to its
    plain class). The forward returns fp32 outputs either way. The class is swapped, not wrapped,
    so names, state dict, config and isinstance checks stay as they were; "weights" also casts
    every floating parameter and buffer to bf16 (and None casts them back to fp32)."""
    base = plain_class(model)
    if mode is None:
        model.__class__ = base
        return model
    if mode not in ("autocast", "weights"):
        raise ValueError(f"bf16 mode {mode!r} is not 'autocast' or 'weights'.")
    if (base, mode) not in _CLASSES:
        # Same __name__ as the plain class, so that what reads the architecture's name (the adapter
        # fingerprint, reprs) sees the same model; its own __qualname__, under which pickle finds it here.
        qualname = f"{base.__name__}BF16{mode.capitalize()}"
        cls = type(base.__name__, (base,), {"forward": _bf16_forward, "__module__": __name__,
                                            "__qualname__": qualname, "_peftkit_bf16": mode})
        setattr(sys.modules[__name__], qualname, cls)
        _CLASSES[base, mode] = cls
    model.__class__ = _CLASSES[base, mode]
    if mode == "weights":
        model.to(torch.bfloat16)
    return model


def bf16_support(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(whether bf16 runs in hardware on `device`, the reason in words)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "this GPU multiplies bf16" if ok else "this GPU has no bf16 arithmetic"
    if device.type != "cpu":
        return False, f"bf16 inference is offered on the CPU and CUDA only, not {device.type}"
    if runtime.cpu_has_bf16():
        return True, f"this CPU ({runtime.cpu_name()}) has AVX512-BF16 or AMX"
    return False, (f"this CPU ({runtime.cpu_name()}) has neither AVX512-BF16 nor AMX: torch would emulate "
                   "bf16, which runs slower than fp32")


# --------------------------------------------------------------------------- the candidates

def _ready(model: nn.Module, swappable: bool, inplace: bool) -> nn.Module:
    """The fp32 model to serve: LoRA merged (unless it must stay swappable), in eval mode."""
    if swappable:
        out = model if inplace else copy.deepcopy(model)
    else:
        try:
            out = merged_plain(model, inplace)
        except MergeError:  # LoRA beside bottleneck adapters: keep it unmerged (same outputs)
            out = model if inplace else copy.deepcopy(model)
    if getattr(type(out), "_peftkit_bf16", None):
        use_bf16(out, None)
        out.float()
    return out.eval()


def build(model: nn.Module, precision: str, swappable: bool = False, inplace: bool = False) -> nn.Module:
    """`model` in one of CANDIDATES (no timing, no check): a copy unless inplace."""
    if precision not in CANDIDATES:
        raise ValueError(f"precision {precision!r} is not one of {CANDIDATES}.")
    if precision == "int8":
        if swappable:
            raise ValueError(_NOT_SWAPPABLE)
        # Embedding tables stay fp32: a lookup is no GEMM, so int8 tables save file size, not time, and
        # they add rounding (on the fine-tuned MiniLM, 2 of the 7 predictions of 256 texts that int8 flipped).
        return quantize_int8(_ready(model, False, inplace), inplace=True, embeddings=False)
    out = _ready(model, swappable, inplace)
    if precision == "fp32":
        return out
    if precision == "bf16-weights" and swappable:
        raise ValueError(_NOT_SWAPPABLE)
    return use_bf16(out, precision.split("-")[1])


_NOT_SWAPPABLE = ("int8 and bf16 weights replace the base's Linear weights, so adapters can no longer be hot-swapped "
                  "or merged into them; a Deployer serves fp32 or bf16 autocast. To serve one adapter in int8, "
                  "merge it and call optimize_for_inference(model, 'int8') on that model.")


# --------------------------------------------------------------------------- calibration and timing

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


def _read_cache(path: Path) -> dict:
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


def _write_cache(path: Path, key: str, entry: dict) -> None:
    data = _read_cache(path)
    data["entries"][key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    except OSError as e:
        warnings.warn(f"could not write the precision cache {path} ({e}); the choice still holds.",
                      RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- the choice

@dataclass
class PrecisionChoice:
    """What optimize_for_inference chose, why, and every candidate's figures."""

    precision: str
    requested: str
    reason: str
    table: pd.DataFrame = field(repr=False)
    cpu: str = ""
    torch: str = ""
    threads: int = 0
    clock: str = ""
    timing: str = ""  # "measured now", "from the cache (<when>)" or "not timed"
    cache_file: str | None = None
    min_agreement: float = 0.99
    n_calibration: int = 0

    def __str__(self) -> str:
        return f"{self.reason}\n{self.table.to_string(index=False)}"


def optimize_for_inference(model: nn.Module, precision: str = "auto", calibration=None, tokenizer=None, *,
                           min_agreement: float = 0.99, batch_size: int = 32, max_length: int = 128,
                           timing_batches: int = 2, repeats: int = 5, cache=True, swappable: bool = False,
                           inplace: bool = False, extra_candidates: dict[str, Callable] | None = None,
                           verbose: bool = True) -> nn.Module:
    """A copy of `model` ready to serve in `precision`, with its report as ``.inference_precision``.

    precision: "auto" (the fastest candidate that agrees with fp32; see the module docstring),
        "fp32", "bf16" (the faster of autocast and bf16 weights here), "int8", or one bf16 form
        ("bf16-autocast", "bf16-weights").
    calibration: texts like those you will serve (with `tokenizer`), or model-input dicts; "auto"
        needs them, the others use them to time ("bf16") and to report agreement with fp32.
    min_agreement: the share of calibration texts whose predicted label must match fp32's.
    timing_batches, repeats: "a few real batches": how many calibration batches are timed, and
        how many interleaved rounds (medians).
    cache: True (the default file, `cache_path()`), False, or a path.
    swappable: keep the model able to take adapters (fp32 and bf16 autocast only).
    extra_candidates: {name: function(model) -> model} timed and checked beside the built-in
        ones (for experiments, and for the test that a broken candidate is refused).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}.")
    if not 0 < min_agreement <= 1:
        raise ValueError(f"min_agreement={min_agreement!r} must lie in (0, 1].")
    if not (isinstance(timing_batches, int) and timing_batches >= 1 and isinstance(repeats, int) and repeats >= 1):
        raise ValueError("timing_batches and repeats must be positive integers.")
    batches = calibration_batches(calibration, tokenizer, batch_size, max_length)
    device = next(model.parameters()).device
    if precision == "auto" and not batches:
        raise ValueError("precision='auto' checks every candidate against fp32 on calibration texts: pass "
                         "calibration=[...] (a few hundred texts like the ones you will serve) and tokenizer=.")

    names, skipped = _candidates(precision, device, swappable, extra_candidates)
    if precision in ("fp32", "int8", "bf16-autocast", "bf16-weights") and not batches:
        out = build(model, precision, swappable, inplace)
        table = pd.DataFrame([{"precision": precision, "ms per batch": math.nan, "speed-up vs fp32": math.nan,
                               "agreement with fp32": math.nan, "status": "chosen"}])
        out.inference_precision = _choice(precision, precision, f"{precision}, as asked (no calibration texts: "
                                          "not timed, not checked against fp32).", table, "not timed", None,
                                          min_agreement, 0)
        return out

    models = {}
    for n in names:
        try:
            models[n] = (extra_candidates[n](copy.deepcopy(model)) if n in (extra_candidates or {})
                         else build(model, n, swappable, inplace=False)).eval()
        except (ValueError, RuntimeError, MergeError) as e:
            if n == precision or precision not in ("auto", "bf16"):
                raise
            skipped[n] = f"could not be built: {e}"
    reference = models["fp32"]
    ms, timing, path = {}, "not timed", None
    if batches and len(models) > 1:
        timed_batches = batches[:timing_batches]
        key = cache_key(reference, timed_batches, models)
        path = None if cache is False or cache is None else (cache_path() if cache is True else Path(cache))
        entry = _read_cache(path)["entries"].get(key) if path else None
        if entry and set(entry.get("ms", {})) == set(models):
            ms, timing = entry["ms"], f"from the cache ({entry.get('measured', 'date not recorded')})"
        else:
            ms, timing = time_models(models, timed_batches, repeats), "measured now"
            if path:
                _write_cache(path, key, {"ms": ms, "clock": clock()[1], "measured": _now(), "cpu": runtime.cpu_summary(),
                                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "model": model_signature(reference), "batch_size": batch_size,
                                         "max_length": max_length, "timing_batches": len(timed_batches)})
    agreement, n_texts = {}, 0
    if batches:
        ref_pred = predictions(reference, batches)
        n_texts = len(ref_pred)
        for n, m in models.items():
            agreement[n] = 1.0 if m is reference else float((predictions(m, batches) == ref_pred).float().mean())
    chosen, table, reason = _decide(precision, models, ms, agreement, skipped, min_agreement, n_texts, extra_candidates)
    out = models[chosen]
    if inplace and chosen not in (extra_candidates or {}):
        out = build(model, chosen, swappable, inplace=True)  # the caller's own model, changed
    out.inference_precision = _choice(chosen, precision, reason, table, timing, path, min_agreement, n_texts)
    if verbose:
        print(f"optimize_for_inference: {reason}")
    return out


def _candidates(precision: str, device, swappable: bool, extra) -> tuple[list[str], dict[str, str]]:
    """The candidates to build for `precision`, and those skipped with their reasons."""
    skipped = {}
    if precision == "auto":
        names = list(CANDIDATES)
    elif precision == "bf16":
        names = ["fp32", "bf16-autocast", "bf16-weights"]
    else:
        names = list(dict.fromkeys(["fp32", precision]))
    ok, why = bf16_support(device)
    for n in [n for n in names if n.startswith("bf16")]:
        if not ok:
            if precision == "auto":
                skipped[n] = f"skipped: {why}"
                names.remove(n)
            elif precision == "bf16":
                raise RuntimeError(f"precision='bf16': {why}. Use 'auto' or 'fp32' here, or 'bf16-autocast' "
                                   "to run it anyway.")
            else:
                warnings.warn(f"precision={precision!r}: {why}.", RuntimeWarning, stacklevel=3)
        elif swappable and n == "bf16-weights":
            skipped[n] = "skipped: the model must keep taking adapters (swappable=True), and bf16 weights replace its fp32 ones"
            if n in names:
                names.remove(n)
    if "int8" in names:
        if device.type != "cpu":
            skipped["int8"] = f"skipped: Int8Linear runs on the CPU, and this model is on {device}"
            names.remove("int8")
        elif swappable:
            skipped["int8"] = "skipped: the model must keep taking adapters (swappable=True), and int8 replaces its Linears"
            names.remove("int8")
    if precision == "bf16" and swappable:
        names = [n for n in names if n != "bf16-weights"]
    names += [n for n in (extra or {}) if n not in names]
    return names, skipped


def _decide(precision, models, ms, agreement, skipped, min_agreement, n_texts, extra=None):
    """(the chosen name, the table, the reason in words)."""
    fp32_ms = ms.get("fp32", math.nan)
    order = sorted(models, key=lambda n: (ms.get(n, math.inf), n != precision))
    if precision not in ("auto", "bf16"):
        order = [precision] + [n for n in order if n != precision]
    rows, chosen = {}, None
    for n in order:
        agree = agreement.get(n, math.nan)
        ok = math.isnan(agree) or agree >= min_agreement
        if precision != "auto" and n == "fp32" and precision != "fp32" and n not in (extra or ()):
            status = "reference"
        elif chosen is None and (ok or precision != "auto"):
            chosen, status = n, "chosen" if ok else f"chosen, as asked, though it agrees on {agree:.1%} < {min_agreement:.0%}"
        elif not ok:
            status = f"refused: agrees on {agree:.1%} < {min_agreement:.0%}"
        else:
            status = f"slower than {chosen}"
        rows[n] = {"precision": n, "ms per batch": ms.get(n, math.nan),
                   "speed-up vs fp32": fp32_ms / ms[n] if n in ms else math.nan,
                   "agreement with fp32": agree, "status": status}
    for n, why in skipped.items():
        rows[n] = {"precision": n, "ms per batch": math.nan, "speed-up vs fp32": math.nan,
                   "agreement with fp32": math.nan, "status": why}
    table = pd.DataFrame(list(rows.values()))
    return chosen, table, _reason(precision, chosen, rows, skipped, min_agreement, n_texts)


def _reason(precision, chosen, rows, skipped, min_agreement, n_texts) -> str:
    r = rows[chosen]
    speed = "" if math.isnan(r["speed-up vs fp32"]) else f"{r['speed-up vs fp32']:.2f}x fp32's speed here"
    agree = "" if math.isnan(r["agreement with fp32"]) else (
        f"agrees with fp32 on {r['agreement with fp32']:.1%} of {n_texts} calibration texts")
    facts = "; ".join(x for x in (speed, agree) if x)
    if precision == "auto" and chosen == "fp32":
        head = (f"fp32: no other candidate is faster here while agreeing with fp32's predictions on at least "
                f"{min_agreement:.0%} of the {n_texts} calibration texts")
    elif precision == "auto":
        head = (f"{chosen}: the fastest candidate whose predictions agree with fp32's on at least "
                f"{min_agreement:.0%} of the calibration texts ({facts})")
    elif precision == "bf16":
        head = f"{chosen}: the faster bf16 form here ({facts})"
    else:
        head = f"{chosen}, as asked ({facts})" if facts else f"{chosen}, as asked"
    others = [f"{n} {v['status']}" + (f" ({v['speed-up vs fp32']:.2f}x)" if not math.isnan(v["speed-up vs fp32"]) else "")
              for n, v in rows.items() if n not in (chosen, "fp32") and n not in skipped]
    parts = [head]
    if others:
        parts.append("; ".join(others))
    if skipped:
        parts.append("; ".join(f"{n} {why}" for n, why in skipped.items()))
    text = ". ".join(parts) + "."
    if "int8" in rows and "int8" not in skipped:
        text += f" (int8 kernel: {int8_backend()}.)"
    return text


def _choice(chosen, requested, reason, table, timing, path, min_agreement, n) -> PrecisionChoice:
    return PrecisionChoice(precision=chosen, requested=requested, reason=reason, table=table,
                           cpu=runtime.cpu_summary(), torch=torch.__version__, threads=torch.get_num_threads(),
                           clock=clock()[1], timing=timing, cache_file=str(path) if path else None,
                           min_agreement=min_agreement, n_calibration=n)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
