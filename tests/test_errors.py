"""Every mistake a user can make gets a clear error, and the model is left exactly as it was."""

import pytest
import torch

import peftkit as pk
from conftest import fresh
from test_io import assert_untouched, snapshot


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "positive integer"), (dict(r=-2), "positive integer"), (dict(r=2.5), "positive integer"),
    (dict(alpha=0), "positive number"), (dict(alpha=-1), "positive number"),
    (dict(dropout=1.0), r"\[0, 1\)"), (dict(dropout=-0.1), r"\[0, 1\)"),
])
def test_bad_lora_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pk.LoRA(**kwargs)
    with pytest.raises(ValueError, match=match):
        pk.LoRALinear(torch.nn.Linear(4, 4), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(size=0), "positive integer"), (dict(reduction=0), "positive integer"),
    (dict(activation="tanh"), "gelu"), (dict(variant="huge"), "deep"),
    (dict(placement="everywhere"), "houlsby"), (dict(dropout=2), r"\[0, 1\)"),
])
def test_bad_adapter_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pk.Adapter(**kwargs)


def test_unknown_target_names_the_closest_and_what_exists():
    model = fresh("tiny")
    snap = snapshot(model)
    with pytest.raises(pk.TargetError) as e:
        pk.apply(model, pk.LoRA(targets=("query", "vlaue")))
    msg = str(e.value)
    assert "'vlaue'" in msg and "did you mean 'value'" in msg.lower() and "Linear layers in this model" in msg
    assert "key" in msg and "dense" in msg
    assert_untouched(model, snap)


def test_target_that_is_not_linear():
    model = fresh("tiny")
    snap = snapshot(model)
    with pytest.raises(pk.TargetError, match="LayerNorm; LoRA wraps Linear"):
        pk.apply(model, pk.LoRA(targets=("LayerNorm",)))
    with pytest.raises(pk.TargetError, match="Linear layers inside it"):
        pk.apply(model, pk.LoRA(targets=("attention",)))
    assert_untouched(model, snap)


def test_hybrid_fails_whole_when_one_half_is_wrong():
    model = fresh("tiny")
    snap = snapshot(model)
    with pytest.raises(pk.TargetError):
        pk.apply(model, pk.Hybrid(lora=pk.LoRA(), adapter=pk.Adapter(targets=("nope",))))
    assert_untouched(model, snap)


def test_placement_that_finds_nothing_says_what_to_do():
    model = fresh("mlp")
    with pytest.raises(pk.TargetError, match="targets="):
        pk.apply(model, pk.Adapter())


def test_applying_twice_is_refused():
    model = pk.apply(fresh("tiny"), pk.LoRA())
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="already has"):
        pk.apply(model, pk.Adapter())
    assert_untouched(model, snap)


def test_regex_and_suffix_targets():
    model = pk.apply(fresh("tiny"), pk.LoRA(targets=(r"bert\.encoder\.layer\.0\..*\.(query|key)",)))
    names = [n for n, m in model.named_modules() if isinstance(m, pk.LoRALinear)]
    assert names == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key"]
    model = pk.apply(fresh("tiny"), pk.LoRA(targets=("attention.output.dense",)))
    assert sum(isinstance(m, pk.LoRALinear) for m in model.modules()) == 2


def test_named_head_and_missing_head():
    model = fresh("mlp")
    with pytest.raises(pk.TargetError, match="top-level modules"):
        pk.apply(model, pk.HeadOnly(), head="decoder")
    pk.apply(model, pk.HeadOnly(), head="fc2")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc2.weight", "fc2.bias"}


def test_unknown_base_and_method():
    with pytest.raises(ValueError, match="minilm"):
        pk.load_base("gpt5")
    with pytest.raises(ValueError, match="known methods"):
        pk.Method.from_dict({"method": "prefix"})
    with pytest.raises(ValueError, match="no setting"):
        pk.Method.from_dict({"method": "lora", "rank": 8})
