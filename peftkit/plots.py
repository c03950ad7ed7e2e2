"""plotly figures for results people want to look at. Each takes plain data (a History or a
results DataFrame) and returns a `plotly.graph_objects.Figure`; nothing here trains."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

TEMPLATE = "plotly_white"


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
    """Rows not beaten by another row with fewer (or equal) `x` and higher (or equal) `y`."""
    d = df.sort_values([x, y], ascending=[True, False])
    best, keep = -float("inf"), []
    for idx, row in d.iterrows():
        if row[y] > best:
            keep.append(idx)
            best = row[y]
    return df.loc[keep]


def pareto_figure(df: pd.DataFrame, x: str = "trainable", y: str = "accuracy") -> go.Figure:
    """Accuracy against trainable parameters (log x), with the Pareto front drawn."""
    fig = px.scatter(df, x=x, y=y, color="method", hover_name="label", log_x=True, template=TEMPLATE,
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
