"""The method-selection dashboard that `make dashboard` serves with Voila (apps/dashboard.ipynb).

Built as an app, not a notebook with its code hidden. One `AppLayout` of explicit widths:
  top      the title, what the evidence is, and a banner on a quick run;
  left     the method chooser (the decision table's questions) and the constraint explorer's sliders;
  center   beside them, the evidence: every run in a table, and the Pareto chart under the limits;
  bottom   the environment, the provenance of every number and the decision table as a tree,
           in an Accordion that starts collapsed.
Every width is fixed in pixels, so a browser lays out the sliders, their tracks and readouts on
first paint (in a flexible row they shrank to what the text beside them left: issue 17).

The evidence is MiniLM's default comparison on one domain: read from the result cache when it
holds one, else trained now, small on a quick run (and cached, so the next start is instant).
"""

from __future__ import annotations

import html
import os
import re

import ipywidgets as W
import pandas as pd
from IPython.display import display

from .. import _version
from ..core.methods import Adapter, FullFineTune, HeadOnly, LoRA
from ..style import fmt
from ..studies.experiments import DEFAULT_CACHE, compare, read_cache, results_frame
from . import params as nbutil
from .widgets import ConstraintExplorer, MethodChooser

# the comparison of notebooks 04 and 06: (method, learning rate) with their rates
DEFAULT_RUNS = ((FullFineTune(), 2e-4), (LoRA(r=8, alpha=16), 5e-3), (Adapter(), 5e-3), (HeadOnly(), 1e-3))
DEFAULT_LABELS = {"full", "lora r=8", "adapter pfeiffer simple m=d/16", "head_only"}
# A quick run: notebook 04's quick comparison exactly (480 snippets in 60 steps of 8, the quick recipe's rates, 200
# test snippets, every domain scored), so the app and 04 cache the same four runs. It was 512 snippets in 16 steps
# of 32 at the registry's rates: LoRA r=8 scored 56.5% against head-only's 54.0%, a page of noise.
QUICK = dict(n_train=nbutil.QUICK_RUN["n_train"], n_eval=nbutil.QUICK_RUN["n_eval"])
LEFT, CENTER = "600px", "780px"        # the two columns, and the app with its gap between them
APP_WIDTH = "1400px"


def cached_comparison(domain: str = "movies", cache=DEFAULT_CACHE) -> pd.DataFrame:
    """The best set of MiniLM default runs on `domain` in the cache: the set-up (training size,
    epochs, split) with the most of the four default methods, then the most training data.
    Empty when no set-up has two of them.

    A default run is one of DEFAULT_RUNS' four methods exactly (its whole spec, not its label: "lora r=8" also
    names LoRA on every projection, at alpha 8, or on a 4-bit base, which other notebooks cache) on the
    full-precision base. Of several such runs of one method in a set-up, the lowest seed, then one scored on every
    domain (notebook 04's comparison is), then the first cached: the same choice whatever order the notebooks
    (two at a time, `peftkit run --jobs`) wrote them in."""
    rows = [r for r in read_cache(cache).values()
            if r.get("base") == "minilm" and r.get("domain") == domain and r.get("label") in DEFAULT_LABELS
            and r.get("error") is None and _is_default_run(r)]
    if not rows:
        return pd.DataFrame()
    df = results_frame(rows)
    keys = [c for c in ("n_train", "epochs", "split_seed") if c in df]
    df["_order"] = range(len(df))
    df["_all_domains"] = [bool((s or {}).get("eval_domains", False)) for s in df["spec"]]
    best = None
    for _, g in df.groupby(keys, dropna=False):
        g = g.sort_values(["seed", "_all_domains", "_order"], ascending=[True, False, True], kind="stable")
        g = g.drop_duplicates("label", keep="first")
        g = g.iloc[g["label"].map(_DEFAULT_ORDER.get).argsort(kind="stable")]  # DEFAULT_RUNS' order, whoever cached first
        score = (g["label"].nunique(), g["n_train"].max())
        if g["label"].nunique() >= 2 and (best is None or score > best[0]):
            best = (score, g)
    return pd.DataFrame() if best is None else best[1].drop(columns=["_order", "_all_domains"]).reset_index(drop=True)


_DEFAULT_SPECS = [m.to_dict() for m, _ in DEFAULT_RUNS]
_DEFAULT_ORDER = {m.describe(): i for i, (m, _) in enumerate(DEFAULT_RUNS)}


def _is_default_run(row: dict) -> bool:
    """Whether a cached row trained one of DEFAULT_RUNS' methods exactly, on the full-precision base."""
    spec = row.get("spec")
    return isinstance(spec, dict) and spec.get("method") in _DEFAULT_SPECS and not spec.get("base_bits")


