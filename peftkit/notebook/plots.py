"""plotly figures for results people want to look at. Each takes plain data (a History or a
results DataFrame) and returns a `plotly.graph_objects.Figure`; nothing here trains.

Figures of results draw every measured value with its 95% interval as an error bar: they read
`summarize()`'s table (`<column>_lo` / `<column>_hi`), and summarise compare()'s rows themselves
when given those. One colour per method, the registry's (`style.method_colors`)."""

from __future__ import annotations

import math

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.methods import METHODS
from ..studies.recommend import pareto
from ..studies.summary import summarize
from ..style import NEUTRAL, QUANTITY_COLORS, TEMPLATE, accuracy_range, color_for, fmt, method_colors, readable


def _summary(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with interval columns: summarize()'s table as it is, compare()'s rows summarised."""
    return df if "accuracy_lo" in df else summarize(df, reference=None)


def _errors(df: pd.DataFrame, col: str) -> dict:
    """error_y for a go trace: the distance from `col` to its interval's ends (none when unknown)."""
    lo, hi = f"{col}_lo", f"{col}_hi"
    if lo not in df or hi not in df:
        return {}
    return dict(error_y=dict(type="data", symmetric=False, array=(df[hi] - df[col]).tolist(),
                             arrayminus=(df[col] - df[lo]).tolist(), thickness=1.2, width=4))


def history_figure(histories: dict, colors: dict | None = None) -> go.Figure:
    """Training loss and validation accuracy against step, one line per run.

    `histories` maps a label to a History DataFrame (or the dict-of-lists stored in a result row).
    `colors` ({label: colour}) fixes some lines' colours, so that a notebook's other figures can match them.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "validation accuracy"))
    accs = []
    for i, (label, h) in enumerate(histories.items()):
        h = pd.DataFrame(h)
        # a run named after a method ("LoRA r=8", "head only") takes the method's colour
        c = (colors or {}).get(label) or color_for(label, QUANTITY_COLORS[i % len(QUANTITY_COLORS)])
        smooth = h["loss"].rolling(max(1, len(h) // 30), min_periods=1).mean()
        fig.add_trace(go.Scatter(x=h["step"], y=smooth, name=label, line=dict(color=c), legendgroup=label), 1, 1)
        if "val_accuracy" in h:
            v = h.dropna(subset=["val_accuracy"])
            accs += v["val_accuracy"].tolist()
            fig.add_trace(go.Scatter(x=v["step"], y=v["val_accuracy"], name=label, mode="lines+markers",
                                     line=dict(color=c), legendgroup=label, showlegend=False), 1, 2)
    fig.update_xaxes(title_text="optimizer step")
    fig.update_yaxes(title_text="cross-entropy (smoothed)", row=1, col=1)
    fig.update_yaxes(range=accuracy_range(accs), tickformat=".0%", title_text="accuracy", row=1, col=2)
    fig.update_traces(hovertemplate="step %{x}<br>%{y:.3g}")
    fig.update_layout(template=TEMPLATE, height=380)
    return fig


def pareto_front(df: pd.DataFrame, x: str = "trainable", y: str = "accuracy") -> pd.DataFrame:
    """The rows on the front of fewer `x` and higher `y`, ordered along `x`, to draw as a line."""
    return pareto(df, {x: "min", y: "max"}).sort_values(x)


def pareto_figure(df: pd.DataFrame, x: str = "trainable", y: str = "accuracy") -> go.Figure:
    """Accuracy (mean over seeds, 95% interval as error bars) against trainable parameters (log
    x), with the noise-aware Pareto front drawn through the methods no other beats beyond the intervals."""
    df = _summary(df).copy()
    extra = {}
    if f"{y}_lo" in df:
        df["_plus"], df["_minus"] = df[f"{y}_hi"] - df[y], df[y] - df[f"{y}_lo"]
        extra = dict(error_y="_plus", error_y_minus="_minus")
    hover = {c: f for c, f in ((x, ":,.0f" if x == "trainable" else ":.3g"), (y, ":.3f"), ("f1_macro", ":.3f"),
                               ("trainable_pct", ":.3g"), ("seeds", True), ("interval", True),
                               ("_plus", False), ("_minus", False)) if c in df}
    df["configuration"] = [readable(v) for v in df["label"]]
    fig = px.scatter(df, x=x, y=y, color="method", color_discrete_map=method_colors(), hover_name="configuration",
                     log_x=True, template=TEMPLATE, hover_data=hover,
                     labels={x: "trainable parameters (log)", y: y.replace("_", " ")}, **extra)
    fig.for_each_trace(lambda t: t.update(name=METHODS[t.name].label) if t.name in METHODS else None)  # "Head only"
    front = pareto_front(df, x, y)
    fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines", name="Pareto front",
                             line=dict(color=NEUTRAL, dash="dot"), hoverinfo="skip"))
    fig.update_traces(marker=dict(size=11))
    if y in ("accuracy", "f1_macro", "val_accuracy"):
        fig.update_yaxes(range=accuracy_range(df[y], df.get(f"{y}_lo", []), df.get(f"{y}_hi", [])), tickformat=".0%")
    fig.update_layout(height=420, title="accuracy against trainable parameters")
    return fig


def rank_figure(df: pd.DataFrame) -> go.Figure:
    """Test accuracy of LoRA against its rank r: the mean over seeds, the 95% interval as error
    bars; the hover says how many seeds each point has."""
    d = _summary(df)
    d = d[d.method == "lora"].copy()
    d["r"] = [s["method"]["r"] for s in d["spec"]]
    d = d.sort_values("r")
    text = [f"r={r}: {100 * a:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}], seeds {s}"
            for r, a, lo, hi, s in zip(d.r, d.accuracy, d.accuracy_lo, d.accuracy_hi, d.get("seeds", [""] * len(d)))]
    fig = go.Figure([go.Scatter(x=d["r"], y=d["accuracy"], mode="lines+markers", name="test accuracy",
                                line=dict(color=method_colors()["lora"]), hovertext=text, hoverinfo="text",
                                **_errors(d, "accuracy"))])
    fig.update_xaxes(type="log", tickvals=list(d["r"]), title_text="LoRA rank r")
    fig.update_yaxes(title_text="test accuracy (95% interval)", tickformat=".0%",
                     range=accuracy_range(d["accuracy"], d["accuracy_lo"], d["accuracy_hi"]))
    fig.update_layout(template=TEMPLATE, height=360, title="LoRA: quality against rank")
    return fig


def cost_figure(df: pd.DataFrame) -> go.Figure:
    """Seconds per training step and peak memory, one bar per method: medians over seeds, with
    their 95% intervals as error bars (none for a single run)."""
    df = _summary(df)
    colors = [method_colors().get(m, "#7f7f7f") for m in df["method"]]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("seconds per training step", "peak memory (MiB)"))
    names = [readable(v) for v in df["label"]]
    fig.add_trace(go.Bar(x=names, y=df["sec_per_step"], name="s/step", marker_color=colors,
                         hovertemplate="%{x}<br>%{y:.3g} s per step<extra></extra>", **_errors(df, "sec_per_step")), 1, 1)
    fig.add_trace(go.Bar(x=names, y=df["peak_mem_mib"], name="MiB", marker_color=colors,
                         hovertemplate="%{x}<br>%{y:,.0f} MiB<extra></extra>", **_errors(df, "peak_mem_mib")), 1, 2)
    fig.update_layout(template=TEMPLATE, height=420, showlegend=False)
    fig.update_xaxes(tickangle=45)
    return fig


def transfer_heatmap(matrix: pd.DataFrame, metric: str = "accuracy") -> go.Figure:
    """Train domain (rows) x test domain (columns)."""
    fig = px.imshow(matrix, text_auto=".3f", color_continuous_scale="Viridis", aspect="auto",
                    labels=dict(x="test domain", y="train domain", color=metric), template=TEMPLATE,
                    **(dict(zmin=0, zmax=1) if metric in ("accuracy", "f1_macro") else {}))
    fig.update_layout(height=400, title=f"cross-domain transfer ({metric})")
    return fig


def transfer_figure(cells: pd.DataFrame) -> go.Figure:
    """Cross-domain accuracy as grouped bars with 95% error bars: x the test domain, one bar per
    training domain. `cells`: `summary.transfer_cells`'s table (train, test, accuracy, lo, hi)."""
    fig = go.Figure()
    for i, (train, d) in enumerate(cells.groupby("train", sort=False)):
        fig.add_trace(go.Bar(x=d["test"], y=d["accuracy"], name=f"trained on {train}",
                             marker_color=QUANTITY_COLORS[i % len(QUANTITY_COLORS)],
                             hovertemplate="test %{x}<br>%{y:.1%}<extra>trained on " + str(train) + "</extra>",
                             error_y=dict(type="data", symmetric=False, array=(d["hi"] - d["accuracy"]).tolist(),
                                          arrayminus=(d["accuracy"] - d["lo"]).tolist())))
    fig.update_layout(template=TEMPLATE, height=400, barmode="group", title="cross-domain transfer (accuracy, 95% interval)")
    fig.update_xaxes(title_text="test domain")
    fig.update_yaxes(title_text="test accuracy", tickformat=".0%",
                     range=accuracy_range(cells["accuracy"], cells["lo"], cells["hi"], bars=True))
    return fig


def lr_search_figure(table: pd.DataFrame) -> go.Figure:
    """Validation accuracy against the learning rate, one line per family (`lr_search`'s table):
    the mean over the search's seeds with its 95% interval; the chosen rate ringed."""
    fig = go.Figure()
    colors = method_colors()
    for family, d in table.groupby("family", sort=False):
        d = d.sort_values("lr")
        name = readable(d["label"].iloc[0])
        fig.add_trace(go.Scatter(x=d["lr"], y=d["val_accuracy"], mode="lines+markers", name=name,
                                 line=dict(color=colors.get(family, NEUTRAL)),
                                 hovertemplate="lr %{x:.2g}<br>%{y:.1%}<extra>" + name + "</extra>",
                                 error_y=dict(type="data", symmetric=False, array=(d["val_hi"] - d["val_accuracy"]).tolist(),
                                              arrayminus=(d["val_accuracy"] - d["val_lo"]).tolist())))
        c = d[d.chosen]
        fig.add_trace(go.Scatter(x=c["lr"], y=c["val_accuracy"], mode="markers", showlegend=False, hoverinfo="skip",
                                 marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(color="black", width=2))))
    fig.update_xaxes(type="log", title_text="learning rate (log)", exponentformat="e")  # 1e-04, not 100μ
    fig.update_yaxes(title_text="validation accuracy (95% interval)", tickformat=".0%",
                     range=accuracy_range(table["val_accuracy"], table["val_lo"], table["val_hi"]))
    fig.update_layout(template=TEMPLATE, height=400, title="each family's learning rate, chosen on validation (ringed)")
    return fig


