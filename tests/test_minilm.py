"""The invariants on the real pretrained all-MiniLM-L6-v2, for the methods people use most."""

import warnings

import pytest
import torch

import peftkit as pk
from conftest import clone, logits, perturb

pytestmark = pytest.mark.minilm


def _inputs(tok):
    return dict(tok(["the plot never catches fire", "a small, lovely film"], padding=True, return_tensors="pt"))


def test_minilm_shape(minilm):
    model, _ = minilm
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216  # all-MiniLM-L6-v2
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384


@pytest.mark.parametrize("method", [pk.LoRA(), pk.LoRA(r=4, rslora=True), pk.Adapter(), pk.Adapter(placement="houlsby"),
                                    pk.Hybrid()], ids=lambda m: m.name)
def test_identity_then_merge_then_round_trip(minilm, method, tmp_path):
    base, tok = minilm
    x = _inputs(tok)
    model = pk.apply(clone(base), method).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-5, rtol=0)
        perturb(model, std=0.02)
        out = logits(model, x)
        if pk.core.surgery.lora_layers(model):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pk.merge(model)
            torch.testing.assert_close(logits(model, x), out, atol=1e-5, rtol=0)
            pk.unmerge(model)
    pk.save_adapter(model, tmp_path)
    restored = pk.load_adapter(clone(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(restored, x), out, atol=1e-6, rtol=0)


def test_lora_parameter_count_is_r_in_plus_out(minilm):
    base, _ = minilm
    model = pk.apply(clone(base), pk.LoRA(r=8))
    df = pk.report(model)
    assert df[df.kind == "lora"].trainable.sum() == 6 * 2 * 8 * (384 + 384)
    assert df[df.kind == "head"].trainable.sum() == 384 * 2 + 2
