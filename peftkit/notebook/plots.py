"""plotly figures for results people want to look at. Each takes plain data (a History or a
results DataFrame) and returns a `plotly.graph_objects.Figure`; nothing here trains."""

from __future__ import annotations

import math

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..studies.recommend import pareto
from ..style import TEMPLATE, method_colors


def history_figure(histories: dict) -> go.Figure:
    """Training loss and validation accuracy against step, one line per run.

    `histories` maps a label to a History DataFrame (or the dict-of-lists stored in a result row).
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "validation accuracy"))
    colors = px.colors.qualitative.D3
    for i, (label, h) in enumerate(histories.items()):
        h = pd.DataFrame(h)
        c = colors[i % len(colors)]
        smooth = h["loss"].rolling(max(1, len(h) // 30), min_periods=1).mean()
        fig.add_trace(go.Scatter(x=h["step"], y=smooth, name=label, line=dict(color=c), legendgroup=label), 1, 1)
        if "val_accuracy" in h:
            v = h.dropna(subset=["val_accuracy"])
            fig.add_trace(go.Scatter(x=v["step"], y=v["val_accuracy"], name=label, mode="lines+markers",
                                     line=dict(color=c), legendgroup=label, showlegend=False), 1, 2)
    fig.update_xaxes(title_text="optimizer step")
    fig.update_layout(template=TEMPLATE, height=380)
    return fig


def pareto_front(df: pd.DataFrame, x: str = "trainable", y: str = "accuracy") -> pd.DataFrame:
    """The rows on the front of fewer `x` and higher `y`, ordered along `x`, to draw as a line."""
    return pareto(df, {x: "min", y: "max"}).sort_values(x)


def pareto_figure(df: pd.DataFrame, x: str = "trainable", y: str = "accuracy") -> go.Figure:
    """Accuracy against trainable parameters (log x), with the Pareto front drawn."""
    fig = px.scatter(df, x=x, y=y, color="method", color_discrete_map=method_colors(), hover_name="label",
                     log_x=True, template=TEMPLATE,
                     hover_data={"f1_macro": ":.3f", "trainable_pct": ":.3f"},
                     labels={x: "trainable parameters (log)", y: y.replace("_", " ")})
    front = pareto_front(df, x, y)
    fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines", name="Pareto front",
                             line=dict(color="grey", dash="dot")))
    fig.update_traces(marker=dict(size=11))
    fig.update_layout(height=420, title="accuracy against trainable parameters")
    return fig


def rank_figure(df: pd.DataFrame) -> go.Figure:
    """Test accuracy and macro F1 of LoRA against its rank r."""
    d = df[df.method == "lora"].copy()
    d["r"] = [s["method"]["r"] for s in d["spec"]]
    d = d.sort_values("r")
    fig = go.Figure([go.Scatter(x=d["r"], y=d[c], mode="lines+markers", name=c.replace("_", " "))
                     for c in ("accuracy", "f1_macro")])
    fig.update_xaxes(type="log", tickvals=list(d["r"]), title_text="LoRA rank r")
    fig.update_layout(template=TEMPLATE, height=360, title="LoRA: quality against rank")
    return fig


def cost_figure(df: pd.DataFrame) -> go.Figure:
    """Seconds per training step and peak memory, one bar per method."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("seconds per training step", "peak memory (MiB)"))
    fig.add_trace(go.Bar(x=df["label"], y=df["sec_per_step"], name="s/step"), 1, 1)
    fig.add_trace(go.Bar(x=df["label"], y=df["peak_mem_mib"], name="MiB"), 1, 2)
    fig.update_layout(template=TEMPLATE, height=420, showlegend=False)
    fig.update_xaxes(tickangle=45)
    return fig


def transfer_heatmap(matrix: pd.DataFrame, metric: str = "accuracy") -> go.Figure:
    """Train domain (rows) x test domain (columns)."""
    fig = px.imshow(matrix, text_auto=".3f", color_continuous_scale="Viridis", aspect="auto",
                    labels=dict(x="test domain", y="train domain", color=metric), template=TEMPLATE)
    fig.update_layout(height=400, title=f"cross-domain transfer ({metric})")
    return fig


def bars(df: pd.DataFrame, x: str, y: str, title: str, color: str | None = None) -> go.Figure:
    fig = px.bar(df, x=x, y=y, color=color, barmode="group", template=TEMPLATE, title=title, text_auto=".3g")
    fig.update_layout(height=380)
    return fig


# --- method selection (notebook 06) -------------------------------------------------------------

