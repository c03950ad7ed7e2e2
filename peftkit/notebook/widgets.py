"""ipywidgets UIs for the notebooks, written so their logic runs and is tested without a browser.

Each UI is a small class. `widget` is the one thing a notebook displays; the controls are plain
attributes; every observer is an ordinary method reading the controls and writing its results
to attributes. A test sets `control.value = ...` (which fires the same observers a browser
would) and reads the results back. Each control carries a stable CSS class, `peftkit-<ui>-<name>`,
so the browser tests can find it without depending on layout or description text.
"""

from __future__ import annotations

import html
import math

import ipywidgets as W
import plotly.io as pio
from IPython.display import display

from ..studies.principles import adapter_params, linear_params, lora_params
from ..studies.recommend import name_of, prepare, recommend
from ..studies.selection import (
    ARTICLE_INPUTS,
    ARTICLE_RULES,
    QUESTIONS,
    RULES,
    choose_method,
    validate_answers,
)
from ..style import fmt
from .plots import evidence_figure, tree_figure


def _check_positive(**values) -> None:
    bad = {k: v for k, v in values.items()
           if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise ValueError(f"layer sizes, r and adapter_size must be positive integers; got {bad}.")


# --- the parameter calculator (notebook 01) ------------------------------------------------

def layer_counts(in_features: int, out_features: int, r: int, adapter_size: int) -> dict:
    """Parameter counts for one Linear layer, a rank-r LoRA on it and an adapter on its output.

    Returns a dict with the four inputs and:
        layer: in*out + out, the layer's own weight and bias;
        lora: r*(in+out), the A and B factors;
        adapter: 2*out*m + out + m, a bottleneck of width m on the layer's output (width out);
        lora_pct, adapter_pct: each as a percentage of `layer`;
        break_even_r: the rank at which LoRA's r*(in+out) reaches the weight's in*out.
    """
    _check_positive(in_features=in_features, out_features=out_features, r=r,
                    adapter_size=adapter_size)
    layer = linear_params(in_features, out_features)
    lora = lora_params(in_features, out_features, r)
    adapter = adapter_params(out_features, adapter_size)
    return {
        "in_features": in_features, "out_features": out_features, "r": r,
        "adapter_size": adapter_size, "layer": layer, "lora": lora, "adapter": adapter,
        "lora_pct": 100 * lora / layer, "adapter_pct": 100 * adapter / layer,
        "break_even_r": in_features * out_features / (in_features + out_features),
    }


def counts_html(c: dict) -> str:
    """The counts from `layer_counts` as a small HTML table (numbers with thousands separators)."""
    rows = [
        ("layer W (in &times; out + bias)", c["layer"], "100%"),
        (f"LoRA, r = {c['r']}: r(in + out)", c["lora"], f"{c['lora_pct']:.2f}%"),
        (f"adapter, m = {c['adapter_size']}: 2&middot;out&middot;m + out + m", c["adapter"],
         f"{c['adapter_pct']:.2f}%"),
    ]
    body = "".join(f"<tr><td>{name}</td><td style='text-align:right'>{n:,}</td>"
                   f"<td style='text-align:right'>{pct}</td></tr>" for name, n, pct in rows)
    note = (f"LoRA stops saving parameters at r &asymp; {c['break_even_r']:.0f} "
            f"(= in&middot;out / (in + out)).")
    return ("<table class='peftkit-counts'><tr><th>what</th><th>parameters</th>"
            f"<th>% of the layer</th></tr>{body}</table><p>{note}</p>")


class ParamCalculator:
    """Sliders for a layer's shape, the LoRA rank r and the adapter width m; live counts below.

    Attributes:
        sliders: dict of IntSlider: in_features, out_features, r, adapter_size.
        text: an HTML widget showing the counts; `counts` holds the same numbers as a dict.
        widget: the VBox to display.
    """

    # name -> (description, min, max, step); widths up to 4096 cover BERT-large to 7B models.
    SPECS = {
        "in_features": ("in_features", 8, 4096, 8),
        "out_features": ("out_features", 8, 4096, 8),
        "r": ("LoRA rank r", 1, 256, 1),
        "adapter_size": ("adapter m", 1, 512, 1),
    }

    def __init__(self, in_features: int = 384, out_features: int = 384, r: int = 8,
                 adapter_size: int = 24):
        start = dict(in_features=in_features, out_features=out_features, r=r,
                     adapter_size=adapter_size)
        layer_counts(**start)  # reject bad starting values before building anything
        style = {"description_width": "110px"}
        self.sliders: dict[str, W.IntSlider] = {}
        for name, (desc, lo, hi, step) in self.SPECS.items():
            value = start[name]
            if not lo <= value <= hi:
                raise ValueError(f"{name}={value} is outside the slider's range {lo}..{hi}.")
            s = W.IntSlider(value=value, min=lo, max=hi, step=step, description=desc,
                            continuous_update=True, style=style, layout=W.Layout(width="480px"))
            s.add_class(f"peftkit-calc-{name.replace('_', '-')}")
            s.observe(self._update, names="value")
            self.sliders[name] = s
        self.text = W.HTML()
        self.text.add_class("peftkit-calc-text")
        self.counts: dict = {}
        self._update()
        self.widget = W.VBox([*self.sliders.values(), self.text])
        self.widget.add_class("peftkit-calc")

    def _update(self, change=None) -> None:
        # One observer for all sliders: recomputing four small products is cheaper than
        # tracking which one moved, and it keeps `counts` and `text` consistent by construction.
        self.counts = layer_counts(**{k: s.value for k, s in self.sliders.items()})
        self.text.value = counts_html(self.counts)

    def _ipython_display_(self):
        display(self.widget)


# --- method selection (notebook 06) ----------------------------------------------------------

def _show(out: W.Output, fig) -> None:
    """Make `out` show `fig`, by setting the Output widget's `outputs` in one state update.

    Not `with out: clear_output(wait=True); fig.show()`: that routes the figure through the
    kernel's output capture, and nbclient (which papermill and Voila use to run a notebook)
    sometimes never finishes a cell that does so while it executes (jupyter/nbclient#312); it
    hung notebook 06 here now and then. Only plotly's own mimetype goes in: the "notebook"
    renderer that nbutil.setup adds for HTML export would inline plotly.js (megabytes) into
    every widget state message, and an exported widget is not live anyway.
    """
    bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())
    out.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)


