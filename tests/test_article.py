"""The article's API (peftkit.article): its decision chain on all 54 combinations of its words, its
two printed examples, and every façade's happy path on the tiny model and its refusals; the
numeric demonstrations of its layers' defects (peftkit.studies.article_checks)."""

import json

import numpy as np
import optuna
import pytest
import torch

import peftkit as pk
from peftkit import data
from peftkit.article import (ArticleError, EnterpriseModelDeployer, ModelMonitor, ModelOptimizer,
                             choose_finetuning_method, compare_methods, enterprise_finetuning_strategy,
                             evaluate_model, objective, train_and_compare)
from peftkit.studies.article_checks import (adapter_init_demo, article_vs_peftkit, disagreements, init_scale_demo,
                                    lora_scale_demo, merge_demo, quantization_demo, trainable_base_demo)
from peftkit.compress import Int8Linear, sparsity_report
from peftkit.files.adapter_file import AdapterFileError
from peftkit.data.loaders import make_loaders
from peftkit.training.metrics import evaluate
from peftkit.studies.selection import AnswerError
from conftest import perturb

optuna.logging.set_verbosity(optuna.logging.WARNING)

# The article's chain (section 6.1, lines 502-509), read from its text and written out by hand:
# model_size, available_resources, task_complexity, deployment_constraints -> answer, and the test
# that decides (the first that holds; "otherwise" is its default).
TRUTH = """
small  limited simple  strict LoRA    strict-and-simple
small  limited simple  normal LoRA    otherwise
small  limited simple  loose  LoRA    otherwise
small  limited complex strict LoRA    otherwise
small  limited complex normal LoRA    otherwise
small  limited complex loose  LoRA    otherwise
small  normal  simple  strict LoRA    strict-and-simple
small  normal  simple  normal LoRA    otherwise
small  normal  simple  loose  LoRA    otherwise
small  normal  complex strict LoRA    otherwise
small  normal  complex normal LoRA    otherwise
small  normal  complex loose  LoRA    otherwise
small  good    simple  strict LoRA    strict-and-simple
small  good    simple  normal LoRA    otherwise
small  good    simple  loose  LoRA    otherwise
small  good    complex strict Adapter complex-and-good
small  good    complex normal Adapter complex-and-good
small  good    complex loose  Adapter complex-and-good
medium limited simple  strict LoRA    strict-and-simple
medium limited simple  normal LoRA    otherwise
medium limited simple  loose  LoRA    otherwise
medium limited complex strict LoRA    otherwise
medium limited complex normal LoRA    otherwise
medium limited complex loose  LoRA    otherwise
medium normal  simple  strict LoRA    strict-and-simple
medium normal  simple  normal LoRA    otherwise
medium normal  simple  loose  LoRA    otherwise
medium normal  complex strict LoRA    otherwise
medium normal  complex normal LoRA    otherwise
medium normal  complex loose  LoRA    otherwise
medium good    simple  strict LoRA    strict-and-simple
medium good    simple  normal LoRA    otherwise
medium good    simple  loose  LoRA    otherwise
medium good    complex strict Adapter complex-and-good
medium good    complex normal Adapter complex-and-good
medium good    complex loose  Adapter complex-and-good
large  limited simple  strict LoRA    large-and-limited
large  limited simple  normal LoRA    large-and-limited
large  limited simple  loose  LoRA    large-and-limited
large  limited complex strict LoRA    large-and-limited
large  limited complex normal LoRA    large-and-limited
large  limited complex loose  LoRA    large-and-limited
large  normal  simple  strict LoRA    strict-and-simple
large  normal  simple  normal LoRA    otherwise
large  normal  simple  loose  LoRA    otherwise
large  normal  complex strict LoRA    otherwise
large  normal  complex normal LoRA    otherwise
large  normal  complex loose  LoRA    otherwise
large  good    simple  strict LoRA    strict-and-simple
large  good    simple  normal LoRA    otherwise
large  good    simple  loose  LoRA    otherwise
large  good    complex strict Adapter complex-and-good
large  good    complex normal Adapter complex-and-good
large  good    complex loose  Adapter complex-and-good
"""
ROWS = [line.split() for line in TRUTH.strip().splitlines()]


