"""Pictures that teach, drawn in code: where each method sits in a transformer block, and the
shapes of W0 + (alpha/r)·B·A.

The block diagram is not hand-placed: each box carries the module name it stands for in a BERT
layer, and whether a method adapts it is decided by the same code that decides it on a real
model (`LoRA().targets` through `suffix_matches`, the adapter `PLACEMENTS`). Change a default in
the package and the picture follows.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.methods import Adapter, LoRA
from ..core.targets import suffix_matches
from ..layers.adapters import PLACEMENTS
from ..style import TEMPLATE

# One BERT encoder layer, bottom to top: (label, module name in the layer or None, column).
# Column 0 is the main path; the query/key/value projections sit side by side in columns -1, 0, 1.
BLOCK = [
    ("input h", None, 0),
    ("query", "attention.self.query", -1), ("key", "attention.self.key", 0), ("value", "attention.self.value", 1),
    ("softmax(QKᵀ/√d)·V", None, 0),
    ("attention output", "attention.output.dense", 0),
    ("add & LayerNorm", None, 0),
    ("feed-forward up (4d)", "intermediate.dense", 0),
    ("feed-forward down", "output.dense", 0),
    ("add & LayerNorm", None, 0),
    ("to the next layer", None, 0),
]


def adapted(method, module: str) -> bool:
    """Whether `method` (a LoRA or an Adapter spec) adapts the layer module named `module`."""
    if isinstance(method, LoRA):
        return any(module == t or suffix_matches(module, t) for t in method.targets)
    if isinstance(method, Adapter):
        patterns = method.targets or PLACEMENTS[method.placement]
        return any(suffix_matches(module, p) for p in patterns)
    return False


def _rows(method) -> list[tuple[str, int, int, bool]]:
    """(label, column, row, marked) bottom to top for one panel: q, k and v share a row; an
    adapter gets a row of its own right after each module it follows; a LoRA target is marked."""
    out, row = [], 0
    for label, module, col in BLOCK:
        on = module is not None and adapted(method, module)
        if label in ("key", "value"):
            row -= 1  # beside the query
        if isinstance(method, LoRA) and on:
            label += " + (α/r)·B·A"
        out.append((label, col, row, on and isinstance(method, LoRA)))
        row += 1
        if on and isinstance(method, Adapter):
            out.append(("adapter: x + up(f(down(x)))", 0, row, True))
            row += 1
    return out


def block_diagram(methods: dict | None = None) -> go.Figure:
    """One panel per method: a BERT layer with the adapted modules marked in the method's colour.

    `methods` maps a panel title to a LoRA or Adapter spec; by default LoRA on query and value,
    and the Pfeiffer and Houlsby adapters."""
    methods = methods or {"LoRA (query, value)": LoRA(), "Pfeiffer adapter": Adapter(placement="pfeiffer"),
                          "Houlsby adapter": Adapter(placement="houlsby")}
    panels = {title: _rows(m) for title, m in methods.items()}
    height = max(r[-1][2] for r in panels.values()) + 1
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=list(methods), horizontal_spacing=0.03)
    for i, (title, method) in enumerate(methods.items(), start=1):
        color = type(method).color
        for label, col, row, on in panels[title]:
            qkv = label.split(" ")[0] in ("query", "key", "value")  # side by side; the rest spans the path
            x0, x1 = (col * 1.1 - 0.52, col * 1.1 + 0.52) if qkv else (-1.6, 1.6)
            fig.add_shape(type="rect", x0=x0, x1=x1, y0=row - 0.36, y1=row + 0.36, row=1, col=i,
                          line=dict(color=color if on else "#888", width=2 if on else 1),
                          fillcolor=color if on else "#f4f4f4", opacity=0.9 if on else 1)
            text = label.replace(" + ", "<br>+ ") if qkv else label
            fig.add_annotation(x=(x0 + x1) / 2, y=row, text=text, showarrow=False, row=1, col=i,
                               font=dict(size=10 if qkv else 11, color="white" if on else "#222"))
            if row > 0 and not (qkv and col != 0):
                fig.add_annotation(x=0, y=row - 0.36, ax=0, ay=row - 0.64, axref=f"x{i}", ayref=f"y{i}",
                                   xref=f"x{i}", yref=f"y{i}", showarrow=True, arrowhead=2, arrowwidth=1,
                                   arrowcolor="#888", text="")
        fig.update_xaxes(visible=False, range=[-1.8, 1.8], row=1, col=i)
        fig.update_yaxes(visible=False, range=[-0.6, height - 0.2], row=1, col=i)
    fig.update_layout(template=TEMPLATE, height=48 * height + 90, showlegend=False,
                      margin=dict(l=10, r=10, t=60, b=10),
                      title="Where each method sits in one encoder layer (coloured: added or adapted)")
    return fig


def lora_shapes_figure(d_in: int = 384, d_out: int = 384, r: int = 8, alpha: float = 16) -> go.Figure:
    """W0 (d_out x d_in) + (alpha/r) · B (d_out x r) · A (r x d_in), boxes drawn to scale, each
    labelled with its shape and parameter count. A is drawn at least a few pixels tall."""
    unit = 3.0 / max(d_in, d_out)  # data units per row/column
    thin = max(r * unit, 0.06)
    s = alpha / r
    boxes = [  # (label, x0, width, height, colour, parameters)
        ("W₀", 0.0, d_in * unit, d_out * unit, "#bbbbbb", d_in * d_out),
        ("B", d_in * unit + 1.4, thin, d_out * unit, LoRA.color, d_out * r),
        ("A", d_in * unit + 1.6 + thin, d_in * unit, thin, LoRA.color, r * d_in),
    ]
    fig = go.Figure()
    top = max(d_in, d_out) * unit
    for label, x0, w, h, color, n in boxes:
        fig.add_shape(type="rect", x0=x0, x1=x0 + w, y0=top - h, y1=top, fillcolor=color, opacity=0.8,
                      line=dict(color="#333", width=1))
        shape = {"W₀": f"{d_out} x {d_in}", "B": f"{d_out} x {r}", "A": f"{r} x {d_in}"}[label]
        fig.add_annotation(x=x0 + w / 2, y=top - h - 0.12, text=f"<b>{label}</b> {shape}<br>{n:,} parameters",
                           showarrow=False, yanchor="top", font=dict(size=12))
    fig.add_annotation(x=d_in * unit + 0.7, y=top / 2, text=f"+ {s:g} ×", showarrow=False, font=dict(size=20))
    lora_share = r * (d_in + d_out) / (d_in * d_out)
    fig.update_xaxes(visible=False, range=[-0.2, 2 * d_in * unit + 2.0 + thin])
    fig.update_yaxes(visible=False, range=[-0.9, top + 0.2], scaleanchor="x")
    fig.update_layout(template=TEMPLATE, height=330, margin=dict(l=10, r=10, t=50, b=10),
                      title=f"W = W₀ + (α/r)·B·A with α = {alpha:g}, r = {r}: the factors hold "
                            f"{lora_share:.1%} of W₀'s parameters")
    return fig
