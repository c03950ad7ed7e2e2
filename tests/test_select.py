"""Method selection: every rule of the decision table, the article's own examples, and the
evidence recommender on hand-made result rows whose right answer is known."""

import math

import pandas as pd
import pytest

from peftkit.style import readable

import peftkit as pk
from peftkit.studies.selection import (ARTICLE_CHOICES, ARTICLE_RULES, ARTICLE_WORDS, QUESTIONS, RULES, AnswerError, Constraints,
                            Rule, choose_method, pareto, recommend, rules_frame, validate_answers, vocabulary_frame)

# One set of answers per rule that reaches exactly that rule. A rule without a case fails below.
RULE_CASES = {
    "zero-latency": dict(zero_latency="yes", task_complexity="high", deployment_constraints="flexible"),
    "inspectable": dict(inspectable="yes", model_size="small", available_resources="abundant"),
    "large-and-limited": dict(model_size="large", available_resources="limited", task_complexity="high"),
    "no-room-for-full": dict(full_ft_fits="no", task_complexity="high", deployment_constraints="flexible"),
    "complex-and-flexible": dict(task_complexity="high", deployment_constraints="flexible"),
    "many-tasks": dict(multi_task="yes", model_size="small", available_resources="abundant"),
    "small-and-abundant": dict(model_size="small", available_resources="abundant", full_ft_fits="yes"),
    "strict-deployment": dict(deployment_constraints="strict", model_size="medium"),
    "otherwise": dict(),
}


def test_every_rule_has_a_case():
    assert set(RULE_CASES) == {r.name for r in RULES}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_each_rule_is_reached_by_its_case(rule):
    rec = choose_method(**RULE_CASES[rule.name])
    assert rec.rule is rule and rec.method == rule.method
    assert rec.path[-1].rule == rule.name and rec.path[-1].matched
    assert [s.rule for s in rec.path] == [r.name for r in RULES[:len(rec.path)]]
    assert not any(s.matched for s in rec.path[:-1])
    assert rule.reason in rec.reasons[0]


@pytest.mark.parametrize("rule", [r for r in RULES if r.when], ids=lambda r: r.name)
def test_each_condition_of_a_rule_is_needed(rule):
    """Flip one condition at a time: the rule must stop matching (no dead condition)."""
    answers = validate_answers(RULE_CASES[rule.name])
    for q in rule.when:
        other = next(c for c in QUESTIONS[q][0] if c not in rule.when[q])
        assert not rule.check({**answers, q: other})[0], f"{rule.name} still matches with {q}={other}"


# The article's examples (lines 514 and 518) and a few more, in its words and in peftkit's: its four
# inputs -> its outcome, and what peftkit's table says with the new questions at their defaults (no
# latency, inspection or multi-task requirement; memory unknown). All 54 combinations of the
# article's words are in test_article.py.
ARTICLE_EXAMPLES = [
    (("large", "limited", "simple", "strict"), "lora", "lora"),  # the article's scenario 1
    (("medium", "good", "complex", "normal"), "adapter", "lora"),  # scenario 2; peftkit's differs
    (("large", "limited", "high", "strict"), "lora", "lora"),
    (("small", "abundant", "high", "flexible"), "adapter", "adapter"),
    (("small", "abundant", "low", "strict"), "lora", "full"),  # strict and simple; peftkit: full fine-tune
    (("medium", "moderate", "medium", "moderate"), "lora", "lora"),
    (("medium", "normal", "complex", "loose"), "lora", "adapter"),  # peftkit: complex and flexible
]


@pytest.mark.parametrize("inputs,article,ours", ARTICLE_EXAMPLES, ids=lambda x: str(x))
def test_article_examples(inputs, article, ours):
    answers = dict(zip(["model_size", "available_resources", "task_complexity", "deployment_constraints"], inputs))
    assert choose_method(ARTICLE_RULES, **answers).method.name == article
    assert choose_method(**answers).method.name == ours


def test_article_table_is_its_chain_in_its_words():
    assert [r.name for r in ARTICLE_RULES] == ["large-and-limited", "strict-and-simple", "complex-and-good", "otherwise"]
    assert [r.method.name for r in ARTICLE_RULES] == ["lora", "lora", "adapter", "lora"]
    assert {r.source for r in ARTICLE_RULES} == {"article"}
    article_words = {w for words in ARTICLE_CHOICES.values() for w in words}
    assert all(v in article_words for r in ARTICLE_RULES for values in r.when.values() for v in values)
    assert {r.method.name for r in RULES} == {"lora", "adapter", "full", "hybrid"}
    assert not ARTICLE_RULES[-1].when and not RULES[-1].when


