"""Federated aggregation (peftkit.studies.federated): exactness of FFA-LoRA and FLoRA, FedIT's
measured error, FedAvg, and every refusal. Tiny models only; the simulator runs on the tiny BERT."""

import math

import pandas as pd

import pytest
import torch

import peftkit as pk
from peftkit.studies import federated as F

LORA = pk.LoRA(r=4, alpha=8, targets=("fc1", "fc2"))


def client(seed: int, method=LORA, freeze_a_seed=None, base_seed=0):
    """A tiny MLP client with the method applied and its trainable tensors set at random (as if
    trained): a seeded, distinct update per client. freeze_a_seed: FFA's shared A."""
    model, _ = pk.load_base("mlp", seed=base_seed)
    if freeze_a_seed is not None:
        torch.manual_seed(freeze_a_seed)
    pk.apply(model, method)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not (freeze_a_seed is not None and n.endswith("lora_A")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def exact_average(states, weights, scale_of):
    """sum_k w_k s_k B_k A_k per layer, written out here independently of the module."""
    out = {}
    for name in states[0]:
        if name.endswith("lora_A"):
            b = name[:-1] + "B"
            out[name] = sum(w * scale_of(s[name].shape[0]) * (s[b].double() @ s[name].double())
                            for w, s in zip(weights, states))
    return out


@pytest.mark.parametrize("weights", [None, [3, 1, 2]])
def test_ffa_reproduces_the_exact_average_update(weights):
    models = [client(k, freeze_a_seed=7) for k in range(3)]
    states = [F.client_state(m) for m in models]
    server = F.aggregate(states, "ffa", weights=weights)
    w = F.check_weights(weights, 3)
    want = exact_average([s.tensors for s in states], w, lambda r: LORA.alpha / r)
    got = F.delta_weights(server, LORA)
    assert set(got) == set(want) and len(got) == 2
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0)
    assert F.aggregation_error(states, server, "ffa", weights) < 1e-6
    # the head is averaged under every strategy
    head = "classifier.weight"
    assert torch.allclose(server[head].double(), sum(wk * s.tensors[head].double() for wk, s in zip(w, states)), atol=1e-6)


def test_flora_reproduces_the_exact_average_update_with_different_ranks():
    ranks = (2, 4, 8)
    models = [client(k, pk.LoRA(r=r, alpha=8, targets=("fc1", "fc2"))) for k, r in enumerate(ranks)]
    states = [F.client_state(m) for m in models]
    weights = [1, 2, 5]
    server = F.aggregate(states, "flora", weights=weights)
    spec = F.flora_method(LORA, server)
    assert spec.r == sum(ranks) and spec.alpha / spec.r == 1.0
    w = F.check_weights(weights, 3)
    want = exact_average([s.tensors for s in states], w, lambda r: 8 / r)
    got = F.delta_weights(server, scale=1.0)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0)
    assert F.aggregation_error(states, server, "flora", weights) < 1e-6

    # the stacked state is an ordinary adapter: a fresh base with flora_method loads it, and its
    # merged update is the average of the clients'
    fresh, _ = pk.load_base("mlp", seed=0)
    from peftkit.files.adapter_file import apply_and_fill
    apply_and_fill(fresh, spec, "classifier", server, "flora server")
    layer = fresh.fc1
    assert torch.allclose(layer.delta_weight().double(), want["fc1.lora_A"], atol=1e-6)


def test_fedit_error_equals_the_measured_cross_term_error():
    models = [client(k) for k in range(4)]  # A differs per client: FedIT is inexact
    states = [F.client_state(m).tensors for m in models]
    server = F.aggregate(states, "fedit", method=LORA)
    s = LORA.alpha / LORA.r
    measured = 0.0
    for name in ("fc1.lora_A", "fc2.lora_A"):
        b = name[:-1] + "B"
        avg_ba = sum(s * st[b].double() @ st[name].double() for st in states) / 4
        avg_b = sum(st[b].double() for st in states) / 4
        avg_a = sum(st[name].double() for st in states) / 4
        assert torch.allclose(server[name].double(), avg_a, atol=1e-7)
        measured += float((avg_ba - s * avg_b @ avg_a).pow(2).sum())
    measured = math.sqrt(measured)
    err = F.aggregation_error(states, server, "fedit", method=LORA)
    assert measured > 1e-2  # really inexact here, so the equality below can fail
    assert err == pytest.approx(measured, rel=1e-6)


