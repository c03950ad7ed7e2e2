"""The forgetting study on the tiny model: its invariants, the intervals' signs and the spectra."""

import pytest
import torch

import peftkit as pk
from peftkit.studies.forgetting import (forgetting_study, intruder_dimensions, learning_forgetting,
                                        method_difference, spectra_frame)


def test_intruder_dimensions_by_hand():
    n = 20
    w0 = torch.diag(torch.arange(1.0, n + 1))  # singular vectors: the basis vectors
    assert intruder_dimensions(w0, w0, k=5) == 0
    assert intruder_dimensions(w0, w0 + 0.01 * torch.randn(n, n, generator=torch.Generator().manual_seed(0)), k=5) == 0
    u = torch.ones(n) / n ** 0.5  # cosine 1/sqrt(20) = 0.22 with every basis vector
    v = torch.zeros(n)
    v[0] = 1.0
    assert intruder_dimensions(w0, w0 + 100 * torch.outer(u, v), k=5) == 1  # a new top direction


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    cache = tmp_path_factory.mktemp("f") / "forgetting.jsonl"
    kw = dict(methods=(pk.LoRA(r=2, alpha=4), pk.HeadOnly(), pk.FullFineTune()), seeds=(0, 1), n_train=32,
              epochs=2, n_eval=16, base="tiny", cache=cache, progress=False)
    return forgetting_study(**kw), kw


def test_every_method_of_a_seed_starts_from_the_same_model(study):
    df, _ = study
    assert len(df) == 3 * 2 * 3 * 4  # methods x seeds x (epochs + 1) x domains
    start = df[df.epoch == 0]
    for (_, _), g in start.groupby(["seed", "domain"]):
        assert g.correct.nunique() == 1  # epoch 0: the source-trained head, identical for every method


def test_the_shared_scores_before_are_what_each_method_scores_at_init():
    """The study scores the model before once and gives every method those epoch-0 scores; that is sound
    because each method starts as the identity on it, which this checks item by item."""
    import copy

    from peftkit.studies.forgetting import _scores, _test_loaders, before_scores, source_model
    model, tok = source_model("movies", seed=0, n_train=32, base="tiny", batch_size=16)
    shared = before_scores(model, tok, n_eval=16)
    tests = _test_loaders(tok, 16, 0, 128)
    for method in (pk.LoRA(r=2, alpha=4), pk.Adapter(), pk.HeadOnly(), pk.FullFineTune()):
        applied = pk.apply(copy.deepcopy(model), method).eval()
        assert [s["correct"] for s in _scores(applied, tests, 0)] == [s["correct"] for s in shared], method.describe()


def test_the_cache_returns_the_same_rows(study):
    df, kw = study
    again = forgetting_study(**kw)
    assert again.drop(columns=[]).equals(df)


def test_gain_and_forgetting_are_paired_differences_against_epoch_zero(study):
    df, _ = study
    lf = learning_forgetting(df)
    assert set(lf.method) == {"lora", "head_only", "full"} and set(lf.epoch) == {1, 2}
    row = lf[(lf.method == "full") & (lf.epoch == 2)].iloc[0]
    g = df[(df.method == "full")]
    acc = lambda e, role: g[(g.epoch == e) & (g.role == role)].groupby("seed").accuracy.mean().mean()
    assert row.gain == pytest.approx(acc(2, "target") - acc(0, "target"))
    assert row.forgetting == pytest.approx(acc(2, "other") - acc(0, "other"))  # the change: negative is forgotten
    assert (lf.gain_lo <= lf.gain).all() and (lf.gain <= lf.gain_hi).all()
    assert (lf.forgetting_lo <= lf.forgetting).all() and (lf.forgetting <= lf.forgetting_hi).all()