def _esc(text: str) -> str:
    return html.escape(str(text))


def recommendation_html(rec, article=None) -> str:
    """A Recommendation (and, optionally, the article's answer to the same inputs) as HTML."""
    path = " &rarr; ".join(f"<b>{_esc(s.rule)}</b>" if s.matched else _esc(s.rule) for s in rec.path)
    parts = [f"<h4 class='peftkit-tree-answer'>Recommended: {_esc(rec.name)}</h4>",
             "<ul>" + "".join(f"<li>{_esc(r)}</li>" for r in rec.reasons) + "</ul>",
             f"<p>Path: {path}</p>"]
    if article is not None:
        verdict = "agrees" if article.method.name == rec.method.name else "<b>disagrees</b>"
        parts.append(f"<p>The article's tree, on its four inputs, says {_esc(article.name)}: it {verdict}.</p>")
    return "".join(parts)


class MethodChooser:
    """Dropdowns for the decision table's questions; the recommendation, its reasons and the
    tree with the path taken, all live.

    Attributes: dropdowns (question -> Dropdown), text (HTML), recommendation, article (the
    article's table on the same answers), figure (the tree), widget (the VBox to display).
    """

    def __init__(self, rules=None, **answers):
        self.rules = rules or RULES
        self._article_inputs = ARTICLE_INPUTS
        start = validate_answers(answers)
        self.dropdowns: dict[str, W.Dropdown] = {}
        for name, (choices, _, help_text) in QUESTIONS.items():
            d = W.Dropdown(options=list(choices), value=start[name], description=name,
                           tooltip=help_text, style={"description_width": "170px"},
                           layout=W.Layout(width="330px"))
            d.add_class(f"peftkit-tree-{name.replace('_', '-')}")
            d.observe(self._update, names="value")
            self.dropdowns[name] = d
        self.text = W.HTML()
        self.text.add_class("peftkit-tree-text")
        self.out = W.Output()
        self._update()
        controls = W.VBox(list(self.dropdowns.values()), layout=W.Layout(min_width="340px"))
        self.widget = W.VBox([W.HBox([controls, self.text]), self.out])
        self.widget.add_class("peftkit-tree")

    def answers(self) -> dict:
        return {k: d.value for k, d in self.dropdowns.items()}

    def _update(self, change=None) -> None:
        answers = self.answers()
        self.recommendation = choose_method(self.rules, **answers)
        self.article = choose_method(ARTICLE_RULES, **{k: answers[k] for k in self._article_inputs})
        self.text.value = recommendation_html(self.recommendation, self.article)
        self.figure = tree_figure(self.rules, self.recommendation)
        _show(self.out, self.figure)

    def _ipython_display_(self):
        display(self.widget)


def evidence_html(ev) -> str:
    head = (f"<h4 class='peftkit-evidence-answer'>Recommended: {_esc(ev.name)}</h4>" if ev.chosen is not None
            else "<h4 class='peftkit-evidence-answer'>Nothing meets every limit</h4>")
    return head + "<ul>" + "".join(f"<li>{_esc(r)}</li>" for r in ev.reasons) + "</ul>"