def test_the_article_rules_speak_the_articles_words():
    rec = choose_method(ARTICLE_RULES, model_size="medium", available_resources="abundant", task_complexity="high",
                        deployment_constraints="moderate")
    assert rec.rule.name == "complex-and-good"
    assert rec.reasons[0].startswith("task_complexity is complex and available_resources is good")
    assert rec.path[0].why == "model_size is medium, not large"
    assert rec.path[1].why == "deployment_constraints is normal, not strict"


# The word table, written out: the article's word -> peftkit's word for the same answer.
WORDS = {("available_resources", "normal"): "moderate", ("available_resources", "good"): "abundant",
         ("task_complexity", "simple"): "low", ("task_complexity", "complex"): "high",
         ("deployment_constraints", "normal"): "moderate", ("deployment_constraints", "loose"): "flexible"}


def test_the_word_table_maps_every_article_word_onto_peftkits_scale():
    assert {(q, a): p for q, words in ARTICLE_WORDS.items() for a, p in words.items() if a != p} == WORDS
    for q, words in ARTICLE_WORDS.items():
        assert set(words.values()) <= set(QUESTIONS[q][0])
        assert len(set(words.values())) == len(words)  # no two article words for one answer
        for article, ours in words.items():
            assert article not in QUESTIONS[q][0] or article == ours  # a shared word means the same
    assert len(vocabulary_frame()) == sum(len(w) for w in ARTICLE_WORDS.values())


@pytest.mark.parametrize("question,article", list(WORDS), ids=lambda x: str(x))
def test_article_words_are_answers(question, article):
    assert validate_answers({question: article})[question] == WORDS[question, article]
    ours = dict(model_size="medium", **{question: WORDS[question, article]})
    theirs = dict(model_size="medium", **{question: article})
    assert choose_method(**theirs) == choose_method(**ours)


def test_memory_rules_out_the_full_fine_tune():
    small_rich = dict(model_size="small", available_resources="abundant")
    assert choose_method(**small_rich).method.name == "full"
    rec = choose_method(**small_rich, full_ft_fits="no")
    assert rec.method.name != "full"
    assert any("does not fit in memory" in r for r in rec.reasons)


def test_zero_latency_beats_the_article_adapter_case_and_notes_multi_task():
    rec = choose_method(zero_latency=True, multi_task=True, task_complexity="high", deployment_constraints="flexible")
    assert rec.method == pk.LoRA(r=8, alpha=16)
    assert any("merged copy per task" in r for r in rec.reasons)


@pytest.mark.parametrize("answers,match", [
    (dict(model_size="huge"), r"model_size='huge'.*\['small', 'medium', 'large'\]\.$"),
    (dict(zero_latency="maybe"), r"\['no', 'yes'\]"),
    (dict(colour="red"), r"unknown question.*'colour'.*model_size"),
    (dict(task_complexity="simpel"), r"\['low', 'medium', 'high'\] \(or the article's words \['simple', 'complex'\]\); "
                                     r"did you mean 'simple'\?"),
    (dict(available_resources="Good"), r"did you mean 'good'\?"),
    (dict(model_size="Large"), r"did you mean 'large'\?"),
    (dict(deployment_constraints="good"), r"'good' answers available_resources, not deployment_constraints"),
    (dict(task_compexity="low"), r"Did you mean 'task_complexity' for 'task_compexity'\?"),
    (dict(model_size=["large"]), r"model_size=\['large'\] is not a valid answer"),
])
def test_invalid_answers_list_the_valid_choices(answers, match):
    with pytest.raises(AnswerError, match=match):
        choose_method(**answers)


def test_booleans_are_read_as_yes_no():
    assert validate_answers({"inspectable": True})["inspectable"] == "yes"
    assert validate_answers({"multi_task": False})["multi_task"] == "no"


def test_a_rule_with_an_invalid_condition_is_refused():
    with pytest.raises(AnswerError, match="not a valid condition"):
        Rule("bad", {"model_size": ("gigantic",)}, pk.LoRA(), "never")
    with pytest.raises(AnswerError, match="not a valid condition"):
        Rule("bad", {"task_complexity": ("loose",)}, pk.LoRA(), "an article word of another question")
    rule = Rule("either", {"task_complexity": ("simple", "medium")}, pk.LoRA(), "mixed vocabularies")
    assert rule.check({"task_complexity": "low"})[0] and rule.check({"task_complexity": "medium"})[0]
    assert not rule.check({"task_complexity": "high"})[0]