def ranking_figure(view: pd.DataFrame) -> go.Figure:
    """`rate_ranking`'s view: each method's test accuracy at its default and at its chosen rate,
    with 95% error bars, joined by a line."""
    fig = go.Figure()
    colors = method_colors()
    where = ["default rate", "chosen rate"]
    ends = []
    for r in view.to_dict("records"):
        y = [r["accuracy at default"], r["accuracy at chosen"]]
        plus = [r["hi at default"] - y[0], r["hi at chosen"] - y[1]]
        minus = [y[0] - r["lo at default"], y[1] - r["lo at chosen"]]
        ends += [*y, r["hi at default"], r["hi at chosen"], r["lo at default"], r["lo at chosen"]]
        fig.add_trace(go.Scatter(x=where, y=y, mode="lines+markers", name=readable(r["label"]),
                                 line=dict(color=colors.get(r["family"], NEUTRAL)),
                                 hovertext=[f"{y[0]:.1%}: lr {r['default lr']:g}, seeds {r['seeds at default']}",
                                            f"{y[1]:.1%}: lr {r['chosen lr']:g}, seeds {r['seeds at chosen']}"],
                                 hoverinfo="text+name",
                                 error_y=dict(type="data", symmetric=False, array=plus, arrayminus=minus)))
    fig.update_yaxes(title_text="test accuracy (95% interval)", tickformat=".0%", range=accuracy_range(ends))
    fig.update_layout(template=TEMPLATE, height=400, title="the ranking at the default and at the chosen learning rates")
    return fig


