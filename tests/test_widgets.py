"""The widget logic, without a browser: formulas, observers, and the CSS classes tests rely on."""

import pytest
import torch

import peftkit as pk
from peftkit.notebook.widgets import ParamCalculator, counts_html, layer_counts


def test_layer_counts_formulas_minilm_query():
    c = layer_counts(384, 384, r=8, adapter_size=24)
    assert c["layer"] == 384 * 384 + 384
    assert c["lora"] == 8 * (384 + 384)
    assert c["adapter"] == 2 * 384 * 24 + 384 + 24
    assert c["lora_pct"] == pytest.approx(100 * 6144 / 147_840)
    assert c["break_even_r"] == pytest.approx(192)


def test_layer_counts_rectangular_uses_out_for_the_adapter():
    c = layer_counts(384, 1536, r=4, adapter_size=16)  # MiniLM's FFN up-projection
    assert c["lora"] == 4 * (384 + 1536)
    assert c["adapter"] == 2 * 1536 * 16 + 1536 + 16


@pytest.mark.parametrize("in_f,out_f,r,m", [(384, 384, 8, 24), (64, 256, 3, 5), (1536, 384, 16, 48)])
def test_layer_counts_match_the_package_layers(in_f, out_f, r, m):
    c = layer_counts(in_f, out_f, r, m)
    lin = torch.nn.Linear(in_f, out_f)
    lora = pk.LoRALinear(lin, r=r)
    assert sum(p.numel() for p in lin.parameters()) == c["layer"]
    assert lora.lora_A.numel() + lora.lora_B.numel() == c["lora"]
    assert sum(p.numel() for p in pk.BottleneckAdapter(out_f, size=m).parameters()) == c["adapter"]


@pytest.mark.parametrize("bad", [dict(r=0), dict(adapter_size=-1), dict(in_features=2.5), dict(r=True)])
def test_layer_counts_rejects_non_positive_integers(bad):
    args = dict(in_features=384, out_features=384, r=8, adapter_size=24) | bad
    with pytest.raises(ValueError, match="positive integers"):
        layer_counts(**args)


def test_calculator_starts_consistent():
    calc = ParamCalculator()
    assert calc.counts == layer_counts(384, 384, 8, 24)
    assert calc.text.value == counts_html(calc.counts)
    assert f"{calc.counts['lora']:,}" in calc.text.value


@pytest.mark.parametrize("name,value", [("in_features", 768), ("out_features", 1536), ("r", 16),
                                        ("adapter_size", 64)])
def test_setting_a_slider_fires_the_observer(name, value):
    calc = ParamCalculator()
    before_text, before = calc.text.value, dict(calc.counts)
    calc.sliders[name].value = value
    expected = layer_counts(**{k: s.value for k, s in calc.sliders.items()})
    assert calc.counts == expected and calc.counts[name] == value
    assert calc.counts != before and calc.text.value != before_text
    assert calc.text.value == counts_html(expected)


def test_rank_slider_scales_lora_linearly_and_leaves_the_adapter_alone():
    calc = ParamCalculator()
    lora, adapter = calc.counts["lora"], calc.counts["adapter"]
    calc.sliders["r"].value = 32
    assert calc.counts["lora"] == 4 * lora and calc.counts["adapter"] == adapter
    assert f"{4 * lora:,}" in calc.text.value


def test_css_classes_the_browser_test_uses():
    calc = ParamCalculator()
    assert "peftkit-calc-r" in calc.sliders["r"]._dom_classes
    assert "peftkit-calc-adapter-size" in calc.sliders["adapter_size"]._dom_classes
    assert "peftkit-calc-text" in calc.text._dom_classes
    assert calc.widget.children[-1] is calc.text


def test_calculator_rejects_a_start_outside_the_slider_range():
    with pytest.raises(ValueError, match="outside the slider's range"):
        ParamCalculator(r=1000)
