"""The `make dashboard` app without a browser: its parts, its explicit widths, what starts
collapsed, where its evidence comes from; the browser test (test_dashboard.py) checks the paint."""

from __future__ import annotations

import json

import ipywidgets as W
import pandas as pd
import pytest

from peftkit.notebook import app
from peftkit.notebook.widgets import SLIDER_WIDTH, evidence_table_html

from test_select import rows


def build():
    return app.Dashboard(rows(), {"domain": "movies", "training snippets per run": "8,454", "evidence": "test rows"},
                         {"torch": "2.x", "threads": 2}, quick_note="small")


def test_the_app_lays_out_chooser_and_limits_beside_the_evidence_with_details_collapsed():
    d = build()
    assert isinstance(d.layout, W.AppLayout)
    assert d.layout.left_sidebar.layout.width == app.LEFT and d.layout.center.layout.width == app.CENTER
    left, center = d.layout.left_sidebar.children, d.layout.center.children
    assert all(dd in left for dd in d.chooser.dropdowns.values()) and d.explorer.controls in left
    assert d.explorer.table in center and d.explorer.out in center
    assert d.details.selected_index is None  # environment and provenance start collapsed
    assert d.details.titles[:2] == ("environment", "provenance of the evidence")
    assert all(s.layout.width == SLIDER_WIDTH and s.readout for s in d.explorer.sliders.values())
    # no two sliders share a Layout: one instance would tie their sizes together
    assert len({id(s.layout) for s in d.explorer.sliders.values()}) == len(d.explorer.sliders)
    assert "Quick mode" in d.widget.children[0].value


def test_the_quick_note_says_when_peaks_were_measured_inside_the_notebooks_kernels():
    import pandas as pd
    small = pd.DataFrame({"n_train": [480, 480], "own_process": [False, True]})
    note = app.quick_note(small)
    assert "480 training snippets" in note and "inside the notebooks' kernels" in note
    assert "kernels" not in app.quick_note(small.assign(own_process=True))
    assert "kernels" not in app.quick_note(small.drop(columns="own_process"))  # rows cached before it was recorded
    assert app.quick_note(small.assign(n_train=8454)) is None  # the full comparison: no banner


def test_compare_records_whether_each_run_had_a_process_of_its_own(tmp_path):
    import peftkit as pk
    from peftkit.studies.experiments import compare, read_cache
    from peftkit.training.loop import TrainConfig
    cache = tmp_path / "results.jsonl"
    kw = dict(base="tiny", domain="tweets", n_train=32, n_eval=16, eval_domains=False, cache=cache, progress=False,
              cfg=TrainConfig(batch_size=16, progress=False))
    assert compare([pk.HeadOnly()], fresh_process=False, **kw).own_process.tolist() == [False]
    assert compare([pk.LoRA(r=2, alpha=4)], fresh_process=True, **kw).own_process.tolist() == [True]
    assert sorted(r["own_process"] for r in read_cache(cache).values()) == [False, True]


def test_the_evidence_table_follows_the_limits():
    d = build()
    assert d.explorer.table.value == evidence_table_html(d.explorer.evidence)
    assert d.explorer.table.value.count("meets all") == 4
    d.explorer.sliders["min_accuracy"].value = 1.0
    assert "meets all" not in d.explorer.table.value and "breaks min_accuracy" in d.explorer.table.value
    assert "90 MB" in d.explorer.table.value or "90.0 MB" in d.explorer.table.value


def test_cached_comparison_takes_the_setup_with_most_default_methods(tmp_path):
    cache = tmp_path / "results.jsonl"
    assert app.cached_comparison(cache=cache).empty
    lines = []
    runs = rows().replace({"label": {"adapter": "adapter pfeiffer simple m=d/16"}})  # the default adapter's label
    for i, r in enumerate(runs.to_dict("records")):
        for n_train, keep in ((8454, True), (512, i < 2)):
            if keep:
                lines.append({**r, "key": f"{r['label']}-{n_train}", "n_train": n_train, "seed": 0, "split_seed": 0})
    lines.append({**lines[0], "key": "tiny", "base": "tiny"})
    cache.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = app.cached_comparison(cache=cache)
    assert len(got) == 4 and set(got.n_train) == {8454} and set(got.base) == {"minilm"}
    results, prov = app.load_evidence(cache=cache)
    assert "result cache" in prov["evidence"] and prov["training snippets per run"] == "8,454"


