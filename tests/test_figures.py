"""The figures as objects: every trace has a colour, a colour names one thing per figure, a method
has its registry colour everywhere, accuracy axes stay inside [0, 1] (a flat line used to get
plotly's -0.5..1.5), sizes that span orders of magnitude get a log axis, and numbers on the page
are written for people. Nothing here trains or opens a browser."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import peftkit as pk
from peftkit import style
from peftkit.notebook import params as nbutil
from peftkit.notebook.plots import (bars, evidence_figure, history_figure, pareto_figure, tree_figure,
                                    transfer_figure)
from peftkit.serving.dashboard import COLORS, dashboard, wrap_html
from peftkit.serving.monitor import Monitor
from peftkit.studies import compression_study as E
from peftkit.studies import principles as pr
from peftkit.studies.selection import RULES, choose_method, recommend

from test_monitor import stream
from test_select import rows


def colour(trace):
    """The colour a trace is drawn in: its line's for lines, else its marker's (None when unset)."""
    line = getattr(trace, "line", None)
    if line is not None and line.color is not None and "lines" in (trace.mode or "lines"):
        return line.color
    marker = getattr(trace, "marker", None)
    return marker.color if marker is not None else None


def legend(fig):
    """(name, colour) of every trace the legend lists."""
    return [(t.name, colour(t)) for t in fig.data if t.showlegend is not False and t.name]


def assert_coloured_and_unique(fig):
    entries = legend(fig)
    assert all(c is not None for _, c in entries), f"traces without a colour: {[n for n, c in entries if c is None]}"
    names = [n for n, _ in entries]
    assert len(names) == len(set(names)), f"a legend entry twice: {names}"
    singles = [(n, c) for n, c in entries if isinstance(c, str)]
    by_colour = {}
    for n, c in singles:
        by_colour.setdefault(c.lower(), []).append(n)
    assert all(len(v) == 1 for v in by_colour.values()), f"one colour for different quantities: {by_colour}"


def accuracy_ranges(fig):
    """The explicit ranges of every y axis whose title or tick format says it is an accuracy."""
    out = []
    for name in fig.layout:
        if name.startswith("yaxis"):
            ax = fig.layout[name]
            title = (ax.title.text or "") if ax.title else ""
            if "accuracy" in title or ax.tickformat == ".0%":
                out.append((name, ax.range))
    return out


def assert_accuracy_axes_in_unit_interval(fig, at_least: int = 1):
    found = accuracy_ranges(fig)
    assert len(found) >= at_least, f"no accuracy axis found in {[n for n in fig.layout if n.startswith('yaxis')]}"
    for name, rng in found:
        assert rng is not None, f"{name} has no range: plotly would pad a flat line to -0.5..1.5"
        assert 0 <= rng[0] < rng[1] <= 1, f"{name} range {rng} is outside [0, 1]"


# --- the helpers in style.py ---------------------------------------------------------------------

@pytest.mark.parametrize("value, shown", [
    (0.0004430375245218263, "0.000443"), (9.211957, "9.21"), (74498, "74,498"), (22713216.0, "22,713,216"),
    (0.5, "0.5"), (1234.5678, "1,235"), (3.2e-7, "3.20e-07"), (float("nan"), "nan"), (np.float32(0.81234), "0.812"),
    ("text", "text"), (True, "True")])
def test_fmt_writes_numbers_for_people(value, shown):
    assert style.fmt(value) == shown


@pytest.mark.parametrize("values", [[0.46] * 5, [0.0, 0.0], [1.0], [0.5, 0.52, 0.99], [-3, 7], [], [float("nan")]])
def test_accuracy_range_stays_in_the_unit_interval_and_is_never_flat(values):
    lo, hi = style.accuracy_range(values)
    assert 0 <= lo < hi <= 1 and hi - lo >= 0.1 - 1e-12
    finite = [v for v in values if math.isfinite(v) and 0 <= v <= 1]
    assert all(lo <= v <= hi for v in finite)


def test_color_for_names_methods_by_label_and_leaves_other_things_alone():
    assert style.color_for("LoRA r=8") == pk.LoRA.color
    assert style.color_for("head only") == pk.HeadOnly.color
    assert style.color_for("Full fine-tune") == pk.FullFineTune.color
    assert style.color_for("adapter pfeiffer simple m=d/16") == pk.Adapter.color
    assert style.color_for("trained on tweets") is None and style.color_for("loRAX", "x") == "x"
    assert not set(style.QUANTITY_COLORS) & set(style.method_colors().values())


def test_readable_names_every_registered_method_for_people_and_keeps_other_names():
    import peft
    cases = {pk.HeadOnly(): "Head only", pk.FullFineTune(): "Full fine-tune", pk.LoRA(r=8): "LoRA r=8",
             pk.LoRA(r=32, rslora=True): "LoRA r=32, rsLoRA", pk.LoRA(r=8, lr_ratio=16.0): "LoRA+ r=8, lambda=16",
             pk.LoRA(r=8, init="pissa"): "LoRA r=8, PiSSA init", pk.DoRA(r=8): "DoRA r=8",
             pk.Adapter(): "Adapter (Pfeiffer, m=d/16)", pk.Adapter(placement="houlsby", size=24): "Adapter (Houlsby, m=24)",
             pk.Hybrid(): "Hybrid (LoRA r=8 + Adapter (Pfeiffer, m=d/16))",
             pk.PeftMethod(peft.VeraConfig(r=64, target_modules=["query"])): "PEFT VeRA r=64"}
    for method, shown in cases.items():
        assert style.readable(method.describe()) == shown, method.describe()
        assert style.color_for(shown) == style.color_for(method.describe())  # the same colour under either name
    for key in pk.METHODS:  # every registered family's bare name (the `method` column) too
        assert style.readable(key) == pk.METHODS[key].label
    assert style.readable("trained on tweets") == "trained on tweets" and style.readable("LoRA r=8") == "LoRA r=8"


def test_tables_show_whole_reasons_and_readable_floats():
    nbutil.tables_for_people()
    reason = "the rolling accuracy fell below the floor of 0.750 set by min_accuracy; switch the adapter " * 2
    shown = pd.DataFrame({"reason": [reason], "value": [0.0004430375245218263], "ms": [9.211957]})._repr_html_()
    assert reason.strip() in shown and "..." not in shown and "…" not in shown
    assert "0.000443" in shown and "9.21" in shown and "0.0004430375" not in shown and "9.211957" not in shown


def test_tables_show_integer_counts_with_thousands_separators_in_a_notebook():
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    try:
        nbutil.tables_for_people()
        df = pd.DataFrame({"file bytes": [90867920, 45427972], "seed": [0, 1], "fits": [True, False],
                           "acc": [0.5, 0.75]}, index=["fp32", "int8"])
        data, _ = shell.display_formatter.format(df)
    finally:
        InteractiveShell.clear_instance()  # no shell left behind for the other tests
    html = data["text/html"]
    assert "90,867,920" in html and "45,427,972" in html and "90867920" not in html
    assert ">0<" in html and ">True<" in html and ">0.75<" in html  # small ints, booleans and floats as before
    assert "90867920" in data["text/plain"]  # the plain repr, and the frame itself, are unchanged
    assert df["file bytes"].dtype.kind == "i"
    twice = pd.DataFrame([[1234567, 7654321]], columns=["n", "n"])  # repeated names are formatted by position
    assert "1,234,567" in nbutil.frame_html(twice) and "7,654,321" in nbutil.frame_html(twice)


# --- the figures ----------------------------------------------------------------------------------

def history(acc):
    return pd.DataFrame({"step": [1, 2, 3, 4], "loss": [0.7, 0.69, 0.69, 0.68], "val_accuracy": [None, acc, None, acc]})


def test_history_figure_takes_method_colours_and_a_flat_accuracy_stays_in_unit_interval():
    fig = history_figure({"head only": history(0.46), "LoRA r=8": history(0.46)})
    assert dict(legend(fig)) == {"head only": pk.HeadOnly.color, "LoRA r=8": pk.LoRA.color}
    assert_coloured_and_unique(fig)
    assert_accuracy_axes_in_unit_interval(fig)


def pruning_table():
    rows = [{"variant": "dense", "kind": "dense", "amount": 0.0, "accuracy": 0.8, "speedup vs dense": 1.0}]
    for a, su, sf in ((0.1, 0.98, 1.1), (0.3, 1.67, 1.3), (0.5, 1.0, 1.5)):
        rows += [{"variant": f"unstructured {a:.0%}", "kind": "unstructured", "amount": a, "accuracy": 0.8 - a / 4,
                  "speedup vs dense": su},
                 {"variant": f"ffn neurons {a:.0%}", "kind": "ffn neurons", "amount": a, "accuracy": 0.8 - a / 3,
                  "speedup vs dense": sf}]
    return pd.DataFrame(rows)


def test_pruning_figure_colours_each_kind_the_same_in_both_panels_with_one_legend_entry():
    fig = E.pruning_figure(pruning_table())
    assert_coloured_and_unique(fig)
    assert sorted(n for n, _ in legend(fig)) == ["ffn neurons", "unstructured"]
    for kind in ("unstructured", "ffn neurons"):
        traces = [t for t in fig.data if t.name == kind]
        assert len(traces) == 2 and len({colour(t) for t in traces}) == 1  # accuracy and speed-up
        assert colour(traces[0]) is not None
    assert_accuracy_axes_in_unit_interval(fig)


def test_compression_figures_keep_accuracy_in_unit_interval():
    bits = pd.DataFrame({"bits": [8, 4, 8, 4], "scheme": ["per-tensor"] * 2 + ["per-channel"] * 2,
                         "accuracy": [0.5] * 4, "f1_macro": [0.3] * 4, "weight_rel_err": [0.0004430375245218263] * 4})
    fig = E.bits_figure(bits)
    assert_coloured_and_unique(fig)
    assert_accuracy_axes_in_unit_interval(fig)
    orders = pd.DataFrame({"order": ["float", "a", "b"], "accuracy": [0.5, 0.5, 0.5]})
    assert_accuracy_axes_in_unit_interval(E.orders_figure(orders))


def monitored():
    mon = Monitor(window=200, min_accuracy=0.75, drop_tolerance=0.05)
    stream(mon, 300, 0.9, conf=(0.9, 0.05), words=12)
    mon.note("switch")
    stream(mon, 300, 0.55, conf=(0.7, 0.08), words=25, unk=0.1, seed=5, start=300)
    return mon


@pytest.mark.parametrize("drift_test", ["psi", "ks"])
def test_monitor_dashboard_gives_every_quantity_its_own_colour(drift_test):
    mon = monitored()
    mon.drift_test = drift_test
    fig = dashboard(mon, "t")
    assert_coloured_and_unique(fig)
    assert {"degradation alert", "rolling accuracy", "mean confidence"} <= {n for n, _ in legend(fig)}
    assert len(set(COLORS.values())) == len(COLORS)
    assert_accuracy_axes_in_unit_interval(fig)


def test_monitor_alert_reasons_are_whole_and_wrapped():
    fig = dashboard(monitored(), "t")
    alert = next(t for t in fig.data if t.name == "degradation alert")
    reasons = monitored().alerts().query("kind == 'degradation'")["reason"]
    assert [t.replace("<br>", " ") for t in alert.text] == [str(r).replace("&", "&amp;").replace("<", "&lt;")
                                                          .replace(">", "&gt;").replace('"', "&quot;")
                                                          .replace("'", "&#x27;") for r in reasons]
    long = "word " * 40
    assert wrap_html(long).replace("<br>", " ") == long.strip() and "<br>" in wrap_html(long)


def test_bars_go_log_when_sizes_span_orders_of_magnitude_and_show_readable_values():
    sizes = pd.DataFrame({"what": ["LoRA adapter file", "full model state"], "bytes": [301234, 90871234]})
    fig = bars(sizes, "what", "bytes", "bytes on disk")
    assert fig.layout.yaxis.type == "log"
    (trace,) = fig.data
    assert list(trace.marker.color) == [pk.LoRA.color, pk.FullFineTune.color]
    assert list(trace.text) == ["301,234", "90,871,234"]
    close = pd.DataFrame({"model": ["a", "b"], "ms per batch": [9.211957, 12.5]})
    fig = bars(close, "model", "ms per batch", "latency")
    assert fig.layout.yaxis.type == "linear" and list(fig.data[0].text) == ["9.21", "12.5"]
    pinned = bars(close, "model", "ms per batch", "latency", colors={"b": "#123456"})  # as another figure drew b
    assert list(pinned.data[0].marker.color)[1] == "#123456"
    hist = history_figure({"a": history(0.5), "b": history(0.6)}, colors={"b": "#123456"})
    assert {t.name: t.line.color for t in hist.data}["b"] == "#123456"
    assert (hist.layout.yaxis.title.text, hist.layout.yaxis2.title.text) == ("cross-entropy (smoothed)", "accuracy")
    acc = pd.DataFrame({"recipe": ["a", "b"], "accuracy_pct": [46.0, 46.0]})
    lo, hi = bars(acc, "recipe", "accuracy_pct", "t").layout.yaxis.range
    assert 0 <= lo < 46 < hi <= 100


def test_spectrum_axis_title_is_typeset_not_ascii():
    df = pd.DataFrame({"k": [1, 2, 3], "sv_update": [3.0, 1.0, 0.1], "sv_random": [1.0, 1.0, 1.0],
                       "energy_update": [0.9, 0.99, 1.0], "energy_random": [0.33, 0.66, 1.0]})
    fig = pr.spectrum_figure(df, r=2)
    titles = [fig.layout[a].title.text for a in fig.layout if a.startswith("yaxis")]
    assert not any("||" in (t or "") or "²_F" in (t or "") for t in titles), titles
    assert any("‖ΔW‖<sub>F</sub><sup>2</sup>" in (t or "") for t in titles)


def test_transfer_figure_keeps_method_colours_for_methods_and_accuracy_in_unit_interval():
    cells = pd.DataFrame({"train": ["movies", "movies", "tweets", "tweets"], "test": ["movies", "tweets"] * 2,
                          "accuracy": [0.46] * 4, "lo": [0.4] * 4, "hi": [0.52] * 4})
    fig = transfer_figure(cells)
    assert_coloured_and_unique(fig)
    assert not {colour(t) for t in fig.data} & set(style.method_colors().values())
    assert_accuracy_axes_in_unit_interval(fig)


def test_selection_figures_draw_methods_in_their_registry_colours():
    ev = recommend(rows())
    fig = evidence_figure(ev)
    colours = style.method_colors()
    for t in fig.data:
        if t.name in {cls.label for cls in pk.METHODS.values()}:
            m = next(k for k, cls in pk.METHODS.items() if cls.label == t.name)
            assert colour(t) == colours[m]
    chosen = next(t for t in fig.data if (t.name or "").startswith("chosen"))
    assert chosen.marker.color == colours[ev.chosen["method"]]
    rec = choose_method(zero_latency="yes")
    leaves = next(t for t in tree_figure(RULES, rec).data if t.name == "methods").marker.color
    assert colours[rec.method.name] in leaves


def test_close_points_labels_part_instead_of_meeting_between_them():
    """The dashboard's evidence chart: LoRA (0.33% trainable, 73%) sat just above the adapter (0.50%, 69%), and LoRA's
    label below its point met the adapter's above it. Now the lower of two close points is labelled below."""
    from peftkit.notebook.plots import label_positions
    x = pd.Series([3.4e-5, 3.3e-3, 5.0e-3, 1.0], index=[10, 11, 12, 13])
    y = pd.Series([0.535, 0.730, 0.688, 0.740], index=x.index)
    assert label_positions(x, y) == {10: "top center", 11: "top center", 12: "bottom center", 13: "top center"}
    tie = label_positions(pd.Series([0.01, 0.012]), pd.Series([0.7, 0.7]))
    assert sorted(tie.values()) == ["bottom center", "top center"]  # equal accuracy: still apart
    fig = evidence_figure(recommend(rows()))
    assert fig.layout.legend.y < -0.25  # below the x axis's title