def tree_figure(rules, recommendation=None, title: str = "the decision table as a tree") -> go.Figure:
    """The rule table drawn as a chain of questions (tried top to bottom): "yes" leads right to
    the rule's method, "no" down to the next rule. The recommendation's path is highlighted."""
    visited = {s.rule for s in recommendation.path} if recommendation else set()
    chosen = recommendation.rule.name if recommendation else None
    on, off, hit = "#1f77b4", "#c7c7c7", "#d62728"
    fig = go.Figure()
    n = len(rules)
    for i, rule in enumerate(rules):
        y = -i
        seen = rule.name in visited
        if i + 1 < n:  # "no": down to the next rule
            taken = seen and rule.name != chosen
            fig.add_trace(go.Scatter(x=[0, 0], y=[y, y - 1], mode="lines", hoverinfo="skip", showlegend=False,
                                     line=dict(color=on if taken else off, width=4 if taken else 1.5)))
        fig.add_trace(go.Scatter(x=[0, 1], y=[y, y], mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(color=hit if rule.name == chosen else off,
                                           width=4 if rule.name == chosen else 1.5)))
    ask = [" and ".join(f"{q} = {'/'.join(v)}" for q, v in r.when.items()) or "otherwise" for r in rules]
    fig.add_trace(go.Scatter(
        x=[0] * n, y=[-i for i in range(n)], mode="markers+text", text=[f"{a}?" if r.when else a for a, r in zip(ask, rules)],
        textposition="middle left", hovertext=[f"rule '{r.name}'" for r in rules], hoverinfo="text",
        marker=dict(symbol="diamond", size=16, color=[on if r.name in visited else off for r in rules]),
        showlegend=False, name="questions"))
    fig.add_trace(go.Scatter(
        x=[1] * n, y=[-i for i in range(n)], mode="markers+text", text=[r.method.describe() for r in rules],
        textposition="middle right", hovertext=[r.reason for r in rules], hoverinfo="text",
        marker=dict(symbol="square", size=16, color=[hit if r.name == chosen else "white" for r in rules],
                    line=dict(color="#444", width=1)), showlegend=False, name="methods"))
    fig.update_xaxes(visible=False, range=[-2.6, 3.2])
    fig.update_yaxes(visible=False, range=[-n + 0.5, 0.6])
    fig.update_layout(template=TEMPLATE, height=70 * n + 80, title=title, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def evidence_figure(evidence) -> go.Figure:
    """Accuracy against trainable fraction (log x) for `recommend`'s table: the feasible region
    shaded, runs that break a limit in grey (hover says which), the Pareto front, the choice starred."""
    df = evidence.table
    c = evidence.constraints
    fig = go.Figure()
    x_lo, x_hi = df.trainable_fraction.min() / 2, df.trainable_fraction.max() * 2
    y_lo, y_hi = max(0.0, df.accuracy.min() - 0.05), min(1.0, df.accuracy.max() + 0.03)
    rx = min(c.max_trainable_fraction, x_hi) if c.max_trainable_fraction is not None else x_hi
    ry = max(c.min_accuracy, y_lo) if c.min_accuracy is not None else y_lo
    if rx > x_lo and ry < y_hi:
        fig.add_trace(go.Scatter(x=[x_lo, rx, rx, x_lo, x_lo], y=[ry, ry, y_hi, y_hi, ry], fill="toself",
                                 mode="lines", line=dict(width=0), fillcolor="rgba(44,160,44,0.12)",
                                 name="feasible region", hoverinfo="skip"))
    for feasible, color, name in ((True, "#1f77b4", "meets every limit"), (False, "#9e9e9e", "breaks a limit")):
        d = df[df.feasible == feasible]
        if d.empty:
            continue
        hover = [f"{r.label}<br>accuracy {100 * r.accuracy:.1f}%<br>{100 * r.trainable_fraction:.3g}% trainable"
                 + ("" if feasible else "<br>breaks: " + ", ".join(r.violates)) for r in d.itertuples()]
        # neighbours on the x axis take turns above and below, so their labels do not collide
        rank = d.trainable_fraction.rank(method="first").astype(int)
        fig.add_trace(go.Scatter(x=d.trainable_fraction, y=d.accuracy, mode="markers+text", text=d.label,
                                 textposition=["top center" if k % 2 else "bottom center" for k in rank], hovertext=hover, hoverinfo="text", name=name,
                                 marker=dict(size=12, color=color, opacity=1 if feasible else 0.6)))
    if len(evidence.front):
        front = pareto_front(evidence.front, "trainable_fraction", "accuracy")
        fig.add_trace(go.Scatter(x=front.trainable_fraction, y=front.accuracy, mode="lines", name="Pareto front",
                                 line=dict(color="grey", dash="dot")))
    if evidence.chosen is not None:
        ch = evidence.chosen
        fig.add_trace(go.Scatter(x=[ch.trainable_fraction], y=[ch.accuracy], mode="markers",
                                 name=f"chosen: {ch.label}",
                                 marker=dict(symbol="star", size=22, color="#d62728", line=dict(color="black", width=1))))
    fig.update_xaxes(type="log", title_text="trainable fraction of parameters (log)", range=[math.log10(x_lo), math.log10(x_hi)])
    fig.update_yaxes(title_text="test accuracy", tickformat=".0%", range=[y_lo, y_hi])
    fig.update_layout(template=TEMPLATE, height=440, title="runs under the constraints",
                      legend=dict(orientation="h", y=-0.2))
    return fig
