"""Mixed-adapter batches: one forward through the shared base, every row with its own adapter, and
every row's answer equal to that adapter served alone (atol 1e-5), whatever the row order."""

import threading

import numpy as np
import pandas as pd
import pytest
import torch

import peftkit as pk
from peftkit.serving.deployer import Deployer, MixedBatchError, UnknownAdapterError
from peftkit.serving.mixed import BASE, RowPlan
from conftest import perturb

TEXTS = [f"{w} number {i} " + "good bad " * (i % 7) + ("!" * (i % 3)) for i, w in
         enumerate(["a wonderful film", "dull", "", "not bad at all", "the plot? what plot", "meh"] * 6)]

METHODS = {  # both families, several shapes, and heads saved or not
    "lora_qv": pk.LoRA(r=4, alpha=8),
    "lora_wide": pk.LoRA(r=2, alpha=8, targets=("query", "key", "value", "dense")),  # incl. the pooler
    "lora_rs": pk.LoRA(r=8, alpha=8, rslora=True),
    "pfeiffer": pk.Adapter(size=8),
    "houlsby": pk.Adapter(size=4, placement="houlsby", activation="relu"),
    "deep": pk.Adapter(size=6, variant="deep", layernorm=True),
    "hybrid": pk.Hybrid(lora=pk.LoRA(r=2, alpha=4, targets=("query", "value", "output.dense")),
                        adapter=pk.Adapter(size=4)),  # LoRA and adapter on one Linear
}


def make_adapter(path, method, seed, head="auto"):
    model, _ = pk.load_base("tiny", seed=0)
    pk.apply(model, method, head=head)
    perturb(model, seed=seed, std=0.3)
    pk.save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    out = Deployer("tiny", device="cpu")
    for i, (name, method) in enumerate(METHODS.items()):
        out.register(name, make_adapter(d / name, method, seed=i + 1))
    out.register("headless", make_adapter(d / "headless", pk.LoRA(r=4, alpha=8), seed=11, head=None))
    return out


@pytest.fixture(scope="module")
def alone(dep):
    """Each adapter served alone, the ordinary way (one adapter per call), on every text."""
    out = {n: dep.predict(TEXTS, adapter=n) for n in dep.names()}
    model, tok = pk.load_base("tiny", seed=0)  # the base alone: its own head, no adapter
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model.eval()(**tok([t], return_tensors="pt")).logits, -1) for t in TEXTS])
    out[BASE] = pd.DataFrame({"label": probs.argmax(-1).numpy(), "probability": probs.max(-1).values.numpy()})
    return out


