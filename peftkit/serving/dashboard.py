"""The Monitor's dashboard: its rolling statistics, thresholds, alerts and notes as one plotly
figure of four panels (monitor.py keeps the statistics and the alerts).

The legend is one list for the four panels, so every quantity has a colour of its own
(`COLORS`): a drift score on confidence is not drawn in the colour of the confidence itself.
Lines for the quantities themselves are solid; drift scores on them are dashed."""

from __future__ import annotations

import html
import textwrap

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..style import QUANTITY_COLORS, TEMPLATE, accuracy_range


# one colour per quantity drawn; none is a method's colour (style.QUANTITY_COLORS)
COLORS = {"accuracy": "#000000", "confidence": QUANTITY_COLORS[0], "positive_share": QUANTITY_COLORS[1],
          "drift confidence": QUANTITY_COLORS[2], "drift length": QUANTITY_COLORS[3], "drift unk_rate": QUANTITY_COLORS[4],
          "drift prediction": QUANTITY_COLORS[5], "length": QUANTITY_COLORS[6], "unk_rate": QUANTITY_COLORS[7],
          "degradation alert": "crimson", "drift alert": "darkorange"}
ALERT_SYMBOLS = {"degradation": "x", "drift": "diamond"}


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
    fig.add_trace(go.Scatter(x=x, y=df["accuracy"], name="rolling accuracy", line=dict(color=COLORS["accuracy"], width=3),
                             text=hover, hovertemplate="n=%{x}<br>%{y:.1%}<br>%{text}<extra></extra>"), 1, 1)
    fig.add_hline(y=monitor.min_accuracy, line=dict(color="crimson", dash="dash"), row=1, col=1,
                  annotation_text=f"min_accuracy {monitor.min_accuracy:.2f}", annotation_position="bottom left")
    if monitor.baseline is not None:
        floor = monitor.baseline - monitor.drop_tolerance
        fig.add_hline(y=floor, line=dict(color="darkorange", dash="dot"), row=1, col=1,
                      annotation_text=f"baseline - {monitor.drop_tolerance:.2f}", annotation_position="top left")
    fig.add_trace(go.Scatter(x=x, y=df["confidence"], name="mean confidence", line=dict(color=COLORS["confidence"]),
                             hovertemplate="n=%{x}<br>%{y:.3f}<extra>mean confidence</extra>"), 2, 1)
    fig.add_trace(go.Scatter(x=x, y=df["positive_share"], name="label-1 share", line=dict(color=COLORS["positive_share"]),
                             hovertemplate="n=%{x}<br>%{y:.1%}<extra>label-1 share</extra>"), 2, 1)
    for stat in ("confidence", "length", "unk_rate", "prediction"):
        color = COLORS[f"drift {stat}"]
        col = f"psi_{stat}" if psi_mode or stat == "prediction" else f"ks_p_{stat}"
        if col in df and df[col].notna().any():
            if not psi_mode and stat == "prediction":
                continue
            name = f"{'PSI' if psi_mode else 'KS p'} {stat}"
            fig.add_trace(go.Scatter(x=x, y=df[col], name=name, line=dict(color=color, dash="dash"),
                                     hovertemplate="n=%{x}<br>%{y:.3g}<extra>" + name + "</extra>"), 3, 1)
    fig.add_hline(y=monitor.psi_threshold if psi_mode else monitor.ks_alpha, line=dict(color="crimson", dash="dash"), row=3, col=1)
    if not psi_mode:
        fig.update_yaxes(type="log", row=3, col=1)
    fig.add_trace(go.Scatter(x=x, y=df["length"], name="words per text", line=dict(color=COLORS["length"]),
                             hovertemplate="n=%{x}<br>%{y:.3g} words<extra></extra>"), 4, 1)
    if df["unk_rate"].notna().any():
        fig.add_trace(go.Scatter(x=x, y=100 * df["unk_rate"], name="unknown tokens %", line=dict(color=COLORS["unk_rate"]),
                                 hovertemplate="n=%{x}<br>%{y:.2f}% unknown<extra></extra>"), 4, 1, secondary_y=True)
    fired = al[al["kind"] != "recovered"]
    for kind, row_i, ycol in (("degradation", 1, "accuracy"), ("drift", 3, None)):
        sub = fired[fired["kind"] == kind]
        if len(sub):
            y = df.set_index("n").loc[sub["n"], ycol].to_numpy() if ycol else sub["value"]
            # the hover shows the whole reason, wrapped (plotly does not wrap hover text itself)
            fig.add_trace(go.Scatter(x=sub["n"], y=y, mode="markers", name=f"{kind} alert",
                                     marker=dict(symbol=ALERT_SYMBOLS[kind], size=12, color=COLORS[f"{kind} alert"]),
                                     text=[wrap_html(r) for r in sub["reason"]], hovertemplate="%{text}<extra></extra>"),
                          row_i, 1)
    for note in notes.itertuples():
        fig.add_vline(x=note.n, line=dict(color="grey", dash="dash"))
        # written up the line inside the accuracy panel, so close notes do not overlap each other
        fig.add_annotation(x=note.n, y=0.02, xref="x", yref="y domain", text=note.note, showarrow=False,
                           textangle=-90, xanchor="right", yanchor="bottom", font=dict(size=11, color="grey"))
    fig.update_yaxes(range=accuracy_range(df["accuracy"], monitor.min_accuracy,
                                          monitor.baseline - monitor.drop_tolerance if monitor.baseline is not None else None),
                     tickformat=".0%", title_text="accuracy", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], title_text="share", row=2, col=1)
    fig.update_yaxes(title_text="PSI" if psi_mode else "KS p-value", row=3, col=1)
    fig.update_yaxes(title_text="words", row=4, col=1)
    fig.update_yaxes(title_text="unknown %", rangemode="tozero", row=4, col=1, secondary_y=True)
    fig.update_xaxes(title_text="examples served", row=4, col=1)
    fig.update_layout(template=TEMPLATE, height=900, title=title, legend=dict(orientation="h", y=-0.08))
    return fig


def wrap_html(text: str, width: int = 70) -> str:
    """`text` in full, broken into lines of about `width` characters with <br> (hover labels and
    annotations do not wrap by themselves, and a cut-off reason loses the part that matters)."""
    return "<br>".join(html.escape(line) for line in textwrap.wrap(str(text), width)) or html.escape(str(text))