def test_rules_frame_lists_every_rule_in_order():
    df = rules_frame()
    assert df["rule"].tolist() == [r.name for r in RULES]
    assert df.loc[df.rule == "otherwise", "if"].item() == "(always)"


# --- evidence --------------------------------------------------------------------------------

def rows(**overrides):
    """Four runs shaped like the default comparison (numbers made up, each test's answer known)."""
    conf = [[500, 0], [0, 500]]  # n = 1000 test examples: one standard error at 82% is 1.2 points
    base = [
        dict(label="full", method="full", accuracy=0.819, trainable_pct=100.0, sec_per_step=0.73,
             peak_mem_mib=1600, adapter_bytes=90_000_000, spec={"method": {"method": "full"}}),
        dict(label="lora r=8", method="lora", accuracy=0.825, trainable_pct=0.33, sec_per_step=0.49,
             peak_mem_mib=1280, adapter_bytes=304_000,
             spec={"method": pk.LoRA(r=8, alpha=16).to_dict()}),
        dict(label="adapter", method="adapter", accuracy=0.827, trainable_pct=0.50, sec_per_step=0.47,
             peak_mem_mib=1200, adapter_bytes=461_000, spec={"method": pk.Adapter().to_dict()}),
        dict(label="head_only", method="head_only", accuracy=0.654, trainable_pct=0.003, sec_per_step=0.28,
             peak_mem_mib=750, adapter_bytes=4_000, spec={"method": {"method": "head_only"}}),
    ]
    df = pd.DataFrame([{**r, "confusion": conf, "base": "minilm", "domain": "movies", "n_train": 8454,
                        "epochs": 1, "lr": 1e-3} for r in base])
    for label, changes in overrides.items():
        for k, v in changes.items():
            df.loc[df.label == label.replace("_", " ").replace("head only", "head_only"), k] = v
    return df


def test_no_constraints_prefers_the_cheaper_of_two_runs_within_noise():
    ev = recommend(rows())
    assert ev.label == "lora r=8" and ev.method == pk.LoRA(r=8, alpha=16)
    assert "Adapter is the most accurate at 82.7%" in ev.text()
    assert "0.33% trainable against 0.5% trainable" in ev.text()
    # full costs more on every count, but its accuracy is within the others' intervals (n = 1000):
    # noise alone never takes a run off the front
    assert set(ev.front.label) == {"lora r=8", "adapter", "head_only", "full"}
    assert "cannot tell at this precision" in ev.text()
    beaten = recommend(rows(full={"accuracy": 0.70}))  # now beaten beyond the interval as well
    assert set(beaten.front.label) == {"lora r=8", "adapter", "head_only"}


def test_tolerance_se_keeps_the_old_rule():
    ev = recommend(rows(), tolerance="se")
    assert ev.label == "lora r=8" and "within 1.2 points (one standard error" in ev.text()


def test_tolerance_zero_takes_the_most_accurate():
    assert recommend(rows(), tolerance=0).label == "adapter"


def test_prefer_another_cost_column():
    assert recommend(rows(), prefer="sec_per_step").label == "adapter"
    with pytest.raises(ValueError, match="not a cost column"):
        recommend(rows(), prefer="accuracy")


def test_a_tight_limit_excludes_and_the_reasons_cite_the_numbers():
    ev = recommend(rows(), max_sec_per_step=0.3)
    assert ev.label == "head_only"
    assert list(ev.table.loc[ev.table.label == "lora r=8", "violates"].item()) == ["max_sec_per_step"]
    assert "LoRA r=8 is more accurate (82.5%) but is excluded: 0.49 s/step against the limit 0.3 s/step" in ev.text()


def test_constraints_as_object_dict_or_keywords_agree():
    a = recommend(rows(), Constraints(max_adapter_bytes=400_000)).label
    b = recommend(rows(), {"max_adapter_bytes": 400_000}).label
    c = recommend(rows(), max_adapter_bytes=400_000).label
    assert a == b == c == "lora r=8"


def test_min_accuracy_and_trainable_fraction():
    assert recommend(rows(), min_accuracy=0.826, tolerance=0).label == "adapter"
    assert recommend(rows(), max_trainable_fraction=0.004).label == "lora r=8"