def check_rows(df, names, alone):
    assert df["adapter"].tolist() == list(names) and df["text"].tolist() == TEXTS[:len(names)]
    for i, n in enumerate(names):
        want = alone[n].iloc[i]
        assert df["label"].iloc[i] == want["label"], (i, n)
        assert abs(df["probability"].iloc[i] - want["probability"]) <= 1e-5, (i, n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_row_equals_its_adapter_served_alone_in_any_order(dep, alone, seed):
    rng = np.random.default_rng(seed)
    names = list(rng.choice(dep.names() + [BASE], size=len(TEXTS)))
    for batch_size in (5, 64):  # rows of one adapter split over batches, and all in one
        check_rows(dep.predict(TEXTS, adapters=names, batch_size=batch_size), names, alone)
    # the answers really differ between adapters, so a mix-up could not pass unseen
    assert len({round(float(alone[n]["probability"].iloc[0]), 4) for n in alone}) > len(alone) // 2


def test_lora_and_adapter_rows_share_one_forward_and_nothing_is_switched(dep, alone):
    names = ["lora_qv", "pfeiffer", "hybrid", BASE, "lora_wide", "deep"] * 2
    dep.predict(TEXTS[:2], adapter="lora_qv")
    switches, active = dep.switches, dep.active
    calls = []
    dep.predict(TEXTS[:1], adapters=[BASE])  # builds the mixed model
    hook = dep._mixed.model.bert.embeddings.register_forward_hook(lambda *a: calls.append(1))
    try:
        df = dep.predict(TEXTS[:12], adapters=names, batch_size=64)
    finally:
        hook.remove()
    assert len(calls) == 1  # one forward through the shared base for the twelve rows
    assert dep.switches == switches and dep.active == active  # the live adapter was left alone
    check_rows(df, names, alone)


def test_one_name_for_every_row_is_the_ordinary_path(dep, alone):
    df = dep.predict(TEXTS, adapters=["pfeiffer"] * len(TEXTS))
    pd.testing.assert_frame_equal(df, dep.predict(TEXTS, adapter="pfeiffer"))
    base = dep.predict(TEXTS, adapter=BASE)
    check_rows(base, [BASE] * len(TEXTS), alone)


def test_merged_mode_cannot_mix_and_says_what_to_do(dep, tmp_path):
    d = Deployer("tiny", device="cpu", merged=True)
    d.register("a", make_adapter(tmp_path / "a", METHODS["lora_qv"], seed=1))
    d.register("b", make_adapter(tmp_path / "b", METHODS["pfeiffer"], seed=2))
    with pytest.raises(MixedBatchError, match=r"set_merged\(False\).*once per adapter") as err:
        d.predict(TEXTS[:4], adapters=["a", "b", "a", "b"])
    assert isinstance(err.value, ValueError) and "merged" in str(err.value)
    with pytest.raises(MixedBatchError):
        d.predict(TEXTS[:2], adapter=BASE)
    assert len(d.predict(TEXTS[:4], adapters=["a"] * 4)) == 4  # one adapter: served, merged
    d.set_merged(False)
    assert d.predict(TEXTS[:4], adapters=["a", "b", "a", "b"])["adapter"].tolist() == ["a", "b", "a", "b"]


def test_bad_adapter_lists_are_refused_clearly(dep):
    with pytest.raises(ValueError, match="2 names for 3 texts"):
        dep.predict(TEXTS[:3], adapters=["lora_qv", "pfeiffer"])
    with pytest.raises(UnknownAdapterError, match=r"adapters\[1\].*'tweets'.*lora_qv.*__base__"):
        dep.predict(TEXTS[:2], adapters=["lora_qv", "tweets"])
    with pytest.raises(TypeError, match=r"adapters\[0\]"):
        dep.predict(TEXTS[:1], adapters=[3])
    with pytest.raises(TypeError, match="single string"):
        dep.predict(TEXTS[:1], adapters="lora_qv")
    with pytest.raises(ValueError, match="not both"):
        dep.predict(TEXTS[:1], adapter="lora_qv", adapters=["lora_qv"])
    empty = dep.predict([], adapters=[])
    assert empty.empty and "adapter" in empty


def test_the_mixed_model_follows_register_replace_and_unregister(tmp_path, alone):
    d = Deployer("tiny", device="cpu")
    d.register("x", make_adapter(tmp_path / "x", METHODS["lora_qv"], seed=1))
    d.register("y", make_adapter(tmp_path / "y", METHODS["pfeiffer"], seed=4))
    names = ["x", "y", BASE]
    first = d.predict(TEXTS[:3], adapters=names)
    d.register("x", make_adapter(tmp_path / "x2", METHODS["houlsby"], seed=5), replace=True)
    again = d.predict(TEXTS[:3], adapters=names)
    want = d.predict(TEXTS[:1], adapter="x")
    assert again["probability"].iloc[0] == pytest.approx(want["probability"].iloc[0], abs=1e-5)
    assert again["probability"].iloc[0] != pytest.approx(first["probability"].iloc[0], abs=1e-4)
    d.unregister("y")
    with pytest.raises(UnknownAdapterError, match="'y'"):
        d.predict(TEXTS[:3], adapters=names)
    d.predict(TEXTS[:2], adapters=["x", BASE])
    assert all("y" not in site.parts for site in d._mixed.sites.values())  # its tensors let go


def test_threads_mixing_and_not_mixing_each_get_their_own_answers(dep, alone):
    rng = np.random.default_rng(7)
    plans = [list(rng.choice(dep.names() + [BASE], size=12)) for _ in range(3)] + [["lora_rs"] * 12, ["houlsby"] * 12]
    errors = []

    def caller(names):
        try:
            for _ in range(4):
                check_rows(dep.predict(TEXTS[:12], adapters=names, batch_size=5), names, alone)
        except Exception as e:  # surfaced below
            errors.append(e)
    threads = [threading.Thread(target=caller, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_row_plan_slices_batch_rows_and_packed_tokens():
    plan = RowPlan()
    plan.set(["a", "a", "b", "c"], [3, 2, 4, 2])
    assert plan.groups(torch.Size([4, 5, 8])) == [("a", slice(0, 10)), ("b", slice(10, 15)), ("c", slice(15, 20))]
    assert plan.groups(torch.Size([4, 8])) == [("a", slice(0, 2)), ("b", slice(2, 3)), ("c", slice(3, 4))]
    assert plan.groups(torch.Size([11, 8])) == [("a", slice(0, 5)), ("b", slice(5, 9)), ("c", slice(9, 11))]
    with pytest.raises(RuntimeError, match="matches neither"):
        plan.groups(torch.Size([7, 8]))
    with pytest.raises(ValueError, match="next to each other"):
        plan.set(["a", "b", "a"], [2, 2, 2])
