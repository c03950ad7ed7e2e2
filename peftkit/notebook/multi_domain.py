"""Figures and computed sentences of notebook 10 (merging and forgetting across the four domains)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..studies.stats import CANNOT_TELL, correct_array, direction, paired_difference
from ..style import TEMPLATE, method_colors, readable


def against(scores: pd.DataFrame, reference: dict) -> pd.DataFrame:
    """Each adapter's accuracy per domain minus a reference's on the same items (paired by item),
    with its 95% interval and a direction word. reference: {domain: adapter name}."""
    rows = []
    by = scores.set_index(["adapter", "domain"])
    for (name, domain), r in by.iterrows():
        ref = reference.get(domain)
        if ref is None or (ref, domain) not in by.index:
            continue
        a, b = correct_array(r.correct)[None], correct_array(by.loc[(ref, domain), "correct"])[None]
        iv, _ = paired_difference(a.mean(1), b.mean(1), a, b)
        rows.append({"adapter": name, "domain": domain, "reference": ref, "accuracy": r.accuracy,
                     "difference": iv.estimate, "lo": iv.lo, "hi": iv.hi,
                     "direction": direction(iv.lo, iv.hi) if name != ref else "itself"})
    return pd.DataFrame(rows)


def merge_heatmap(diff: pd.DataFrame, title: str) -> go.Figure:
    """Adapters (rows) x domains (columns): accuracy minus the reference's, each cell labelled with
    the accuracy and the difference."""
    order = dict(index=list(dict.fromkeys(diff.adapter)), columns=list(dict.fromkeys(diff.domain)))
    z = diff.pivot(index="adapter", columns="domain", values="difference").reindex(**order)
    acc = diff.pivot(index="adapter", columns="domain", values="accuracy").reindex(**order)
    text = [[f"{a:.1%}<br>{100 * d:+.1f} pt" for a, d in zip(ra, rd)] for ra, rd in zip(acc.values, z.values)]  # points
    lim = max(1.0, float(np.nanmax(np.abs(100 * z.values))))
    fig = go.Figure(go.Heatmap(z=100 * z.values, x=list(z.columns), y=list(z.index), text=text, texttemplate="%{text}",
                               colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim,
                               colorbar=dict(title="difference<br>(points)")))
    return fig.update_layout(template=TEMPLATE, title=title, xaxis_title="test domain", yaxis_title="adapter",
                             height=120 + 45 * len(z.index))


def merge_sentences(diff: pd.DataFrame, what: str) -> list[str]:
    """One sentence per merge: on how many domains it is higher, lower, or cannot be told from `what`
    (differences in percentage points)."""
    out = []
    for name, g in diff[diff.direction != "itself"].groupby("adapter", sort=False):
        counts = g.direction.value_counts()
        n = {w: counts.get(w, 0) for w in ("higher", "lower", CANNOT_TELL)}
        parts = [f"{label} on {n[w]} {'domain' if n[w] == 1 else 'domains'}"
                 for w, label in (("higher", "higher"), ("lower", "lower"),
                                  (CANNOT_TELL, "not told apart at this precision")) if n[w]]
        out.append(f"- **{name}** against {what}: {', '.join(parts)} "
                   f"(mean difference {100 * g.difference.mean():+.1f} points).")
    return out


def forgetting_figure(lf: pd.DataFrame) -> go.Figure:
    """The learning-forgetting curve of each method: accuracy gained on the target (y) against
    the change in accuracy on the other domains (x; negative: forgotten), one point per epoch, with 95%
    intervals both ways."""
    colors = method_colors()
    fig = go.Figure()
    for (method, label), g in lf.groupby(["method", "label"], sort=False):
        g = g.sort_values("epoch")
        x = np.r_[0.0, g.forgetting]
        y = np.r_[0.0, g.gain]
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers+text", name=readable(label), line=dict(color=colors.get(method)),
            text=["before"] + [f"epoch {e}" for e in g.epoch], textposition="top center",
            error_x=dict(type="data", symmetric=False, array=np.r_[0, g.forgetting_hi - g.forgetting],
                         arrayminus=np.r_[0, g.forgetting - g.forgetting_lo]),
            error_y=dict(type="data", symmetric=False, array=np.r_[0, g.gain_hi - g.gain],
                         arrayminus=np.r_[0, g.gain - g.gain_lo])))
    fig.add_hline(y=0, line_color="#bbb")
    fig.add_vline(x=0, line_color="#bbb")
    return fig.update_layout(template=TEMPLATE, title="Learning against forgetting (95% intervals over seeds and items)",
                             xaxis_title="change in accuracy on the other domains (left: forgotten)",
                             yaxis_title="accuracy gained on the target",
                             xaxis_tickformat=".0%", yaxis_tickformat=".0%", height=480)


def forgetting_sentences(lf: pd.DataFrame) -> list[str]:
    """At the last epoch, per method: gain and forgetting with their intervals and direction words
    (changes in percentage points; a negative change on the other domains is forgetting)."""
    last = lf[lf.epoch == lf.epoch.max()]
    gain_words = {"higher": "above its accuracy before", "lower": "below its accuracy before",
                  CANNOT_TELL: "not distinguishable from its accuracy before"}
    other_words = {"higher": "a gain", "lower": "a loss: forgotten", CANNOT_TELL: "not distinguishable from no change"}

    def pts(x):
        return f"{100 * x:+.1f}"
    return [f"- **{readable(r.label)}**: on the target {pts(r.gain)} points [{pts(r.gain_lo)}, {pts(r.gain_hi)}] "
            f"({gain_words[r.gain_direction]}); on the other domains {pts(r.forgetting)} points "
            f"[{pts(r.forgetting_lo)}, {pts(r.forgetting_hi)}] ({other_words[r.forgetting_direction]})."
            for r in last.itertuples()]


def spectrum_figure(sp: pd.DataFrame) -> go.Figure:
    """Singular values of dW per layer (one line per layer, one panel per method), log scale."""
    colors = method_colors()
    methods = list(dict.fromkeys(sp.method))
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=[readable(m) for m in methods], shared_yaxes=True)
    for i, m in enumerate(methods, 1):
        for j, (layer, g) in enumerate(sp[sp.method == m].groupby("layer", sort=False)):
            fig.add_trace(go.Scatter(x=g["index"] + 1, y=g.singular_value, mode="lines", opacity=0.6,
                                     line=dict(color=colors.get(m)), name=readable(m), legendgroup=m,
                                     showlegend=j == 0, hovertext=layer), row=1, col=i)
    fig.update_yaxes(type="log", title_text="singular value of ΔW", col=1)
    fig.update_xaxes(title_text="index")
    return fig.update_layout(template=TEMPLATE, title="Spectrum of each update ΔW (query and value, every layer)",
                             height=420)


def spectrum_table(sp: pd.DataFrame) -> pd.DataFrame:
    """Per method (by the name people read): mean effective rank (singular values above 1% of the largest)
    and intruder dimensions per layer (and their total)."""
    per_layer = sp.drop_duplicates(["method", "layer"]).assign(method=lambda d: d.method.map(readable))
    return per_layer.groupby("method", sort=False).agg(layers=("layer", "count"), effective_rank=("rank_1pct", "mean"),
                                            intruders_per_layer=("intruders", "mean"),
                                            intruders_total=("intruders", "sum"))
