"""The project's look, in one place: the plotly template, one colour per method, the colours of
quantities that are not methods, numbers written for people, and the range of an accuracy axis.

The method colours are the registry's (`Method.color` in core/methods.py), so a method drawn by
notebook 04, the selection widgets or the batch report has the same colour everywhere. Figures
of other quantities (the monitor's statistics, pruning kinds) take theirs from `QUANTITY_COLORS`,
chosen not to repeat a method's colour, so a colour on the page names one thing.
"""

from __future__ import annotations

import math
import re

from .core.methods import METHODS

TEMPLATE = "plotly_white"

# Colours for things that are not methods. None of them is a method colour of the registry's
# defaults (D3's first five), so a legend never shows one colour for two different things.
QUANTITY_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#7b4173",
                   "#e6550d", "#31a354")
NEUTRAL = "#7f7f7f"  # reference lines, the Pareto front, runs that break a limit


def method_colors() -> dict[str, str]:
    """Method name -> colour, for every registered method (plotly's color_discrete_map)."""
    return {name: cls.color for name, cls in METHODS.items()}


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")


def color_for(label: str, default: str | None = None) -> str | None:
    """The registry colour of the method that `label` names ("LoRA r=8", "head only", "adapter
    pfeiffer", "full"), matched on the method's name or label at the start; else `default`."""
    key = _key(label)
    names = []
    for name, cls in METHODS.items():
        names += [(_key(name), cls.color), (_key(cls.label), cls.color)]
    names += [(_key("full fine-tune"), METHODS["full"].color)] if "full" in METHODS else []
    for prefix, color in sorted(names, key=lambda p: -len(p[0])):  # "lora_qkv" before "lora"
        if prefix and (key == prefix or key.startswith(prefix + "_")):
            return color
    return default


_LORA = re.compile(r"^(lora|dora) r=(\d+)((?: rs| pissa)*)(?: lr_ratio=([\d.eE+-]+))?$")
_ADAPTER = re.compile(r"^adapter (\w+) (\w+) m=(\S+)$")


def readable(label: str) -> str:
    """A method's label (`Method.describe()`, as result rows keep it) as a figure shows it to people:
    "head_only" -> "Head only", "full" -> "Full fine-tune", "lora r=8 rs" -> "LoRA r=8, rsLoRA",
    "lora r=8 lr_ratio=16" -> "LoRA+ r=8, lambda=16", "adapter pfeiffer simple m=d/16" -> "Adapter
    (Pfeiffer, m=d/16)", "peft vera r=64" -> "PEFT VeRA r=64". A label it does not know (a name a
    notebook chose, "LoRA r=8") comes back unchanged."""
    text = str(label)
    if text in METHODS:
        return METHODS[text].label
    if text.startswith("hybrid (") and text.endswith(")") and " + " in text:
        lora, adapter = text[len("hybrid ("):-1].split(" + ", 1)
        return f"Hybrid ({readable(lora)} + {readable(adapter)})"
    m = _LORA.match(text)
    if m:
        family, r, flags, ratio = m.groups()
        name = ("DoRA" if family == "dora" else "LoRA") + ("+" if ratio else "")
        extras = (["rsLoRA"] if " rs" in flags else []) + (["PiSSA init"] if " pissa" in flags else [])
        extras += [f"lambda={ratio}"] if ratio else []
        return ", ".join([f"{name} r={r}", *extras])
    m = _ADAPTER.match(text)
    if m:
        placement, variant, size = m.groups()
        parts = [placement.capitalize() if placement != "custom" else "custom layers"]
        parts += [variant] if variant != "simple" else []
        return f"Adapter ({', '.join(parts + [f'm={size}'])})"
    if text.startswith("peft "):
        kind, _, rest = text[len("peft "):].partition(" ")
        names = {"vera": "VeRA", "ia3": "IA3", "loha": "LoHa", "lokr": "LoKr", "adalora": "AdaLoRA", "oft": "OFT",
                 "lora": "LoRA"}
        return f"PEFT {names.get(kind, kind.upper())}{' ' + rest if rest else ''}"
    return text


def fmt(value, digits: int = 3) -> str:
    """A number as a person reads it: thousands separators for counts, `digits` significant
    figures otherwise (0.000443, 9.21, 1,234), "nan" and "inf" spelt out; anything else as str."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == int(x) and abs(x) < 1e15:
        return f"{int(x):,}"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    if abs(x) < 1e-4:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def accuracy_range(*values, pad: float = 0.05, bars: bool = False) -> list[float]:
    """An accuracy axis for these values (and their interval ends): the data with `pad` either
    side, never outside [0, 1], and at least 0.1 wide, so a flat line does not become -0.5..1.5.
    `bars=True` starts it at 0: a bar's length is its value, and a cut axis would exaggerate."""
    flat = [float(v) for vs in values for v in (vs if hasattr(vs, "__iter__") else [vs])
            if v is not None and math.isfinite(float(v))]
    if not flat:
        return [0.0, 1.0]
    lo, hi = max(0.0, min(flat) - pad), min(1.0, max(flat) + pad)
    if hi - lo < 0.1:  # widen a flat line around its middle, still within [0, 1]
        mid = (lo + hi) / 2
        lo, hi = max(0.0, min(mid - 0.05, 0.9)), min(1.0, max(mid + 0.05, 0.1))
    return [0.0, hi] if bars else [lo, hi]