def test_fedavg_of_a_full_fine_tune_is_the_weighted_mean_of_every_tensor():
    models = [client(k, pk.FullFineTune()) for k in range(3)]
    states = [F.client_state(m) for m in models]
    server = F.aggregate(states, "fedavg", weights=[1, 1, 2])
    assert set(server) == set(states[0].tensors) and len(server) > 4
    for k, v in server.items():
        want = (states[0].tensors[k].double() + states[1].tensors[k].double() + 2 * states[2].tensors[k].double()) / 4
        assert torch.allclose(v.double(), want, atol=1e-6)
    assert F.aggregation_error(states, server, "fedavg") == 0.0


def test_ffa_sends_half_the_factor_bytes():
    state = F.client_state(client(0, freeze_a_seed=1)).tensors
    full, ffa = F.payload_bytes(state, "fedit"), F.payload_bytes(state, "ffa")
    a_bytes = sum(t.numel() * 4 for n, t in state.items() if n.endswith("lora_A"))
    assert full - ffa == a_bytes > 0


# --- refusals: each names what is wrong, and nothing is combined -----------------------------

def tiny_client(base_seed: int):
    model, _ = pk.load_base("tiny", seed=base_seed)
    torch.manual_seed(3)  # the shared A
    return pk.apply(model, pk.LoRA(r=2, alpha=4))


def test_refuses_a_client_whose_base_fingerprint_differs():
    # two tiny BERTs of one architecture whose embeddings and norms differ (the MLP has only
    # Linear layers, whose values a fingerprint leaves out: LoRA may have been merged into them)
    good, other = F.client_state(tiny_client(0)), F.client_state(tiny_client(5))
    with pytest.raises(F.FederatedError, match="client 1's base fingerprint differs"):
        F.aggregate([good, other], "ffa")
    server, _ = pk.load_base("tiny", seed=5)
    with pytest.raises(F.FederatedError, match="client 0's base fingerprint differs from the server's"):
        F.aggregate([good], "fedit", base=server)
    mlp, _ = pk.load_base("mlp", seed=0)
    with pytest.raises(F.FederatedError, match="BertForSequenceClassification.*against MLP"):
        F.aggregate([good], "fedit", base=mlp)
    same, _ = pk.load_base("tiny", seed=0)
    assert set(F.aggregate([good, F.client_state(tiny_client(0))], "ffa", base=same)) == set(good.tensors)


def test_refuses_mismatched_methods_targets_and_shapes():
    a = F.client_state(client(0))
    b = F.client_state(client(1, pk.LoRA(r=4, alpha=16, targets=("fc1", "fc2"))))
    with pytest.raises(F.FederatedError, match="client 1 trained"):
        F.aggregate([a, b], "fedit")
    c = F.client_state(client(1, pk.LoRA(r=4, alpha=8, targets=("fc1",))))
    with pytest.raises(F.FederatedError, match="tensors differ from client 0's"):
        F.aggregate([a.tensors, c.tensors], "fedit", method=LORA)
    d = F.client_state(client(1, pk.LoRA(r=2, alpha=8, targets=("fc1", "fc2"))))
    with pytest.raises(F.FederatedError, match="Only FLoRA stacks"):
        F.aggregate([a.tensors, d.tensors], "fedit", method=LORA)
    F.aggregate([a, d], "flora")  # FLoRA takes different ranks


@pytest.mark.parametrize("weights, message", [
    ([1.0], "1 entries for 2 clients"), ([1, -1], "non-negative"), ([0, 0], "not all zero"),
    ([1, float("nan")], "finite"), ("ab", "numbers"),
])
def test_refuses_bad_weights(weights, message):
    states = [F.client_state(client(k)).tensors for k in range(2)]
    with pytest.raises(F.FederatedError, match=message):
        F.aggregate(states, "fedit", weights=weights, method=LORA)


