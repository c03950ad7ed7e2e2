"""Small helpers for the notebooks' first cells: resolving parameters and checking them.

Papermill injects parameters *after* the `parameters` cell, so a size that depends on `quick`
is written there as None and resolved here, once `quick` is final.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.io as pio
import torch
import transformers
from IPython.display import Markdown, display

from .. import runtime
from ..style import fmt

# Quick runs train the real MiniLM, small: 480 movie snippets in batches of 8 is 60 optimizer steps,
# enough for LoRA and the adapter to leave chance (measured: LoRA about 0.72, head only about 0.54 on
# 200 test snippets) in about 15 s a run on one core. Every quick notebook asks for runs with this
# recipe, so the result cache (runs/results.jsonl) trains each of them once for the whole suite.
# The rates are the registry's defaults except the adapter's: over 60 steps it did better at the top of
# its grid on the validation split (0.695 at 1e-2 against 0.605 at 5e-3; LoRA the other way: 0.715 at
# 5e-3 against 0.555 at 1e-2), so a quick run uses 1e-2 for it. The test split played no part.
QUICK_RUN = {"base": "minilm", "n_train": 480, "batch_size": 8, "epochs": 1, "n_eval": 200,
             "lr": {"head_only": 1e-3, "lora": 5e-3, "adapter": 1e-2, "hybrid": 5e-3, "full": 2e-4}}
# Exercise solutions that train a run of their own skip the other domains' test splits in quick mode. They
# keep the recipe's 480 snippets: on 96 (12 steps) every variant still sat at chance, which teaches nothing.
QUICK_EXERCISE = {"eval_domains": False}
RECORD_MIME = "application/vnd.peftkit.record+json"  # like scrapbook's: kept by papermill, drawn by nothing


class ParameterError(ValueError):
    """A notebook parameter has a value the notebook cannot use."""


def pick(value, quick: bool, quick_value, full_value):
    """`value` when the user set it, else the quick or the full default."""
    if value is not None:
        return value
    return quick_value if quick else full_value


def check(name: str, value, *, choices=None, positive: bool = False, between=None, kind=None):
    """Raise ParameterError naming the parameter, its value and what is allowed."""
    if kind is not None and not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float):
        raise ParameterError(f"notebook parameter {name}={value!r} should be a {getattr(kind, '__name__', kind)}.")
    if choices is not None and value not in choices:
        raise ParameterError(f"notebook parameter {name}={value!r} is not one of {list(choices)}.")
    if positive and not (value is not None and value > 0):
        raise ParameterError(f"notebook parameter {name}={value!r} must be positive.")
    if between is not None and not (between[0] <= value <= between[1]):
        raise ParameterError(f"notebook parameter {name}={value!r} must lie in [{between[0]}, {between[1]}].")
    return value


def setup(seed: int = 0, threads: int | None = None) -> dict:
    """Seed everything, fix the thread count, and report what this notebook runs on."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    runtime.set_threads(threads)  # at most PEFTKIT_THREADS, where a batch run of several notebooks set it
    # JupyterLab renders the mimetype bundle; the "notebook" part adds HTML with plotly.js inlined,
    # so figures survive nbconvert's HTML export (the batch report) and need no network to view.
    pio.renderers.default = "plotly_mimetype+notebook"
    tables_for_people()
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "quick": os.environ.get("PEFTKIT_QUICK") == "1"}


def quick_banner(quick: bool, shrunk: dict, trains: str = "the real all-MiniLM-L6-v2") -> Markdown | None:
    """A visible note on a quick run: what was shrunk, and that its numbers are noisier.
    Display it right after the setup cell; returns None (nothing shown) on a full run."""
    if not quick:
        return None
    items = "; ".join(f"{k}: {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k}: {v}"
                      for k, v in shrunk.items())
    return Markdown(f"> **Quick mode.** This run is shrunk to a fraction of the full run's time ({items}). "
                    f"It trains {trains} with the full run's code; the numbers below rest on "
                    "fewer examples, steps and seeds, so they are noisier, and a conclusion of the full run may "
                    "not show here (the sentences under each result say what this run shows). Run with "
                    "`quick = False` (or `make run`) for the full ones." + _beside_note())