def test_the_truth_table_covers_the_article_vocabulary_once():
    assert len(ROWS) == len({tuple(r[:4]) for r in ROWS}) == 3 * 3 * 2 * 3


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "-".join(r[:4]))
def test_choose_finetuning_method_is_the_article_chain(row):
    *inputs, answer, rule = row
    assert choose_finetuning_method(*inputs) == answer
    rec = pk.studies.selection.choose_method(pk.studies.selection.ARTICLE_RULES, **dict(zip(pk.studies.selection.ARTICLE_INPUTS, inputs)))
    assert rec.rule.name == rule


def test_the_article_examples_print_what_the_article_prints(capsys):
    assert enterprise_finetuning_strategy() is None
    assert capsys.readouterr().out == "策略1: LoRA\n策略2: Adapter\n"
    assert choose_finetuning_method("large", "limited", "simple", "strict") == "LoRA"
    assert choose_finetuning_method("medium", "good", "complex", "normal") == "Adapter"


def test_choose_finetuning_method_takes_peftkit_words_and_refuses_typos():
    assert choose_finetuning_method("small", "abundant", "high", "flexible") == "Adapter"
    assert choose_finetuning_method("small", "abundant", "medium", "flexible") == "LoRA"  # no article word: default
    with pytest.raises(AnswerError, match=r"task_complexity='simpel'.*did you mean 'simple'"):
        choose_finetuning_method("large", "limited", "simpel", "strict")
    with pytest.raises(AnswerError, match=r"'good' answers available_resources"):
        choose_finetuning_method("large", "limited", "simple", "good")


def test_the_grid_follows_the_truth_table_and_explains_every_disagreement():
    grid = article_vs_peftkit()
    truth = {tuple(r[:4]): r[4] for r in ROWS}
    assert {tuple(r[:4]): r.article for r in grid.itertuples(index=False)} == truth
    assert (grid.agree == (grid.article == grid.peftkit)).all()
    parts = disagreements(grid)
    assert parts.combinations.sum() == (~grid.agree).sum() > 0
    assert parts["peftkit's reason"].str.len().gt(0).all()
    assert grid.loc[~grid.agree, "peftkit's reason"].str.len().gt(0).all()


# --- the façades on the tiny model ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """Tokenizer, a test loader of 32 snippets (dict batches), and 48 training snippets."""
    _, tok = pk.load_base("tiny")
    s = data.split(data.load_corpus("movies"), seed=0)
    test = s["test"].sample(32, random_state=0)
    train = s["train"].sample(48, random_state=0)
    return tok, make_loaders(tok, {"test": test}, batch_size=8)["test"], train, s["val"].sample(16, random_state=0)


def adapted(method, seed=1):
    model, _ = pk.load_base("tiny")
    pk.apply(model, method)
    return perturb(model, seed=seed, std=0.3)  # "trained": a non-zero update


def test_evaluate_model_is_accuracy_and_weighted_f1_and_restores_the_mode(tiny):
    _, loader, _, _ = tiny
    model = adapted(pk.LoRA(r=4, alpha=8)).train()
    acc, f1 = evaluate_model(model, loader)  # no device, as the article's later calls
    ref = evaluate(model, loader)
    assert model.training
    assert acc == pytest.approx(ref["accuracy"]) and f1 == pytest.approx(ref["f1_weighted"])
    assert evaluate_model(model, loader, "cpu") == (acc, f1)