def bars(df: pd.DataFrame, x: str, y: str, title: str, color: str | None = None, log_y: bool | None = None,
         colors: dict | None = None) -> go.Figure:
    """Bars of `y` per `x` (grouped by `color`), each labelled with its value written for people.
    `colors` ({value of x: colour}) fixes some bars' colours (the same runs in another figure).

    A bar named after a method takes the method's colour. `log_y=None` turns the log axis on by
    itself when the values span more than two orders of magnitude: on a linear axis a 300 KB
    adapter beside a 90 MB model is a bar too short to see. An accuracy column keeps its axis in
    [0, 1] (in [0, 100] when it is a percentage)."""
    values = pd.to_numeric(df[y], errors="coerce")
    positive = values[values > 0]
    if log_y is None:
        log_y = len(positive) == len(values.dropna()) and len(positive) > 1 and positive.max() / positive.min() > 100
    groups = [(None, df)] if color is None else list(df.groupby(color, sort=False))
    fig = go.Figure()
    for i, (g, d) in enumerate(groups):
        if g is None:
            marker = [(colors or {}).get(v) or color_for(v, QUANTITY_COLORS[0]) for v in d[x]]
        else:
            marker = (colors or {}).get(g) or color_for(g, QUANTITY_COLORS[i % len(QUANTITY_COLORS)])
        fig.add_trace(go.Bar(x=d[x], y=d[y], name=str(g) if g is not None else y, marker_color=marker,
                             text=[fmt(v) for v in d[y]], textposition="outside", cliponaxis=False,
                             hovertext=[f"{a}: {fmt(v)}" for a, v in zip(d[x], d[y])], hoverinfo="text",
                             showlegend=g is not None))
    fig.update_layout(template=TEMPLATE, title=title, height=380, barmode="group")
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text=f"{y} (log)" if log_y else y, type="log" if log_y else "linear")
    if "accuracy" in y and len(values.dropna()):
        scale = 100 if values.max() > 1 else 1
        fig.update_yaxes(range=[scale * v for v in accuracy_range(values / scale, bars=True)])
    return fig