def load_evidence(domain: str = "movies", quick: bool = True, progress: bool = False,
                  threads: int | None = None, cache=DEFAULT_CACHE) -> tuple[pd.DataFrame, dict]:
    """(results, provenance): the cached comparison when there is one, else one trained now
    (on a quick run with `QUICK`'s sizes; the full training split otherwise)."""
    df = cached_comparison(domain, cache)
    if len(df):
        how = f"read from the result cache ({len(df)} runs)"
    else:
        from ..training.loop import TrainConfig
        if quick:  # notebook 04's quick runs, key for key
            q = nbutil.QUICK_RUN
            runs = [(m, q["lr"][m.name]) for m, _ in DEFAULT_RUNS]
            cfg = dict(epochs=q["epochs"], batch_size=q["batch_size"])
            sizes = QUICK
        else:
            runs, cfg, sizes = DEFAULT_RUNS, dict(epochs=1), dict(n_train=None, n_eval=None)
        frames = [compare([m], base="minilm", domain=domain, cfg=TrainConfig(**cfg, lr=lr, seed=0, progress=False),
                          threads=threads, progress=progress, fresh_process=not quick, split_seed=0, cache=cache,
                          **sizes)
                  for m, lr in runs]
        df = results_frame(pd.concat(frames, ignore_index=True).to_dict("records"))
        how = f"trained when this app first started ({'quick' if quick else 'full'} sizes), then cached"
    first = df.iloc[0]
    prov = {"evidence": how, "cache file": str(cache), "base model": "all-MiniLM-L6-v2 (minilm)",
            "domain": domain, "training snippets per run": fmt(first.get("n_train")),
            "epochs": fmt(first.get("epochs")), "split seed": fmt(first.get("split_seed", 0)),
            "runs": ", ".join(f"{r.label} (lr {r.lr:g}, seed {getattr(r, 'seed', 0)})" for r in df.itertuples()),
            "peftkit": _version.__version__}
    return df, prov


def _dl(items: dict, cls: str) -> W.HTML:
    rows = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(str(k))}</th>"
                   f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    box = W.HTML(f"<table>{rows}</table>")
    box.add_class(cls)
    return box


class Dashboard:
    """The app: a MethodChooser and a ConstraintExplorer over `results`, laid out for Voila.

    Attributes: chooser, explorer, layout (the AppLayout), details (the collapsed Accordion),
    widget (what to display).
    """

    def __init__(self, results: pd.DataFrame, provenance: dict, environment: dict, quick_note: str | None = None):
        self.chooser = MethodChooser()
        self.explorer = ConstraintExplorer(results)
        n = provenance.get("training snippets per run", "?")
        intro = (f"<h2 style='margin:0.2em 0'>Which PEFT method?</h2><p style='margin:0'>Answer the questions for "
                 f"the rules of thumb, set your limits for the evidence: {len(results)} MiniLM runs on "
                 f"{html.escape(str(provenance.get('domain')))}, {html.escape(str(n))} training snippets each.</p>")
        if quick_note:
            note = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(quick_note))  # `make run` as code
            intro += (f"<p class='peftkit-app-quick' style='background:#fff3cd;padding:4px 8px;margin:4px 0'>"
                      f"<b>Quick mode.</b> {note}</p>")
        header = W.HTML(intro, layout=W.Layout(width="100%"))
        header.add_class("peftkit-app-header")

        def heading(text):
            return W.HTML(f"<h3 style='margin:0.6em 0 0.2em'>{text}</h3>")

        c = self.chooser
        c.text.layout = W.Layout(width=LEFT)
        left = W.VBox([heading("1. The rules of thumb"), *c.dropdowns.values(), c.text,
                       heading("2. Your limits"), self.explorer.controls, self.explorer.text],
                      layout=W.Layout(width=LEFT, min_width=LEFT, overflow="visible"))
        left.add_class("peftkit-app-left")
        self.explorer.text.layout = W.Layout(width=LEFT)
        self.explorer.out.layout = W.Layout(width=CENTER, min_height="460px")
        center = W.VBox([heading("The evidence: every run"), self.explorer.table,
                         heading("Accuracy against trainable fraction, under your limits"), self.explorer.out],
                        layout=W.Layout(width=CENTER, min_width=CENTER))
        center.add_class("peftkit-app-center")
        c.out.layout = W.Layout(width="1000px")
        self.details = W.Accordion(children=[_dl(environment, "peftkit-app-env"),
                                             _dl(provenance, "peftkit-app-provenance"), c.out],
                                   titles=("environment", "provenance of the evidence", "the decision table as a tree"),
                                   selected_index=None, layout=W.Layout(width="100%"))
        self.details.add_class("peftkit-app-details")
        # AppLayout's rows take px or fr only; in a grid of no set height, "1fr" is the content's height.
        self.layout = W.AppLayout(left_sidebar=left, center=center, pane_widths=[LEFT, CENTER, "0px"],
                                  pane_heights=["0px", "1fr", "0px"], grid_gap="20px",
                                  layout=W.Layout(width=APP_WIDTH))
        self.widget = W.VBox([header, self.layout, self.details], layout=W.Layout(width=APP_WIDTH, padding="8px"))
        self.widget.add_class("peftkit-app")

    def _ipython_display_(self):
        display(self.widget)


def quick_note(results) -> str | None:
    """The banner's words when the evidence is quick mode's (None otherwise): how small it is, and, when its runs
    trained inside the notebooks' kernels, that their peak memory counts what each kernel held."""
    if results["n_train"].max() > QUICK["n_train"]:
        return None
    note = (f"This evidence is small ({fmt(results['n_train'].max())} training snippets, one epoch per run), so "
            "its intervals are wide and its ordering may change.")
    if "own_process" in results and results["own_process"].eq(False).any():
        note += (" Its runs trained inside the notebooks' kernels, so each peak memory also counts what its kernel "
                 "held (a full run trains each in a process of its own).")
    return note + " Run notebook 04 (or `make run`) to fill the cache with the full comparison; the app then reads that."


def main(quick: bool | None = None, domain: str = "movies", progress: bool = True, threads: int | None = None):
    """Build the app (what apps/dashboard.ipynb calls): the evidence, the environment, the layout."""
    quick = os.environ.get("PEFTKIT_QUICK") == "1" if quick is None else quick
    env = nbutil.setup(0, threads)
    results, prov = load_evidence(domain, quick=quick, progress=progress, threads=threads)
    note = quick_note(results)
    env["quick"] = quick
    env = {k: fmt(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in env.items()}
    return Dashboard(results, prov, env, note)