def test_refuses_the_rest_clearly():
    states = [F.client_state(client(k)) for k in range(2)]
    with pytest.raises(F.FederatedError, match="unknown strategy 'fedsgd'"):
        F.aggregate(states, "fedsgd")
    with pytest.raises(F.FederatedError, match="no client states"):
        F.aggregate([], "fedit")
    with pytest.raises(F.FederatedError, match="one frozen A on every client"):
        F.aggregate(states, "ffa")  # A trained (differs): not FFA-LoRA
    with pytest.raises(F.FederatedError, match="need the clients' LoRA spec"):
        F.aggregate([s.tensors for s in states], "flora")  # the scale alpha/r folds into B
    full = [F.client_state(client(k, pk.FullFineTune())) for k in range(2)]
    with pytest.raises(F.FederatedError, match="use strategy='fedavg'"):
        F.aggregate(full, "flora")
    bad = dict(states[1].tensors)
    bad["fc1.lora_B"] = torch.full_like(bad["fc1.lora_B"], float("nan"))
    with pytest.raises(F.FederatedError, match="client 1: fc1.lora_B holds NaN"):
        F.aggregate([states[0].tensors, bad], "fedit", method=LORA)
    with pytest.raises(F.FederatedError, match="list with one state per client"):
        F.aggregate(states[0].tensors, "fedit")


# --- the in-process simulator (tiny BERT, a few steps) --------------------------------------

from peftkit.studies.federated_sim import Federation, per_round, round_plan, simulate_federated  # noqa: E402

SIM = dict(rounds=2, local_steps=2, clients=("movies", "nyt", "tweets"), base="tiny", n_train=24, n_eval=16,
           progress=False)


@pytest.fixture(scope="module")
def runs():
    return {s: simulate_federated(s, **SIM) for s in ("fedit", "ffa", "flora")}


def test_simulator_rows_bytes_and_errors(runs):
    for s, df in runs.items():
        assert len(df) == (SIM["rounds"] + 1) * 3 and set(df["round"]) == {0, 1, 2}
        assert df.loc[df["round"] == 0, "bytes_up"].sum() == 0 and df["accuracy"].between(0, 1).all()
        assert df.loc[df["round"] > 0, "trained"].all()
        trained = df[df["round"] > 0]
        assert (trained["bytes_up"] > 0).all() and trained["train_loss"].notna().all()
    err = {s: df.loc[df["round"] > 0, "aggregation_error"] for s, df in runs.items()}
    assert (err["ffa"] < 1e-6).all() and (err["flora"] < 1e-6).all()
    assert (err["fedit"] > 1e-4).all()  # inexact: the cross terms of independently trained A and B
    up = {s: df.loc[df["round"] == 1, "bytes_up"].iloc[0] for s, df in runs.items()}
    assert up["ffa"] < up["fedit"] == up["flora"]
    summary = per_round(pd.concat(runs.values()))
    assert list(summary.columns[:2]) == ["strategy", "round"] and (summary.groupby("strategy")["cumulative_bytes"]
                                                                     .apply(lambda c: c.is_monotonic_increasing).all())


def test_simulator_is_reproducible_and_ffa_keeps_its_shared_a(runs):
    again = simulate_federated("ffa", **SIM)
    a, b = runs["ffa"].attrs["federation"].state, again.attrs["federation"].state
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = Federation("ffa", pk.LoRA(r=8, alpha=16), base="tiny").state
    assert all(torch.equal(a[k], first[k]) for k in a if k.endswith("lora_A"))  # A never trained
    assert any(not torch.equal(a[k], first[k]) for k in a if k.endswith("lora_B"))


def test_sampling_and_dropout_are_seeded():
    clients = ("movies", "amazon", "nyt", "tweets")
    plans = [round_plan(t, clients, 0.5, 0.3, seed=1) for t in range(1, 30)]
    assert plans == [round_plan(t, clients, 0.5, 0.3, seed=1) for t in range(1, 30)]
    assert all(len(s) == 2 and set(d) <= set(s) for s, d in plans)
    assert any(d for _, d in plans) and any(not d for _, d in plans)
    assert plans != [round_plan(t, clients, 0.5, 0.3, seed=2) for t in range(1, 30)]
    df = simulate_federated("fedit", **{**SIM, "rounds": 1, "sample": 2, "dropout": 0.5, "seed": 3})
    r1 = df[df["round"] == 1]
    sampled, dropped = round_plan(1, SIM["clients"], 2, 0.5, 3)
    assert list(r1.loc[r1.sampled, "client"]) == sampled and list(r1.loc[r1.dropped, "client"]) == dropped
    assert set(r1.loc[r1.trained, "client"]) == set(sampled) - set(dropped)


