"""Small helpers for the notebooks' first cells: resolving parameters and checking them.

Papermill injects parameters *after* the `parameters` cell, so a size that depends on `quick`
is written there as None and resolved here, once `quick` is final.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pandas as pd
import plotly.io as pio
import torch
import transformers
from IPython.display import Markdown

from ..style import fmt


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
    if threads:
        torch.set_num_threads(threads)
    # JupyterLab renders the mimetype bundle; the "notebook" part adds HTML with plotly.js inlined,
    # so figures survive nbconvert's HTML export (the batch report) and need no network to view.
    pio.renderers.default = "plotly_mimetype+notebook"
    tables_for_people()
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "quick": os.environ.get("PEFTKIT_QUICK") == "1"}


def quick_banner(quick: bool, shrunk: dict) -> Markdown | None:
    """A visible note on a quick run: what was shrunk, and that its numbers are noisier.
    Display it right after the setup cell; returns None (nothing shown) on a full run."""
    if not quick:
        return None
    items = "; ".join(f"{k}: {v}" for k, v in shrunk.items())
    return Markdown(f"> **Quick mode.** This run is shrunk so that it finishes in seconds ({items}). "
                    "The model and the steps are the full run's; the figures below are noisier. Run with "
                    "`quick = False` (or `make run`) for the full ones.")


def tables_for_people() -> None:
    """pandas shows every text in full (a rule's or an alert's reason is where the learning is;
    the default cuts it at 50 characters with "...") and floats as people read them (`style.fmt`:
    0.000443, not 0.0004430375245218263; 9.21, not 9.211957)."""
    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.float_format", fmt)