# --- method selection (notebook 06) -------------------------------------------------------------

def tree_figure(rules, recommendation=None, title: str = "the decision table as a tree") -> go.Figure:
    """The rule table drawn as a chain of questions (tried top to bottom): "yes" leads right to
    the rule's method, "no" down to the next rule. The recommendation's path is highlighted."""
    visited = {s.rule for s in recommendation.path} if recommendation else set()
    chosen = recommendation.rule.name if recommendation else None
    # the path in dark grey; the chosen method in its own colour (blue and red are methods' colours)
    on, off = "#333333", "#c7c7c7"
    hit = method_colors().get(recommendation.method.name, NEUTRAL) if recommendation else NEUTRAL
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
    y_lo, y_hi = accuracy_range(df.accuracy, df.get("accuracy_lo", []), df.get("accuracy_hi", []), pad=0.02)
    rx = min(c.max_trainable_fraction, x_hi) if c.max_trainable_fraction is not None else x_hi
    ry = max(c.min_accuracy, y_lo) if c.min_accuracy is not None else y_lo
    if rx > x_lo and ry < y_hi:
        fig.add_trace(go.Scatter(x=[x_lo, rx, rx, x_lo, x_lo], y=[ry, ry, y_hi, y_hi, ry], fill="toself",
                                 mode="lines", line=dict(width=0), fillcolor="rgba(44,160,44,0.12)",
                                 name="feasible region", hoverinfo="skip"))
    where = label_positions(df.trainable_fraction, df.accuracy)
    colors = method_colors()
    groups = [(METHODS[m].label if m in METHODS else m, colors.get(m, NEUTRAL), d)
              for m, d in df[df.feasible].groupby("method", sort=False)]
    groups.append(("breaks a limit", NEUTRAL, df[~df.feasible]))
    for name, color, d in groups:
        if d.empty:
            continue
        feasible = bool(d.feasible.iloc[0])
        hover = [f"{readable(r.label)}<br>accuracy {100 * r.accuracy:.1f}%<br>{fmt(100 * r.trainable_fraction)}% trainable"
                 + ("" if feasible else "<br>breaks: " + ", ".join(r.violates)) for r in d.itertuples()]
        fig.add_trace(go.Scatter(x=d.trainable_fraction, y=d.accuracy, mode="markers+text",
                                 text=[readable(v) for v in d.label],
                                 textposition=[where[i] for i in d.index],
                                 hovertext=hover, hoverinfo="text", name=name,
                                 marker=dict(size=12, color=color, opacity=1 if feasible else 0.6), **_errors(d, "accuracy")))
    if len(evidence.front):
        front = pareto_front(evidence.front, "trainable_fraction", "accuracy")
        fig.add_trace(go.Scatter(x=front.trainable_fraction, y=front.accuracy, mode="lines", name="Pareto front",
                                 line=dict(color=NEUTRAL, dash="dot"), hoverinfo="skip"))
    if evidence.chosen is not None:
        ch = evidence.chosen
        fig.add_trace(go.Scatter(x=[ch.trainable_fraction], y=[ch.accuracy], mode="markers",
                                 name=f"chosen: {evidence.name}",
                                 marker=dict(symbol="star", size=22, color=colors.get(ch.get("method"), NEUTRAL),
                                             line=dict(color="black", width=1.5))))
    # one tick per decade, written as a percentage ("0.01%", not plotly's "100μ")
    decades = range(math.floor(math.log10(x_lo)), math.ceil(math.log10(x_hi)) + 1)
    fig.update_xaxes(type="log", title_text="trainable share of the parameters (log)", range=[math.log10(x_lo), math.log10(x_hi)],
                     tickvals=[10.0 ** k for k in decades], ticktext=[f"{100 * 10.0 ** k:g}%" for k in decades])
    fig.update_yaxes(title_text="test accuracy", tickformat=".0%", range=[y_lo, y_hi])
    fig.update_layout(template=TEMPLATE, height=460, title="runs under the constraints",
                      legend=dict(orientation="h", y=-0.3))  # below the x axis's title, not over it
    return fig


def label_positions(x, y, near: float = 0.6) -> dict:
    """A text position per point of a log-x scatter: below the point when a neighbour within `near` decades on x
    sits higher, else above, so two close points' labels part instead of meeting between them (LoRA over an
    adapter a few tenths of a percent of trainable parameters apart)."""
    keys = list(x.index)
    lx, ys = [math.log10(v) for v in x], list(y)

    def under(a: int) -> bool:  # a neighbour sits higher (on a tie, the one listed first keeps the top)
        return any(abs(lx[b] - lx[a]) < near and (ys[b] > ys[a] or (ys[b] == ys[a] and b < a))
                   for b in range(len(keys)) if b != a)
    return {k: "bottom center" if under(a) else "top center" for a, k in enumerate(keys)}