@pytest.mark.parametrize("kwargs, message", [
    ({"rounds": 0}, "rounds must be"), ({"local_steps": 1.5}, "local_steps must be"),
    ({"clients": ("movies", "imdb")}, "distinct domains"), ({"sample": 0.0}, "sample must be"),
    ({"sample": 5}, "sample must be"), ({"dropout": 1.0}, "dropout must be"),
    ({"method": pk.FullFineTune()}, "needs a LoRA spec"),
])
def test_simulator_refuses_bad_settings(kwargs, message):
    with pytest.raises(F.FederatedError, match=message):
        simulate_federated("ffa", **{**SIM, **kwargs})
    with pytest.raises(F.FederatedError, match="unknown strategy"):
        simulate_federated("scaffold", **SIM)


def test_figures_draw_each_strategy_in_its_colour(runs):
    from peftkit.notebook.plots_federated import aggregation_error_figure, federated_figure, strategy_colors
    df = pd.concat(runs.values())
    fig = federated_figure(df)
    colors = strategy_colors()
    assert len(set(colors.values())) == len(colors) == 4
    drawn = {t.legendgroup: t.line.color for t in fig.data}
    assert drawn == {s: colors[s] for s in runs}
    assert fig.layout.xaxis2.type == "log"
    assert len(aggregation_error_figure(df).data) == 3
    with pytest.raises(ValueError, match="simulate_federated's rows"):
        federated_figure(pd.DataFrame({"x": [1]}))


def test_simulated_flora_stacks_clients_of_different_ranks():
    df = simulate_federated("flora", **{**SIM, "rounds": 1, "ranks": {"movies": 2, "tweets": 4}})
    fed = df.attrs["federation"]
    stacked = fed.merged[0]
    a = next(k for k in stacked if k.endswith("lora_A"))
    assert stacked[a].shape[0] == 2 + 8 + 4  # movies 2, nyt the method's 8, tweets 4
    assert (df.loc[df["round"] == 1, "aggregation_error"] < 1e-6).all()
    with pytest.raises(F.FederatedError, match="only FLoRA"):
        simulate_federated("fedit", **{**SIM, "ranks": {"movies": 2}})
    with pytest.raises(F.FederatedError, match="not in this federation"):
        simulate_federated("flora", **{**SIM, "ranks": {"amazon": 2}})


def test_a_cached_simulation_returns_the_same_rows_without_training(tmp_path, monkeypatch):
    from peftkit.studies import federated_sim
    cache = tmp_path / "federated.jsonl"
    first = simulate_federated("fedit", **SIM, cache=cache)
    assert first.attrs["cached"] is False and "federation" in first.attrs

    def no_training(*a, **k):
        raise AssertionError("a cached simulation must not build a federation")
    monkeypatch.setattr(federated_sim, "Federation", no_training)
    again = simulate_federated("fedit", **SIM, cache=cache)
    pd.testing.assert_frame_equal(again, first)
    assert again.attrs["cached"] is True and again.attrs["rounds"] == SIM["rounds"]
    with pytest.raises(AssertionError, match="must not build"):  # another setting is another key
        simulate_federated("fedit", **{**SIM, "local_steps": 3}, cache=cache)


def test_constant_answer_accuracy_is_the_better_labels_share_of_the_scored_items():
    from peftkit.bases.models import load_tokenizer
    from peftkit.studies.federated_sim import client_loaders, constant_answer_accuracy
    clients, tok = SIM["clients"], load_tokenizer()
    shares = []
    for c in clients:  # the labels of the very items the simulator scores
        labels = torch.cat([b["labels"] for b in client_loaders(tok, c, SIM["n_train"], SIM["n_eval"], 0, 8, 128)["test"]])
        assert len(labels) == SIM["n_eval"]
        shares.append(labels.float().mean().item())
    pos = sum(shares) / len(shares)
    got = constant_answer_accuracy(clients, SIM["n_eval"], seed=0)
    assert got == pytest.approx(max(pos, 1 - pos)) and 0.5 <= got <= 1
    with pytest.raises(F.FederatedError, match="distinct domains"):
        constant_answer_accuracy(("movies", "reddit"))
