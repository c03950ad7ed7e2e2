"""The method-selection widgets without a browser: setting a control fires the same observers a
browser would, and the recommendation, its text and its figure follow."""

import pytest

from peftkit.studies.selection import RULES, AnswerError, choose_method, recommend
from peftkit.notebook.widgets import ConstraintExplorer, MethodChooser, _ceil

from test_select import rows


def leaf_colors(fig):
    return next(t for t in fig.data if t.name == "methods").marker.color


def test_chooser_starts_at_the_defaults_and_shows_both_tables():
    c = MethodChooser()
    assert c.recommendation == choose_method()
    assert "Recommended: LoRA r=8" in c.text.value
    assert c.article.rule.name == "otherwise"  # the article's default: LoRA
    assert "article's tree" in c.text.value and "it agrees" in c.text.value


def test_a_dropdown_change_updates_the_answer_the_text_and_the_highlighted_path():
    c = MethodChooser()
    before = c.text.value
    c.dropdowns["zero_latency"].value = "yes"
    assert c.recommendation.rule.name == "zero-latency"
    assert c.text.value != before and "Path: <b>zero-latency</b>" in c.text.value
    colors = leaf_colors(c.figure)
    assert colors[0] != "white" and all(col == "white" for col in colors[1:])
    c.dropdowns["zero_latency"].value = "no"
    c.dropdowns["task_complexity"].value = "high"
    c.dropdowns["deployment_constraints"].value = "flexible"
    assert c.recommendation.method.name == "adapter"
    idx = [r.name for r in RULES].index("complex-and-flexible")
    assert leaf_colors(c.figure)[idx] != "white"
    # the Output widget holds exactly the current figure, as plotly's mimetype only
    (shown,) = c.out.outputs
    assert list(shown["data"]) == ["application/vnd.plotly.v1+json"]
    assert shown["data"]["application/vnd.plotly.v1+json"]["data"] == c.figure.to_dict()["data"]
    assert "<b>disagrees</b>" in c.text.value  # the article wants ample resources for adapters
    c.dropdowns["available_resources"].value = "abundant"
    assert c.recommendation.method.name == "adapter" and c.article.rule.name == "complex-and-good"
    assert "it agrees" in c.text.value


def test_chooser_rejects_a_bad_start_and_carries_css_classes():
    with pytest.raises(AnswerError, match="choose one of"):
        MethodChooser(model_size="tiny")
    c = MethodChooser()
    assert "peftkit-tree-model-size" in c.dropdowns["model_size"]._dom_classes
    assert "peftkit-tree-text" in c.text._dom_classes


def test_explorer_starts_with_every_run_feasible():
    e = ConstraintExplorer(rows())
    assert e.evidence.table.feasible.all()
    assert e.evidence.label == recommend(rows()).label == "lora r=8"
    assert any(t.name == "chosen: LoRA r=8" for t in e.figure.data)


def test_moving_sliders_changes_the_recommendation_and_the_chart():
    e = ConstraintExplorer(rows())
    e.sliders["max_sec_per_step"].value = 0.3
    assert e.evidence.label == "head_only" and "Recommended: Head only" in e.text.value
    assert any(t.name == "breaks a limit" for t in e.figure.data)
    e.sliders["min_accuracy"].value = 0.9
    assert e.evidence.chosen is None and "Nothing meets every limit" in e.text.value
    assert "Relax" in e.text.value
    assert not any((t.name or "").startswith("chosen") for t in e.figure.data)


def test_explorer_refuses_mixed_results():
    df = rows()
    df.loc[0, "domain"] = "tweets"
    with pytest.raises(ValueError, match="mix 2 set-ups"):
        ConstraintExplorer(df)


@pytest.mark.parametrize("v,expected", [(0.734, 0.74), (1877.0, 1900.0), (2.4717, 2.5), (0, 1.0)])
def test_slider_ends_are_readable(v, expected):
    assert _ceil(v) == pytest.approx(expected)
