"""plotly figures of federated runs (`studies.federated_sim.simulate_federated`'s rows): accuracy
against rounds and against bytes on the wire, and the aggregation error. One colour per strategy
(`studies.federated.STRATEGIES`; FedAvg of a full fine-tune takes the registry's "full" colour)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..studies.federated import STRATEGIES
from ..studies.federated_sim import per_round
from ..style import TEMPLATE, method_colors


def strategy_colors() -> dict[str, str]:
    """Strategy -> colour, for every federated strategy."""
    return {s: color or method_colors()["full"] for s, (_, color) in STRATEGIES.items()}


def _rounds(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty or not {"strategy", "round", "client", "accuracy"} <= set(df.columns):
        raise ValueError("give simulate_federated's rows (strategy, round, client, accuracy, ...), one run or several "
                         "concatenated with pd.concat.")
    out = per_round(df)
    spread = df.groupby(["strategy", "round"], sort=False)["accuracy"].agg(["min", "max"]).reset_index()
    return out.merge(spread, on=["strategy", "round"])


def federated_figure(df: pd.DataFrame) -> go.Figure:
    """Mean accuracy over the clients (bars: the weakest and strongest client) against the round,
    and against the cumulative bytes sent (log scale), one line per strategy."""
    r = _rounds(df)
    colors = strategy_colors()
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy per round", "accuracy per byte on the wire"))
    for s, g in r.groupby("strategy", sort=False):
        label = STRATEGIES[s][0]
        bars = dict(type="data", symmetric=False, array=(g["max"] - g["accuracy"]).tolist(),
                    arrayminus=(g["accuracy"] - g["min"]).tolist(), thickness=1, width=3)
        fig.add_trace(go.Scatter(x=g["round"], y=g["accuracy"], error_y=bars, mode="lines+markers", name=label,
                                 line=dict(color=colors[s]), legendgroup=s), 1, 1)
        later = g[g["round"] > 0]  # round 0 sent nothing: no place on a log axis
        fig.add_trace(go.Scatter(x=later["cumulative_bytes"], y=later["accuracy"], mode="lines+markers", name=label,
                                 line=dict(color=colors[s]), legendgroup=s, showlegend=False,
                                 hovertext=[f"round {t}" for t in later["round"]]), 1, 2)
    fig.update_xaxes(title_text="round (0: before training)", dtick=1, row=1, col=1)
    fig.update_xaxes(title_text="bytes sent, cumulative (up + down)", type="log", row=1, col=2)
    fig.update_yaxes(title_text="test accuracy, mean over clients", row=1, col=1)
    fig.update_layout(template=TEMPLATE, height=400)
    return fig


def aggregation_error_figure(df: pd.DataFrame) -> go.Figure:
    """|| avg(s B A) - dW_server || per round and strategy (log scale; exact ones sit at rounding)."""
    r = _rounds(df)
    r = r[r["round"] > 0].dropna(subset=["aggregation_error"])
    colors = strategy_colors()
    fig = go.Figure()
    for s, g in r.groupby("strategy", sort=False):
        fig.add_trace(go.Scatter(x=g["round"], y=g["aggregation_error"].clip(lower=1e-18), mode="lines+markers",
                                 name=STRATEGIES[s][0], line=dict(color=colors[s])))
    fig.update_layout(template=TEMPLATE, height=340, xaxis_title="round", yaxis_title="aggregation error (Frobenius)",
                      yaxis_type="log")
    return fig