@pytest.mark.parametrize("order", ["default first", "default last"])
def test_cached_comparison_takes_the_default_runs_not_others_of_the_same_label(tmp_path, order):
    """"lora r=8" also labels LoRA on every projection, at alpha 8, or on a 4-bit base (notebooks 03, 05 and 08
    cache them); two notebooks at a time write rows in either order. The app takes the default spec, seed 0."""
    import peftkit as pk
    runs = rows().replace({"label": {"adapter": "adapter pfeiffer simple m=d/16"}})
    lines = [{**r, "key": r["label"], "n_train": 480, "seed": 0, "split_seed": 0,
              "spec": {**r["spec"], "eval_domains": True}} for r in runs.to_dict("records")]
    lora = next(x for x in lines if x["label"] == "lora r=8")
    others = [{**lora, "key": "all-projections", "accuracy": 0.54,
               "spec": {"method": pk.LoRA(r=8, alpha=16, targets=("query", "key", "value", "dense")).to_dict()}},
              {**lora, "key": "alpha8", "accuracy": 0.50, "spec": {"method": pk.LoRA(r=8, alpha=8).to_dict()}},
              {**lora, "key": "4bit", "accuracy": 0.51, "spec": {**lora["spec"], "base_bits": 4}},
              {**lora, "key": "seed1", "accuracy": 0.52, "seed": 1},
              {**lora, "key": "one-domain", "accuracy": 0.53, "spec": {**lora["spec"], "eval_domains": False}}]
    lines = lines + others if order == "default first" else others + lines
    cache = tmp_path / "results.jsonl"
    cache.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = app.cached_comparison(cache=cache)
    assert list(got.label) == [m.describe() for m, _ in app.DEFAULT_RUNS]  # one order, whatever the cache's
    assert got.set_index("label").loc["lora r=8", "accuracy"] == lora["accuracy"] == 0.825


@pytest.mark.parametrize("path", ["apps/dashboard.ipynb"])
def test_the_app_notebook_only_starts_the_package_app(path):
    from pathlib import Path
    nb = json.loads((Path(__file__).resolve().parents[1] / path).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert "main(" in "".join(code[-1]["source"]) and all(not c.get("outputs") for c in code)
    assert not [c for c in nb["cells"] if c["cell_type"] == "markdown"]  # Voila would show it above the app


def test_with_nothing_cached_the_app_trains_notebook_04s_quick_runs(tmp_path, monkeypatch):
    """`make dashboard` on a fresh clone trains the quick comparison itself: the quick recipe (480 snippets in 60
    steps of 8 at its rates), so it learns (16 steps of 32 left LoRA at chance) and 04 reuses the runs."""
    from peftkit.notebook import params as nbutil
    asked = []

    def fake_compare(methods, **kw):
        (m,) = methods
        asked.append((m.name, kw))
        row = rows().iloc[0].to_dict()
        return pd.DataFrame([{**row, "label": m.describe(), "method": m.name, "n_train": kw["n_train"],
                              "lr": kw["cfg"].lr, "own_process": not kw["fresh_process"]}])

    monkeypatch.setattr(app, "compare", fake_compare)
    results, prov = app.load_evidence(cache=tmp_path / "results.jsonl", quick=True)
    q = nbutil.QUICK_RUN
    assert [name for name, _ in asked] == ["full", "lora", "adapter", "head_only"]
    for name, kw in asked:
        assert (kw["n_train"], kw["n_eval"], kw["cfg"].batch_size, kw["cfg"].epochs, kw["cfg"].lr, kw["cfg"].seed) == \
            (q["n_train"], q["n_eval"], q["batch_size"], q["epochs"], q["lr"][name], 0)
        assert kw["split_seed"] == 0 and kw.get("eval_domains", True) and not kw["fresh_process"]
    assert "trained when this app first started (quick sizes)" in prov["evidence"]