def test_evaluate_model_takes_the_articles_input_label_pairs(tiny):
    tok, _, train, _ = tiny
    model = adapted(pk.LoRA(r=4, alpha=8))
    ids = torch.randint(1000, 5000, (6, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    pairs = [(ids[:3], labels[:3]), (ids[3:], labels[3:])]
    dicts = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]
    assert evaluate_model(model, pairs) == pytest.approx(evaluate_model(model, dicts))


class PerToken(torch.nn.Module):
    """The article's toy models' output: one row of vocabulary logits per token."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 50)

    def forward(self, x):
        return self.emb(x)


def test_evaluate_model_refuses_per_token_outputs():
    pairs = [(torch.randint(0, 50, (4, 6)), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(ArticleError, match=r"one per token"):
        evaluate_model(PerToken(), pairs)


def test_compare_methods_prints_the_articles_lines(tiny, capsys):
    _, loader, _, _ = tiny
    lora, ad = adapted(pk.LoRA(r=4, alpha=8)), adapted(pk.Adapter(size=8), seed=2)
    df = compare_methods(lora, ad, loader)
    out = capsys.readouterr().out.splitlines()
    (la, lf), (aa, af) = evaluate_model(lora, loader), evaluate_model(ad, loader)
    assert out == [f"LoRA - Accuracy: {la:.4f}, F1 Score: {lf:.4f}", f"Adapter - Accuracy: {aa:.4f}, F1 Score: {af:.4f}"]
    assert df.method.tolist() == ["LoRA", "Adapter"] and df.accuracy.tolist() == [la, aa]


def test_compare_methods_refuses_what_the_article_left_undefined(tiny):
    _, loader, _, _ = tiny
    lora, ad = adapted(pk.LoRA(r=4, alpha=8)), adapted(pk.Adapter(size=8), seed=2)
    with pytest.raises(ArticleError, match=r"never defines.*experiments\.compare"):
        compare_methods()
    with pytest.raises(ArticleError, match="no LoRA layer"):
        compare_methods(ad, lora, loader)
    fresh, _ = pk.load_base("tiny")
    with pytest.raises(ArticleError, match="never trained"):
        compare_methods(pk.apply(fresh, pk.LoRA(r=4, alpha=8)), ad, loader)


def test_train_and_compare_trains_only_the_adapters_and_prints_the_times(tiny, capsys):
    tok, _, train, _ = tiny
    loader = make_loaders(tok, {"train": train}, batch_size=16)["train"]
    lora, ad = adapted(pk.LoRA(r=4, alpha=8)), adapted(pk.Adapter(size=8), seed=2)
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    df = train_and_compare(lora, ad, loader, device="cpu", epochs=1, lr=1e-3)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["LoRA Training Time", "Adapter Training Time"]
    assert out[0] == f"LoRA Training Time: {df.seconds[0]:.2f}s"
    assert df.steps.tolist() == [3, 3]
    assert all(torch.equal(p, frozen[n]) for n, p in lora.named_parameters() if n in frozen)
    with pytest.raises(ArticleError, match="never defines"):
        train_and_compare()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("article") / "lora"
    pk.save_adapter(adapted(pk.LoRA(r=4, alpha=8)), d)
    return d


def test_deployer_loads_predicts_and_saves_like_the_article(lora_dir, tmp_path):
    dep = EnterpriseModelDeployer(model_type="lora", config={"base": "tiny", "device": "cpu"})
    assert dep.model is None
    dep.load_model(lora_dir)
    out = dep.predict([[1, 2, 3, 4]])  # the article's example
    ref, _ = pk.load_base("tiny")
    pk.load_adapter(ref, lora_dir).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.numpy()
    assert isinstance(out, np.ndarray) and out.shape == (1, 2)
    np.testing.assert_allclose(out, want, atol=1e-5)
    texts = ["a wonderful film", "dull and far too long"]
    probs = dep.deployer.predict(texts, adapter="model").probability.to_numpy()
    np.testing.assert_allclose(torch.softmax(torch.tensor(dep.predict(texts)), -1).max(-1).values.numpy(), probs, atol=1e-5)
    saved = dep.save_model(tmp_path / "saved")
    again = EnterpriseModelDeployer("lora", {"base": "tiny", "device": "cpu"})
    again.load_model(saved)
    np.testing.assert_allclose(again.predict([[1, 2, 3, 4]]), out, atol=1e-6)


def test_deployer_refusals(lora_dir, tmp_path):
    with pytest.raises(ArticleError, match="toy model"):
        EnterpriseModelDeployer("lora", {"vocab_size": 10000, "embed_dim": 512, "hidden_dim": 256, "r": 8})
    with pytest.raises(ArticleError, match="choose 'lora' or 'adapter'"):
        EnterpriseModelDeployer("qlora", {"base": "tiny"})
    with pytest.raises(ArticleError, match="unknown config keys"):
        EnterpriseModelDeployer("lora", {"base": "tiny", "colour": "red"})
    dep = EnterpriseModelDeployer("lora", {"base": "tiny", "device": "cpu"})
    with pytest.raises(ArticleError, match="load_model"):
        dep.predict([[1, 2, 3]])
    with pytest.raises(AdapterFileError, match="pickle"):
        dep.load_model("model_weights.pth")  # the article's call
    with pytest.raises(ArticleError, match="model_type='lora'"):
        EnterpriseModelDeployer("adapter", {"base": "tiny", "device": "cpu"}).load_model(lora_dir)
    dep.load_model(lora_dir)
    with pytest.raises(ArticleError, match="token ids"):
        dep.predict([[1, 2, 10**7]])
    with pytest.raises(ArticleError, match="list of texts"):
        dep.predict("one text")
    with pytest.raises(AdapterFileError, match="pickle"):
        dep.save_model(tmp_path / "model_weights.pth")


def test_optimizer_merges_once_quantizes_int8_and_prunes(tiny):
    _, loader, _, _ = tiny
    batch = next(iter(loader))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = adapted(pk.LoRA(r=4, alpha=8)).eval()
    with torch.no_grad():
        before = model(**inputs).logits
        opt = ModelOptimizer(model)
        assert opt.merge_lora_weights() == 4 and opt.merge_lora_weights() == 4  # 2 layers x (query, value)
        assert torch.allclose(model(**inputs).logits, before, atol=1e-5)  # not counted twice
    pruned = ModelOptimizer(adapted(pk.LoRA(r=4, alpha=8))).prune_model(0.3)
    rep = sparsity_report(pruned)
    layers = rep[(rep.layer != "TOTAL") & (rep.layer != "classifier")]
    assert np.allclose(layers.sparsity, 0.3, atol=0.01) and not pk.core.surgery.lora_layers(pruned)
    q = ModelOptimizer(adapted(pk.LoRA(r=4, alpha=8)).eval()).quantize_model()
    assert any(isinstance(m, Int8Linear) for m in q.modules()) and not pk.core.surgery.lora_layers(q)
    with torch.no_grad():
        assert (q(**inputs).logits - before).abs().max() < 0.05


def test_optimizer_refusals():
    model = adapted(pk.LoRA(r=4, alpha=8))
    with pytest.raises(ArticleError, match=r"simulate_kbit\(model, 4\)"):
        ModelOptimizer(model).quantize_model(bits=4)
    plain, _ = pk.load_base("tiny")
    with pytest.raises(pk.MergeError, match="no LoRA layer"):
        ModelOptimizer(plain).merge_lora_weights()
    with pytest.raises(pk.MergeError, match="adapters"):
        ModelOptimizer(adapted(pk.Adapter(size=8))).merge_lora_weights()
    with pytest.raises(ValueError, match="amount"):
        ModelOptimizer(model).prune_model(1.5)


def test_objective_samples_the_articles_space_and_scores_the_validation_split(tiny):
    _, _, train, val = tiny
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: objective(t, train, val, base="tiny", epochs=1), n_trials=1)
    assert set(study.best_params) == {"r", "learning_rate", "batch_size"}
    assert 4 <= study.best_params["r"] <= 64 and study.best_params["batch_size"] in (16, 32, 64)
    assert 0 <= study.best_value <= 1 and "val_f1_weighted" in study.best_trial.user_attrs
    trial = optuna.trial.FixedTrial({"r": 4, "learning_rate": 1e-3, "batch_size": 16})
    assert objective(trial, train, val, base="tiny", epochs=1) == objective(trial, train, val, base="tiny", epochs=1)


def test_objective_refuses_data_it_cannot_read(tiny):
    _, loader, train, _ = tiny
    trial = optuna.trial.FixedTrial({"r": 4, "learning_rate": 1e-3, "batch_size": 16})
    with pytest.raises(ArticleError, match="DataFrame with text and label"):
        objective(trial, train, loader, base="tiny")


def test_monitor_records_warns_once_and_exports(tiny, tmp_path, capsys):
    _, loader, _, _ = tiny
    model = adapted(pk.LoRA(r=4, alpha=8))
    mon = ModelMonitor()
    assert mon.anomaly_detector is None
    acc, f1 = evaluate_model(model, loader)
    alerts = mon.monitor_performance(model, loader)
    rec = mon.performance_history[0]
    assert set(rec) == {"timestamp", "accuracy", "f1_score", "model_type"}
    assert (rec["accuracy"], rec["f1_score"], rec["model_type"]) == (acc, f1, "BertForSequenceClassification")
    assert isinstance(mon.anomaly_detector, pk.Monitor) and mon.anomaly_detector.seen == 32
    assert acc < 0.8  # a random tiny model: the article's floor is crossed at the first call
    assert [a["statistic"] for a in alerts] == ["accuracy"]
    assert capsys.readouterr().out.startswith("警告:模型性能显著下降: rolling accuracy")
    mon.monitor_performance(model, loader)
    assert capsys.readouterr().out == ""  # still below: warned once, not at every call
    path = mon.export_metrics(tmp_path / "model_metrics.json")
    assert json.loads(path.read_text()) == mon.performance_history


def test_monitor_stays_quiet_above_the_floor_and_refuses_tiny_test_sets(tiny, capsys):
    _, loader, _, _ = tiny
    model = adapted(pk.LoRA(r=4, alpha=8))
    mon = ModelMonitor(min_accuracy=0.0, drop_tolerance=1.0)
    assert mon.monitor_performance(model, loader) == [] and capsys.readouterr().out == ""
    small = [(torch.randint(1000, 5000, (4, 6)), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(ArticleError, match="at least 10"):
        ModelMonitor().monitor_performance(model, small)


# --- the layers' defects, measured ------------------------------------------------------------

def test_without_a_scale_the_update_grows_with_the_rank():
    df = lora_scale_demo().pivot(index="r", columns="scale", values="vs r=4")
    assert df["none (the article)"].is_monotonic_increasing and df["none (the article)"].iloc[-1] > 3
    assert df["alpha/sqrt(r) (rsLoRA)"].between(0.8, 1.25).all()
    assert df["alpha/r (peftkit)"].is_monotonic_decreasing


def test_a_trainable_base_moves_and_a_frozen_one_does_not():
    df = trainable_base_demo().set_index("setting")
    ours, theirs = df.loc["peftkit: base frozen"], df.loc["the article: every parameter trains"]
    assert ours["base tensors changed"] == 0 and ours["max |encoder output - base's| without LoRA"] == 0
    assert theirs["base tensors changed"] > 0 and theirs["max |encoder output - base's| without LoRA"] > 1e-3
    assert ours.trainable < 0.01 * theirs.trainable


def test_a_merge_that_leaves_the_lora_path_on_counts_the_update_twice():
    df = merge_demo().set_index("setting")
    effect = df.loc["no LoRA (the base)", "max |output - unmerged|"]
    article = df.loc["the article: weight merged, LoRA path still on"]
    assert article["max |output - update doubled|"] < 1e-5 < 1e-2 * effect <= article["max |output - unmerged|"]
    for row in ("peftkit merge()", "peftkit merge() called twice"):
        assert df.loc[row, "max |output - unmerged|"] < 1e-5


def test_the_articles_adapters_are_not_the_identity_at_initialisation():
    df = adapter_init_demo().set_index("setting").iloc[:, 0]
    assert df["peftkit: up = 0"] == 0 and df["peftkit: LayerNorm inside the branch"] == 0
    assert df["the article: up drawn Xavier-uniform"] > 1e-3 and df["the article: LayerNorm after the residual"] > 1e-3


def test_fake_per_tensor_quantization_saves_nothing_and_zeroes_small_weights():
    df = quantization_demo().set_index("setting")
    article, int8 = df.iloc[0], df.iloc[2]
    assert article["vs float32"] == 1 and int8["vs float32"] < 0.35
    assert article["outlier matrix: weights rounded to 0"] > 5 * int8["outlier matrix: weights rounded to 0"]
    assert article["outlier matrix: relative error"] > 5 * int8["outlier matrix: relative error"]


def test_a_standard_normal_base_blows_up_with_the_width():
    df = init_scale_demo()
    ratio = df["output std, weight ~ N(0, 1) (the article)"] / np.sqrt(df.in_features)
    assert ratio.between(0.9, 1.1).all() and df["output std, nn.Linear's init"].lt(1).all()


def test_the_disagreement_text_has_one_line_per_pair_of_rules():
    from peftkit.studies.article_checks import disagreement_text
    grid = article_vs_peftkit()
    lines = disagreement_text(grid).splitlines()
    assert len(lines) == len(disagreements(grid)) and all(line.startswith("- ") and "because" in line for line in lines)
    assert disagreement_text(grid[grid.agree]).startswith("- none")
