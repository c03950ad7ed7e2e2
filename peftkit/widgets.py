"""ipywidgets UIs for the notebooks, written so their logic runs and is tested without a browser.

Each UI is a small class. `widget` is the one thing a notebook displays; the controls are plain
attributes; every observer is an ordinary method reading the controls and writing its results
to attributes. A test sets `control.value = ...` (which fires the same observers a browser
would) and reads the results back. Each control carries a stable CSS class, `peftkit-<ui>-<name>`,
so the browser tests can find it without depending on layout or description text.
"""

from __future__ import annotations

import ipywidgets as W

from .principles import adapter_params, linear_params, lora_params


def _check_positive(**values) -> None:
    bad = {k: v for k, v in values.items()
           if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise ValueError(f"layer sizes, r and adapter_size must be positive integers; got {bad}.")


# --- the parameter calculator (notebook 01) ------------------------------------------------

def layer_counts(in_features: int, out_features: int, r: int, adapter_size: int) -> dict:
    """Parameter counts for one Linear layer, a rank-r LoRA on it and an adapter on its output.

    Returns a dict with the four inputs and:
        layer: in*out + out, the layer's own weight and bias;
        lora: r*(in+out), the A and B factors;
        adapter: 2*out*m + out + m, a bottleneck of width m on the layer's output (width out);
        lora_pct, adapter_pct: each as a percentage of `layer`;
        break_even_r: the rank at which LoRA's r*(in+out) reaches the weight's in*out.
    """
    _check_positive(in_features=in_features, out_features=out_features, r=r,
                    adapter_size=adapter_size)
    layer = linear_params(in_features, out_features)
    lora = lora_params(in_features, out_features, r)
    adapter = adapter_params(out_features, adapter_size)
    return {
        "in_features": in_features, "out_features": out_features, "r": r,
        "adapter_size": adapter_size, "layer": layer, "lora": lora, "adapter": adapter,
        "lora_pct": 100 * lora / layer, "adapter_pct": 100 * adapter / layer,
        "break_even_r": in_features * out_features / (in_features + out_features),
    }


def counts_html(c: dict) -> str:
    """The counts from `layer_counts` as a small HTML table (numbers with thousands separators)."""
    rows = [
        ("layer W (in &times; out + bias)", c["layer"], "100%"),
        (f"LoRA, r = {c['r']}: r(in + out)", c["lora"], f"{c['lora_pct']:.2f}%"),
        (f"adapter, m = {c['adapter_size']}: 2&middot;out&middot;m + out + m", c["adapter"],
         f"{c['adapter_pct']:.2f}%"),
    ]
    body = "".join(f"<tr><td>{name}</td><td style='text-align:right'>{n:,}</td>"
                   f"<td style='text-align:right'>{pct}</td></tr>" for name, n, pct in rows)
    note = (f"LoRA stops saving parameters at r &asymp; {c['break_even_r']:.0f} "
            f"(= in&middot;out / (in + out)).")
    return ("<table class='peftkit-counts'><tr><th>what</th><th>parameters</th>"
            f"<th>% of the layer</th></tr>{body}</table><p>{note}</p>")


class ParamCalculator:
    """Sliders for a layer's shape, the LoRA rank r and the adapter width m; live counts below.

    Attributes:
        sliders: dict of IntSlider: in_features, out_features, r, adapter_size.
        text: an HTML widget showing the counts; `counts` holds the same numbers as a dict.
        widget: the VBox to display.
    """

    # name -> (description, min, max, step); widths up to 4096 cover BERT-large to 7B models.
    SPECS = {
        "in_features": ("in_features", 8, 4096, 8),
        "out_features": ("out_features", 8, 4096, 8),
        "r": ("LoRA rank r", 1, 256, 1),
        "adapter_size": ("adapter m", 1, 512, 1),
    }

    def __init__(self, in_features: int = 384, out_features: int = 384, r: int = 8,
                 adapter_size: int = 24):
        start = dict(in_features=in_features, out_features=out_features, r=r,
                     adapter_size=adapter_size)
        layer_counts(**start)  # reject bad starting values before building anything
        style = {"description_width": "110px"}
        self.sliders: dict[str, W.IntSlider] = {}
        for name, (desc, lo, hi, step) in self.SPECS.items():
            value = start[name]
            if not lo <= value <= hi:
                raise ValueError(f"{name}={value} is outside the slider's range {lo}..{hi}.")
            s = W.IntSlider(value=value, min=lo, max=hi, step=step, description=desc,
                            continuous_update=True, style=style, layout=W.Layout(width="480px"))
            s.add_class(f"peftkit-calc-{name.replace('_', '-')}")
            s.observe(self._update, names="value")
            self.sliders[name] = s
        self.text = W.HTML()
        self.text.add_class("peftkit-calc-text")
        self.counts: dict = {}
        self._update()
        self.widget = W.VBox([*self.sliders.values(), self.text])
        self.widget.add_class("peftkit-calc")

    def _update(self, change=None) -> None:
        # One observer for all sliders: recomputing four small products is cheaper than
        # tracking which one moved, and it keeps `counts` and `text` consistent by construction.
        self.counts = layer_counts(**{k: s.value for k, s in self.sliders.items()})
        self.text.value = counts_html(self.counts)

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)