def _beside_note() -> str:
    """A sentence for a kernel capped by PEFTKIT_THREADS (`peftkit run --jobs`, `make test`), else nothing."""
    cap = runtime.thread_cap()
    if cap is None:
        return ""
    return (f" This kernel ran on at most {cap} torch thread{'s' if cap > 1 else ''} (PEFTKIT_THREADS, which "
            "`peftkit run --jobs` sets to run notebooks side by side), so its timings may have been taken beside "
            "another notebook's work.")


def tables_for_people() -> None:
    """pandas shows every text in full (a rule's or an alert's reason is where the learning is;
    the default cuts it at 50 characters with "...") and floats as people read them (`style.fmt`:
    0.000443, not 0.0004430375245218263; 9.21, not 9.211957)."""
    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.float_format", fmt)
    from IPython import get_ipython
    shell = get_ipython()
    if shell is not None:  # pandas has no display option for integers: counts and bytes read 90867920 without this
        shell.display_formatter.formatters["text/html"].for_type(pd.DataFrame, frame_html)


def frame_html(df: pd.DataFrame) -> str:
    """A DataFrame's HTML with its integer columns as people read them (90,867,920 file bytes, 303,658
    parameters); floats already follow `display.float_format`. The data itself is not changed."""
    ints = [i for i, dt in enumerate(df.dtypes)
            if pd.api.types.is_integer_dtype(dt) and not pd.api.types.is_bool_dtype(dt)]
    if not ints or len(df) > (pd.get_option("display.max_rows") or len(df)):
        return df._repr_html_()  # pandas' own (a long frame is cut to its head and tail there)
    shown = df.copy()
    shown.columns = range(df.shape[1])  # by position: column names may repeat
    for i in ints:
        shown[i] = shown[i].map(fmt)
    shown.columns = df.columns
    return shown._repr_html_()


def as_percent(df: pd.DataFrame, columns=("accuracy",), digits: int = 1) -> pd.DataFrame:
    """A copy to show: each of `columns` (fractions in [0, 1]) as percentages, named "<column> %", so a table
    reads in the same unit as the sentences and the per-domain tables beside it. The data stays in fractions."""
    missing = [c for c in columns if c not in df]
    if missing:
        raise KeyError(f"as_percent: no column {missing} in {list(df.columns)}.")
    shown = df.copy()
    for c in columns:
        shown[c] = (100 * shown[c]).round(digits)
    return shown.rename(columns={c: f"{c} %" for c in columns})


def _plain(value):
    """value as JSON: numpy scalars become Python numbers, NaN becomes None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"record() keeps numbers, strings, booleans, lists and dicts of them; got {type(value).__name__}.")


def workdir(prefix: str) -> Path:
    """A new temporary folder for this notebook's files (saved adapters, exports), removed when the
    kernel exits. (The notebooks used a bare mkdtemp, and every run left its adapters in /tmp.)"""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def record(name: str, value, **context) -> dict:
    """Keep one key result of this notebook in its executed copy, scrapbook-style: a display output
    of mimetype RECORD_MIME that papermill keeps and nothing draws. `python -m peftkit run` copies
    every record into the notebook's metadata and lists them in its report; the verdict test checks a
    record's `verdict` against its interval (`lo`, `hi`) and against the notebook's generated prose.

    context: e.g. lo=..., hi=... (an interval), verdict="higher", kind="direction", unit="accuracy".
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"record() needs a non-empty name, got {name!r}.")
    entry = {"name": name, "value": _plain(value), **_plain(context)}
    display({RECORD_MIME: entry}, raw=True)
    return entry