def evidence_table_html(ev) -> str:
    """Every run of `recommend`'s table as an HTML table for people: accuracy with its 95%
    interval, the costs with units, and which limits a run breaks; the chosen run in bold."""
    df = ev.table
    chosen = ev.label
    head = ("<tr><th>run</th><th>accuracy (95% interval)</th><th>trainable</th><th>s / step</th>"
            "<th>peak MiB</th><th>adapter size</th><th>limits</th></tr>")
    body = []
    for r in df.itertuples():
        acc = f"{100 * r.accuracy:.1f}%"
        if hasattr(r, "accuracy_lo") and not math.isnan(getattr(r, "accuracy_lo", math.nan)):
            acc += f" [{100 * r.accuracy_lo:.1f}, {100 * r.accuracy_hi:.1f}]"
        limits = "meets all" if r.feasible else "breaks " + ", ".join(r.violates)
        cells = [_esc(name_of(r.label)), acc, f"{fmt(100 * r.trainable_fraction)}%",
                 fmt(getattr(r, "sec_per_step", math.nan)), fmt(getattr(r, "peak_mem_mib", math.nan)),
                 _bytes(getattr(r, "adapter_bytes", math.nan)), _esc(limits)]
        style = " style='font-weight:bold'" if r.label == chosen else ("" if r.feasible else " style='color:#888'")
        body.append(f"<tr{style}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table class='peftkit-evidence-table'>{head}{''.join(body)}</table>"


def _bytes(n) -> str:
    """A size in bytes as people write it: 4.0 KB, 304 KB, 90.9 MB."""
    try:
        n = float(n)
    except (TypeError, ValueError):
        return str(n)
    if math.isnan(n):
        return "-"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{fmt(n / k)} {unit}"
    return f"{fmt(n)} B"


# The explorer's sizes, explicit so the browser can lay the sliders out on first paint: in a
# flexible row a slider shrinks to whatever the text beside it leaves, and ipywidgets then hides
# its readout and noUiSlider draws its handles on a track that later grows (issue 17).
SLIDER_WIDTH, DESCRIPTION_WIDTH = "540px", "170px"


class ConstraintExplorer:
    """Sliders for the five constraints over a compare() DataFrame; the recommendation and a
    Pareto chart with the feasible region and the chosen run, live. Every slider starts at the
    loosest value the results need, so everything is feasible until a slider moves.

    Attributes: sliders (constraint -> slider), controls (their VBox), text (HTML), table (every
    run, HTML), evidence (from `recommend`), figure, out (the chart), widget.
    """

    def __init__(self, results, tolerance="interval"):
        df = prepare(results, set())  # the same checks (one set-up, the columns) as recommend
        recommend(df, tolerance=tolerance)  # and fail now, before any widget exists
        self.results, self.tolerance = df, tolerance
        frac = df["trainable_fraction"]
        lo = math.floor(math.log10(frac.min())) - 1
        sec, mem = _ceil(df.sec_per_step.max()), _ceil(df.peak_mem_mib.max())
        self.sliders = {
            "max_trainable_fraction": W.FloatLogSlider(value=1.0, base=10, min=lo, max=0, step=0.1,
                                                       description="max trainable fraction", readout_format=".2g"),
            "max_sec_per_step": W.FloatSlider(value=sec, min=0, max=sec, step=sec / 100,
                                              description="max s / step", readout_format=".3g"),
            "max_peak_mem_mib": W.FloatSlider(value=mem, min=0, max=mem, step=mem / 100,
                                              description="max peak MiB", readout_format=",.0f"),
            "max_adapter_bytes": W.FloatLogSlider(value=10 ** math.ceil(math.log10(df.adapter_bytes.max())), base=10,
                                                  min=max(0, math.floor(math.log10(df.adapter_bytes.min()))),
                                                  max=math.ceil(math.log10(df.adapter_bytes.max())), step=0.1,
                                                  description="max adapter bytes", readout_format=".2g"),
            "min_accuracy": W.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.005, description="min accuracy",
                                          readout_format=".1%"),
        }
        for name, s in self.sliders.items():
            # each slider its own Layout and style: one shared instance ties their sizes together
            s.style = {"description_width": DESCRIPTION_WIDTH}
            s.layout = W.Layout(width=SLIDER_WIDTH, min_width=SLIDER_WIDTH)
            s.continuous_update, s.readout = False, True
            s.add_class(f"peftkit-evidence-{name.replace('_', '-')}")
            s.observe(self._update, names="value")
        self.text = W.HTML(layout=W.Layout(flex="1 1 320px", min_width="300px"))
        self.text.add_class("peftkit-evidence-text")
        self.table = W.HTML()
        self.table.add_class("peftkit-evidence-table-box")
        self.out = W.Output()
        self._update()
        self.controls = W.VBox(list(self.sliders.values()),
                               layout=W.Layout(width=f"calc({SLIDER_WIDTH} + 10px)", flex="0 0 auto"))
        self.widget = W.VBox([W.HBox([self.controls, self.text], layout=W.Layout(flex_flow="row wrap", width="100%")),
                              self.out])
        self.widget.add_class("peftkit-evidence")

    def constraints(self) -> dict:
        return {k: s.value for k, s in self.sliders.items()}

    def _update(self, change=None) -> None:
        self.evidence = recommend(self.results, tolerance=self.tolerance, **self.constraints())
        self.text.value = evidence_html(self.evidence)
        self.table.value = evidence_table_html(self.evidence)
        self.figure = evidence_figure(self.evidence)
        _show(self.out, self.figure)

    def _ipython_display_(self):
        display(self.widget)


def _ceil(v: float) -> float:
    """v rounded up to two significant figures: a slider end a person can read."""
    if v <= 0:
        return 1.0
    p = 10 ** (math.floor(math.log10(v)) - 1)
    return math.ceil(v / p) * p