def test_pareto_figure_hover_formats_numbers():
    ev = recommend(rows())
    fig = pareto_figure(ev.table, x="trainable_fraction")
    for t in fig.data:
        if t.hovertemplate:
            assert "%{y}" not in t.hovertemplate and "%{x}" not in t.hovertemplate, t.hovertemplate
    assert_accuracy_axes_in_unit_interval(fig)


def test_the_run_report_links_the_browser_screenshots(tmp_path, monkeypatch):
    from peftkit.notebook import batch_run
    shots = tmp_path / "shots"
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(batch_run, "SCREENSHOTS", shots)
    page = batch_run.write_report(out, [("01_principles.ipynb", 3.0)], cache=tmp_path / "none.jsonl").read_text()
    assert "Browser screenshots" in page and "None yet" in page
    shots.mkdir()
    for name in ("01_principles.png", "dashboard.png"):
        (shots / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    page = batch_run.write_report(out, [("01_principles.ipynb", 3.0)], cache=tmp_path / "none.jsonl").read_text()
    for name in ("01_principles.png", "dashboard.png"):
        assert f'href="browser/{name}"' in page and (out / "browser" / name).is_file()


def test_accuracy_bars_start_at_zero():
    assert style.accuracy_range([0.43, 0.53], bars=True)[0] == 0
    study = {"accuracy": pd.DataFrame({"variant": ["fp32", "int8"] * 2, "domain": ["movies"] * 2 + ["nyt"] * 2,
                                       "accuracy": [0.43, 0.43, 0.53, 0.53]}),
             "speed": pd.DataFrame({"model": ["fp32", "int8"], "speedup vs fp32": [1.0, 0.98]}),
             "size": pd.DataFrame({"variant": ["fp32", "int8"], "vs fp32": [1.0, 0.28]})}
    fig = E.int8_figure(study)
    assert fig.layout.yaxis.range[0] == 0 and fig.layout.yaxis.range[1] <= 1
    assert_coloured_and_unique(fig)
    assert [fig.layout[a].title.text for a in ("yaxis", "yaxis2", "yaxis3")] == ["accuracy", "speed-up (x)", "size (x fp32)"]


def test_variant_figures_keep_accuracy_axes_within_0_and_100_percent(tmp_path):
    """Two seeds' t interval spans far beyond 0..100 %; the axes of notebook 11's figures must not follow it."""
    from peftkit.notebook import plots_variants as P
    from peftkit.studies.experiments import compare
    from peftkit.studies.variants import ALPHA
    from peftkit.training.loop import TrainConfig
    specs = [pk.LoRA(r=r, alpha=ALPHA, rslora=rs) for r in (4, 8) for rs in (False, True)]
    specs.append(pk.LoRA(r=8, alpha=ALPHA, lr_ratio=16.0))
    rows = compare(specs, base="tiny", domain="tweets", n_train=16, n_eval=16, seeds=(0, 1), eval_domains=False,
                   cache=tmp_path / "r.jsonl", fresh_process=False, progress=False,
                   cfg=TrainConfig(epochs=1, batch_size=8, progress=False))
    vera = pk.LoRA(r=8, alpha=ALPHA, lr_ratio=16.0)  # any second configuration stands in for VeRA's point
    figs = {"rank": P.rank_figure(rows, (4, 8)), "vera": P.vera_figure(rows, (4, 8), vera, "stand-in")}
    lam = P.lambda_figure(rows, (1, 16))
    for name, fig in figs.items():
        lo, hi = fig.layout.yaxis.range
        assert 0 <= lo < hi <= 100, (name, lo, hi)
    lines = {t.name: t.line.color for t in figs["rank"].data}
    assert lines["alpha/r (LoRA)"] == pk.LoRA.color and lines["alpha/sqrt(r) (rsLoRA)"] == P.variant_shade(pk.LoRA.color)
    assert len(set(lines.values())) == 2  # LoRA's hue, two shades: not one colour for both
    lo, hi = lam.layout.yaxis.range
    assert 0 <= lo < hi <= 100
    # what the notebook's quick run drew (LoRA r=32 under alpha/sqrt(r): 55.0% [-51.6, 162.0] over two seeds)
    lo, hi = P._percent_range([(0.55, -0.516, 1.62), (0.68, 0.561, 0.799)])
    assert 0 <= lo < 55 and 68 < hi <= 100


def test_magnitude_direction_figure_gives_each_method_its_own_panel_and_colour():
    from peftkit.notebook.plots_variants import magnitude_direction_figure
    rng = np.random.default_rng(0)
    md = pd.concat([pd.DataFrame({"method": m, "dD": rng.random(50) * k, "dM": rng.random(50) * k})
                    for m, k in (("LoRA r=8", 1e-3), ("DoRA r=8", 1e-3), ("full fine-tune", 1e-1))], ignore_index=True)
    colors = {"LoRA r=8": pk.LoRA.color, "DoRA r=8": pk.DoRA.color, "full fine-tune": pk.FullFineTune.color}
    fig = magnitude_direction_figure(md, colors)
    assert [t.name for t in fig.data] == list(colors)
    assert len({t.xaxis for t in fig.data}) == 3 and len({t.yaxis for t in fig.data}) == 3  # one panel each
    assert [t.marker.color for t in fig.data] == list(colors.values())
    titles = [fig.layout[a].title.text for a in fig.layout if a.startswith(("xaxis", "yaxis"))]
    assert not any("_j" in (t or "") for t in titles), titles  # subscripts drawn, not typed as W_j
    assert any("W<sub>0,j</sub>" in (t or "") for t in titles)
