"""Notebook 11's figures: LoRA's variants against their claims. Colours are the registry's
(`Method.color`): LoRA's blue for every LoRA configuration (rsLoRA and PiSSA darker and dashed), DoRA's, the full
fine-tune's and PEFT's for VeRA."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.methods import METHODS
from ..studies import summary as S
from ..studies.variants import ALPHA, LoRA, runs_of
from ..style import TEMPLATE, accuracy_range

C = {name: cls.color for name, cls in METHODS.items()}


def variant_shade(color: str, amount: float = 0.45) -> str:
    """The family's colour darkened toward black: a LoRA variant drawn beside plain LoRA in one figure keeps
    LoRA's hue (one colour per method across the project) but is told apart by more than its dash."""
    r, g, b = (int(color.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))
    return "#" + "".join(f"{round(v * (1 - amount)):02x}" for v in (r, g, b))


def _acc(rows, spec):
    r = runs_of(rows, spec)
    iv = S.accuracy_interval(r) if len(r) else None
    return (iv.estimate, iv.lo, iv.hi) if iv else (np.nan, np.nan, np.nan)


def _percent_range(*pts_lists) -> list[float]:
    """A test-accuracy axis in percent for these (estimate, lo, hi) points: never beyond 0..100 (two
    seeds' t interval can reach past both ends; its bars are cut at the edge, the axis stays readable)."""
    lo, hi = accuracy_range([v for pts in pts_lists for p in pts for v in p])
    return [100 * lo, 100 * hi]


def _trace(x, pts, name, color, dash=None, mode="lines+markers"):
    est = np.array([p[0] for p in pts]) * 100
    lo, hi = np.array([p[1] for p in pts]) * 100, np.array([p[2] for p in pts]) * 100
    return go.Scatter(x=x, y=est, name=name, mode=mode, line=dict(color=color, dash=dash),
                      error_y=dict(type="data", array=hi - est, arrayminus=est - lo, visible=True))


def rank_figure(rows: pd.DataFrame, ranks) -> go.Figure:
    """rsLoRA: test accuracy against rank at a fixed alpha, alpha/r against alpha/sqrt(r)."""
    fig = go.Figure()
    shown, drawn = set(), []
    for rs, name, dash in ((False, "alpha/r (LoRA)", None), (True, "alpha/sqrt(r) (rsLoRA)", "dash")):
        # every rank of the sweep, and any other rank these rows hold (LoRA+'s lambda=1 is r=8 under alpha/r)
        have = sorted(set(ranks) | {r for r in (1, 2, 8, 16, 32, 64) if len(runs_of(rows, LoRA(r=r, alpha=ALPHA, rslora=rs)))})
        shown |= set(have)
        pts = [_acc(rows, LoRA(r=r, alpha=ALPHA, rslora=rs)) for r in have]
        drawn.append(pts)
        fig.add_trace(_trace(have, pts, name, variant_shade(C["lora"]) if rs else C["lora"], dash))
    fig.update_xaxes(type="log", title="rank r", tickvals=sorted(shown))
    fig.update_layout(template=TEMPLATE, title=f"rsLoRA: accuracy against rank at alpha={ALPHA} (mean, 95% interval)",
                      yaxis_title="test accuracy (%)", yaxis_range=_percent_range(*drawn), height=380)
    return fig