def test_nothing_feasible_says_which_single_limit_to_relax_and_by_how_much():
    ev = recommend(rows(), max_sec_per_step=0.2, min_accuracy=0.8)
    assert ev.chosen is None and ev.method is None
    relax = ev.relax.set_index("constraint")
    assert list(relax.index) == ["max_sec_per_step"]  # relaxing accuracy alone admits nothing
    assert relax.loc["max_sec_per_step", "needed"] == pytest.approx(0.47)
    assert relax.loc["max_sec_per_step", "admits"] == "adapter"
    assert "Relax max_sec_per_step from 0.2 s/step to 0.47 s/step (2.35x) to admit Adapter" in ev.text()


def test_nothing_feasible_with_two_ways_out_lists_both_smallest_first():
    ev = recommend(rows(), max_sec_per_step=0.45, min_accuracy=0.7)
    assert ev.relax["constraint"].tolist() == ["max_sec_per_step", "min_accuracy"]
    assert ev.relax["admits"].tolist() == ["adapter", "head_only"]
    assert "from 0.45 s/step to 0.47 s/step (+4%) to admit Adapter" in ev.text()
    assert "from 70.0% accuracy to 65.4% accuracy (-4.6 points) to admit Head only" in ev.text()


def test_nothing_feasible_and_no_single_change_enough_lists_the_joint_change():
    ev = recommend(rows(), max_sec_per_step=0.2, max_adapter_bytes=1_000, min_accuracy=0.8)
    assert ev.relax["together"].all()
    first = ev.relax[ev.relax.option == 1]
    assert set(first["constraint"]) == {"max_sec_per_step", "max_adapter_bytes"}
    assert first["admits"].nunique() == 1
    assert "no single limit is enough" in ev.text()


def test_no_single_change_enough_offers_each_closest_run_with_its_changes_in_its_units():
    """Every run breaks both limits: each is an option (a faster step against a lower accuracy), and the words give
    accuracy in points and step time as a factor, as the table's `says` column does."""
    df = rows()
    ev = recommend(df, max_sec_per_step=0.5 * df.sec_per_step.min(), min_accuracy=df.accuracy.max() + 0.01)
    assert ev.relax.option.nunique() == min(3, len(df)) and ev.relax.together.all()
    assert (ev.relax.groupby("option").constraint.apply(set) == {"max_sec_per_step", "min_accuracy"}).all()
    acc = ev.relax[ev.relax.constraint == "min_accuracy"]
    assert all(s.endswith(" points") for s in acc.says)
    assert all(s.endswith("x") for s in ev.relax[ev.relax.constraint == "max_sec_per_step"].says)
    text = ev.text()
    for label in ev.relax.admits.unique():
        assert f"To admit {readable(label)}, relax " in text  # the name people read; the table keeps the key


def test_an_unmeasured_value_cannot_meet_a_limit():
    df = rows(adapter={"peak_mem_mib": math.nan})
    ev = recommend(df, max_peak_mem_mib=5000)
    assert "max_peak_mem_mib" in ev.table.loc[ev.table.label == "adapter", "violates"].item()


def test_pareto_on_two_criteria():
    df = pd.DataFrame({"a": [1, 2, 3, 3], "c": [1, 2, 3, 4]})
    assert pareto(df, {"a": "max", "c": "min"}).index.tolist() == [0, 1, 2]


@pytest.mark.parametrize("limits,match", [
    (dict(max_trainable_fraction=5), "fraction in"),
    (dict(min_accuracy=80), r"0.8 means 80%"),
    (dict(max_sec_per_step=-1), ">= 0"),
    (dict(max_memory=10), r"unknown constraint.*max_memory.*max_peak_mem_mib"),
])
def test_bad_constraints_are_explained(limits, match):
    with pytest.raises(ValueError, match=match):
        recommend(rows(), **limits)


def test_mixed_set_ups_are_refused_with_how_to_filter():
    df = rows()
    df.loc[0, "n_train"] = 2000
    with pytest.raises(ValueError, match=r"mix 2 set-ups.*not comparable"):
        recommend(df)


def test_missing_columns_and_empty_results():
    with pytest.raises(ValueError, match=r"lack column.*peak_mem_mib"):
        recommend(rows().drop(columns="peak_mem_mib"), max_peak_mem_mib=1000)
    with pytest.raises(ValueError, match="non-empty DataFrame"):
        recommend(pd.DataFrame())


def test_repeated_labels_are_told_apart():
    df = pd.concat([rows(), rows().iloc[[1]]], ignore_index=True)
    labels = recommend(df).table.label.tolist()
    assert len(set(labels)) == len(labels)