def test_a_loss_on_the_other_domains_reads_as_forgotten(study):
    """The sign every sentence and the figure rely on: accuracy lost on the other domains is a
    negative `forgetting`, worded "forgotten", never "a gain"."""
    df, _ = study
    worse = df.copy()
    other_after = (worse.role == "other") & (worse.epoch > 0) & (worse.method == "full")
    worse.loc[other_after, "correct"] = worse.loc[other_after, "correct"].map(lambda c: "0" * len(c))
    worse.loc[other_after, "accuracy"] = 0.0
    row = learning_forgetting(worse).query("method == 'full' and epoch == 2").iloc[0]
    assert row.forgetting < 0 and row.forgetting_direction == "lower"
    from peftkit.notebook import multi_domain as viz
    from peftkit.style import readable
    said = [s for s in viz.forgetting_sentences(learning_forgetting(worse)) if f"**{readable(row.label)}**" in s]
    assert len(said) == 1 and "a loss: forgotten" in said[0], said


def test_method_difference_pairs_two_methods_by_seed_and_item(study):
    df, _ = study
    d = method_difference(df, "lora", "full")
    assert list(d.epoch) == [1, 2] and (d.n_seeds == 2).all()
    lf = learning_forgetting(df).set_index(["method", "epoch"])
    for r in d.itertuples():  # same model before, so the difference of accuracies is the difference of changes
        assert r.difference == pytest.approx(lf.loc[("lora", r.epoch)].forgetting - lf.loc[("full", r.epoch)].forgetting)
        assert r.lo <= r.difference <= r.hi
    with pytest.raises(ValueError, match="not in the study"):
        method_difference(df, "lora", "dora")
    with pytest.raises(ValueError, match="role="):
        method_difference(df, "lora", "full", role="source")


def test_spectra_lora_rank_is_at_most_r_and_full_moves_more(study):
    df, _ = study
    sp = spectra_frame(df.attrs["spectra"])
    assert set(sp.method) == {"lora", "full"}
    assert sp[sp.method == "lora"].rank_1pct.max() <= 2
    assert sp[sp.method == "full"].rank_1pct.min() > 2  # W_before is a copy: the full fine-tune trains W in place
    assert (sp.intruders >= 0).all()


def test_refusals():
    with pytest.raises(ValueError, match="forgetting needs a new domain"):
        forgetting_study(source="movies", target="movies")
    with pytest.raises(ValueError, match="unknown target domain"):
        forgetting_study(target="reddit")


def test_figures_draw_one_curve_per_method_in_its_colour(study):
    from peftkit.notebook import multi_domain as viz
    from peftkit.style import method_colors
    df, _ = study
    lf = learning_forgetting(df)
    fig = viz.forgetting_figure(lf)
    assert [t.line.color for t in fig.data] == [method_colors()[m] for m in dict.fromkeys(lf.method)]
    assert all(len(t.x) == 3 for t in fig.data)  # before, epoch 1, epoch 2
    assert len(viz.forgetting_sentences(lf)) == 3
    table = viz.spectrum_table(spectra_frame(df.attrs["spectra"]))
    assert table.loc["LoRA", "effective_rank"] <= 2  # rows by the name people read


def _saved(tmp_path, method):
    model, _ = pk.load_base("tiny", num_labels=2, seed=0)
    pk.apply(model, method)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return pk.save_adapter(model, tmp_path / method.name)


def test_a_source_adapter_is_the_model_before_and_part_of_the_key(tmp_path, study):
    df, kw = study
    path = _saved(tmp_path, pk.LoRA(r=2, alpha=4))
    kw = {**kw, "methods": kw["methods"][:2], "seeds": (0,), "cache": tmp_path / "f.jsonl"}
    from_adapter = forgetting_study(**kw, source_adapter=path)
    start = from_adapter[from_adapter.epoch == 0]
    for _, g in start.groupby("domain"):
        assert g.correct.nunique() == 1  # every method starts from the same merged model
    own = df[(df.epoch == 0) & (df.seed == 0) & (df.method == "lora")].correct.tolist()
    assert start[start.method == "lora"].correct.tolist() != own  # not the trained-on-the-source model
    assert forgetting_study(**kw, source_adapter=path).equals(from_adapter)  # cached under the adapter's hash


def test_a_bottleneck_source_adapter_is_refused_before_any_training(tmp_path):
    path = _saved(tmp_path, pk.Adapter(size=4))
    with pytest.raises(ValueError, match="give a LoRA adapter"):
        forgetting_study(base="tiny", source_adapter=path, cache=tmp_path / "f.jsonl", progress=False)
    assert not (tmp_path / "f.jsonl").exists()