def lambda_figure(rows: pd.DataFrame, lambdas) -> go.Figure:
    """LoRA+: accuracy and final training loss against lambda."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("test accuracy (%)", "final training loss"))
    specs = [LoRA(r=8, alpha=ALPHA, lr_ratio=float(v)) for v in lambdas]
    pts = [_acc(rows, s) for s in specs]
    fig.add_trace(_trace(list(lambdas), pts, "accuracy", C["lora"]), 1, 1)
    fig.update_yaxes(range=_percent_range(pts), row=1, col=1)
    loss = [runs_of(rows, s).final_loss.astype(float) for s in specs]
    fig.add_trace(go.Scatter(x=list(lambdas), y=[v.mean() for v in loss], name="final loss", mode="lines+markers",
                             line=dict(color=C["lora"], dash="dot"),
                             error_y=dict(type="data", array=[v.std(ddof=1) if len(v) > 1 else 0 for v in loss])), 1, 2)
    fig.update_xaxes(type="log", title="lambda (B's rate / A's)", tickvals=list(lambdas))
    fig.update_layout(template=TEMPLATE, title="LoRA+: lambda sweep (loss bars: one standard deviation over seeds)",
                      height=380, showlegend=False)
    return fig


def loss_figure(pissa_rows: pd.DataFrame, steps: int = 100) -> go.Figure:
    """PiSSA: the training loss of the first steps against LoRA's, mean over seeds with its range."""
    fig = go.Figure()
    for spec, name, dash in ((LoRA(r=8, alpha=ALPHA), "LoRA init", None),
                             (LoRA(r=8, alpha=ALPHA, init="pissa"), "PiSSA init", "dash")):
        h = [list(x["loss"][:steps]) for x in runs_of(pissa_rows, spec).history]
        n = min(len(x) for x in h)
        a = np.array([x[:n] for x in h])
        x = np.arange(1, n + 1)
        color = variant_shade(C["lora"]) if spec.init == "pissa" else C["lora"]
        fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[a.max(0), a.min(0)[::-1]], fill="toself", legendgroup=name,
                                 line=dict(width=0), fillcolor=color, opacity=0.15, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=a.mean(0), name=name, line=dict(color=color, dash=dash), legendgroup=name))
    fig.update_layout(template=TEMPLATE, title="PiSSA: training loss per step (mean over seeds, band: their range)",
                      xaxis_title="step", yaxis_title="training loss", height=380)
    return fig


def magnitude_direction_figure(md: pd.DataFrame, colors: dict[str, str]) -> go.Figure:
    """DoRA's figure 2, per output unit: change in magnitude against change in direction, one panel
    per method, each on its own scale (the full fine-tune moves further than LoRA), as in the paper:
    the slope's sign is the point. (One panel held them all before: thousands of overlapping points in
    LoRA's and DoRA's two blues hid each other, and the full fine-tune's cloud lay under both.)"""
    labels = list(dict.fromkeys(md.method))
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=labels, horizontal_spacing=0.06)
    for i, label in enumerate(labels, start=1):
        d = md[md.method == label]
        fig.add_trace(go.Scattergl(x=d.dD, y=d.dM, mode="markers", name=label,
                                   marker=dict(color=colors.get(label, "#7f7f7f"), size=3, opacity=0.5)), row=1, col=i)
        fig.update_xaxes(title_text="ΔD = 1 − cos(W<sub>j</sub>, W<sub>0,j</sub>)", row=1, col=i)
    fig.update_yaxes(title_text="ΔM = |‖W<sub>j</sub>‖ − ‖W<sub>0,j</sub>‖|", row=1, col=1)
    fig.update_xaxes(exponentformat="e")  # 2e-04, not plotly's SI "200μ" (a micro sign on a cosine distance)
    fig.update_yaxes(exponentformat="e")
    fig.update_layout(template=TEMPLATE, title="Magnitude against direction, per output unit of every query and value weight",
                      height=420)
    return fig


def vera_figure(rows: pd.DataFrame, lora_ranks, vera, vera_label: str) -> go.Figure:
    """VeRA (through PeftMethod) against LoRA r=1..8: accuracy against trainable parameters."""
    fig = go.Figure()
    specs = [LoRA(r=r, alpha=ALPHA) for r in lora_ranks]
    n = [int(runs_of(rows, s).trainable.iloc[0]) for s in specs]
    lora_pts, vera_pts = [_acc(rows, s) for s in specs], [_acc(rows, vera)]
    fig.add_trace(_trace(n, lora_pts, "LoRA r=" + ",".join(map(str, lora_ranks)), C["lora"]))
    fig.add_trace(_trace([int(runs_of(rows, vera).trainable.iloc[0])], vera_pts, vera_label, C["peft"],
                         mode="markers"))
    fig.update_xaxes(type="log", title="trainable parameters (the head's included)")
    fig.update_layout(template=TEMPLATE, title="VeRA against LoRA: accuracy against trainable parameters",
                      yaxis_title="test accuracy (%)", yaxis_range=_percent_range(lora_pts, vera_pts), height=380)
    return fig
