"""The Monitor's dashboard: its rolling statistics, thresholds, alerts and notes as one plotly
figure of four panels (monitor.py keeps the statistics and the alerts)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..style import TEMPLATE


def dashboard(monitor, title: str | None = None):
    """Four panels against examples served: rolling accuracy with its two floors; mean confidence
    and label-1 share; drift scores against their threshold; input length and unknown-token rate.
    Alerts are red crosses at the example where they fired; notes are dashed vertical lines.
    `monitor` is a peftkit.serving.monitor.Monitor."""
    df, al, notes = monitor.frame(), monitor.alerts(), monitor.notes()
    psi_mode = monitor.drift_test == "psi"
    drift_title = "drift: PSI against the reference" if psi_mode else "drift: KS p-value against the reference (log)"
    fig = make_subplots(rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("rolling accuracy", "mean confidence and label-1 share", drift_title,
                                        "inputs: words per text and unknown-token rate"),
                        specs=[[{}], [{}], [{}], [{"secondary_y": True}]])
    if df.empty:
        fig.update_layout(template=TEMPLATE, height=820, title=title or "no examples recorded yet")
        return fig
    x = df["n"]
    hover = df["time"].astype(str)
    fig.add_trace(go.Scatter(x=x, y=df["accuracy"], name="rolling accuracy", line=dict(color="#1f77b4", width=3),
                             text=hover, hovertemplate="n=%{x}<br>%{y:.3f}<br>%{text}"), 1, 1)
    fig.add_hline(y=monitor.min_accuracy, line=dict(color="crimson", dash="dash"), row=1, col=1,
                  annotation_text=f"min_accuracy {monitor.min_accuracy:.2f}", annotation_position="bottom left")
    if monitor.baseline is not None:
        floor = monitor.baseline - monitor.drop_tolerance
        fig.add_hline(y=floor, line=dict(color="darkorange", dash="dot"), row=1, col=1,
                      annotation_text=f"baseline - {monitor.drop_tolerance:.2f}", annotation_position="top left")
    fig.add_trace(go.Scatter(x=x, y=df["confidence"], name="mean confidence", line=dict(color="#2ca02c")), 2, 1)
    fig.add_trace(go.Scatter(x=x, y=df["positive_share"], name="label-1 share", line=dict(color="#9467bd", dash="dot")), 2, 1)
    palette = {"confidence": "#2ca02c", "length": "#8c564b", "unk_rate": "#e377c2", "prediction": "#9467bd"}
    for stat, color in palette.items():
        col = f"psi_{stat}" if psi_mode or stat == "prediction" else f"ks_p_{stat}"
        if col in df and df[col].notna().any():
            if not psi_mode and stat == "prediction":
                continue
            fig.add_trace(go.Scatter(x=x, y=df[col], name=f"{'PSI' if psi_mode else 'KS p'} {stat}",
                                     line=dict(color=color)), 3, 1)
    fig.add_hline(y=monitor.psi_threshold if psi_mode else monitor.ks_alpha, line=dict(color="crimson", dash="dash"), row=3, col=1)
    if not psi_mode:
        fig.update_yaxes(type="log", row=3, col=1)
    fig.add_trace(go.Scatter(x=x, y=df["length"], name="words per text", line=dict(color="#8c564b")), 4, 1)
    if df["unk_rate"].notna().any():
        fig.add_trace(go.Scatter(x=x, y=100 * df["unk_rate"], name="unknown tokens %", line=dict(color="#e377c2")),
                      4, 1, secondary_y=True)
    fired = al[al["kind"] != "recovered"]
    for kind, row_i, ycol in (("degradation", 1, "accuracy"), ("drift", 3, None)):
        sub = fired[fired["kind"] == kind]
        if len(sub):
            y = df.set_index("n").loc[sub["n"], ycol].to_numpy() if ycol else sub["value"]
            fig.add_trace(go.Scatter(x=sub["n"], y=y, mode="markers", name=f"{kind} alert",
                                     marker=dict(symbol="x", size=12, color="crimson"),
                                     text=sub["reason"], hovertemplate="%{text}<extra></extra>"), row_i, 1)
    for note in notes.itertuples():
        fig.add_vline(x=note.n, line=dict(color="grey", dash="dash"))
        # written up the line inside the accuracy panel, so close notes do not overlap each other
        fig.add_annotation(x=note.n, y=0.02, xref="x", yref="y domain", text=note.note, showarrow=False,
                           textangle=-90, xanchor="right", yanchor="bottom", font=dict(size=11, color="grey"))
    fig.update_yaxes(title_text="words", row=4, col=1)
    fig.update_yaxes(title_text="unknown %", rangemode="tozero", row=4, col=1, secondary_y=True)
    fig.update_xaxes(title_text="examples served", row=4, col=1)
    fig.update_layout(template=TEMPLATE, height=900, title=title, legend=dict(orientation="h", y=-0.08))
    return fig
