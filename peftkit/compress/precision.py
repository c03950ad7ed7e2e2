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

import copy
import datetime
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from .. import runtime
from ..layers.lora import MergeError
from .bf16 import bf16_support, use_bf16
from .common import merged_plain
from .int8 import int8_backend, quantize_int8
from .timing import (
    cache_key,
    cache_path,
    calibration_batches,
    clock,
    model_signature,
    predictions,
    read_cache,
    time_models,
    write_cache,
)

PRECISIONS = ("auto", "fp32", "bf16", "int8", "bf16-autocast", "bf16-weights")
CANDIDATES = ("fp32", "bf16-autocast", "bf16-weights", "int8")


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
        entry = read_cache(path)["entries"].get(key) if path else None
        if entry and set(entry.get("ms", {})) == set(models):
            ms, timing = entry["ms"], f"from the cache ({entry.get('measured', 'date not recorded')})"
        else:
            ms, timing = time_models(models, timed_batches, repeats), "measured now"
            if path:
                write_cache(path, key, {"ms": ms, "clock": clock()[1], "measured": _now(), "cpu": runtime.cpu_summary(),
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
    speed = "" if math.isnan(r["speed-up vs fp32"]) else (  # its own timing: a study beside it times again
        f"{r['speed-up vs fp32']:.2f}x fp32's speed in its own timing on the calibration texts")
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
