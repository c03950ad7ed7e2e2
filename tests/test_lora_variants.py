"""DoRA, PiSSA and LoRA+: each against its paper's formula, against PEFT, and their errors."""

import warnings

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core import lora_specs
from peftkit.core.surgery import applied
from peftkit.layers.dora import DoRALinear
from peftkit.training.loop import param_groups
from conftest import fresh, logits, make_inputs, perturb

peft = pytest.importorskip("peft")


def _reference_dora(layer, x):
    """Eq. (5) of the DoRA paper by plain autograd, the norm detached (section 4.3)."""
    w = layer.base.weight
    V = w + layer.scale * layer.lora_B @ layer.lora_A
    norm = V.norm(dim=1).detach()
    return nn.functional.linear(x, V) * (layer.lora_magnitude / norm) + layer.base.bias


@pytest.mark.parametrize("tokens", [3, 700])  # the two-path size and the folded fast path
def test_dora_forward_and_gradients_match_the_paper(tokens):
    torch.manual_seed(0)
    layer = perturb(DoRALinear(nn.Linear(24, 20).double(), r=4, alpha=8))
    x = torch.randn(tokens, 24, dtype=torch.float64, requires_grad=True)
    ref = DoRALinear(nn.Linear(24, 20).double(), r=4, alpha=8)
    ref.load_state_dict(layer.state_dict())
    xr = x.detach().clone().requires_grad_(True)
    g = torch.randn(tokens, 20, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    (_reference_dora(ref, xr) * g).sum().backward()
    torch.testing.assert_close(layer(x), _reference_dora(ref, xr))
    for name in ("lora_A", "lora_B", "lora_magnitude"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(ref, name).grad, msg=name)
    torch.testing.assert_close(x.grad, xr.grad)


def test_dora_with_dropout_and_conv1d_layout():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(20, 24)  # (in, out) storage, as GPT-2
    lin = nn.Linear(24, 20)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    a, b = DoRALinear(conv, r=4), perturb(DoRALinear(lin, r=4))
    a.load_state_dict({k.replace("base.weight", "base.weight"): (v.t() if k == "base.weight" else v)
                       for k, v in b.state_dict().items()})
    x = torch.randn(5, 24)
    torch.testing.assert_close(a(x), b(x))
    a.merge()
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=0)
    d = perturb(DoRALinear(nn.Linear(24, 20), r=4, dropout=0.1)).eval()
    assert torch.isfinite(d.train()(x)).all()


def test_dora_agrees_with_peft_both_ways(tmp_path):
    model = perturb(pk.apply(fresh("tiny"), pk.DoRA(r=4, alpha=8))).eval()
    pk.export_peft(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(fresh("tiny"), str(tmp_path)).eval()
    assert theirs.peft_config["default"].use_dora
    x = make_inputs("tiny")
    with torch.no_grad():
        ours = logits(model, x)
        torch.testing.assert_close(logits(theirs, x), ours, atol=1e-5, rtol=0)
        assert not torch.allclose(ours, logits(fresh("tiny"), x), atol=1e-3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    back = pk.import_peft(fresh("tiny"), tmp_path / "peft", verbose=False).eval()
    assert isinstance(applied(back).method, pk.DoRA)
    with torch.no_grad():
        torch.testing.assert_close(logits(back, x), ours, atol=1e-5, rtol=0)


def test_pissa_init_is_the_top_singular_vectors():
    lin = nn.Linear(32, 24)
    layer = pk.LoRALinear(lin, r=4, alpha=8, init="pissa")
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(layer.scale * layer.lora_B @ layer.lora_A, top, atol=1e-5, rtol=0)
    assert torch.equal(layer.delta_weight(), torch.zeros_like(lin.weight))  # identity, exactly
    # the residual the factors train on is W0 minus its top-r part
    torch.testing.assert_close(layer._weight(), lin.weight - top, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_export_loads_in_peft_with_our_logits(rslora, tmp_path):
    model = perturb(pk.apply(fresh("tiny"), pk.LoRA(r=4, alpha=8, init="pissa", rslora=rslora))).eval()
    pk.export_peft(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(fresh("tiny"), str(tmp_path)).eval()
    assert theirs.peft_config["default"].r == 8  # the rank-2r plain LoRA
    x = make_inputs("tiny")
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-5, rtol=0)
    back = pk.import_peft(fresh("tiny"), tmp_path, verbose=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(back, x), logits(model, x), atol=1e-5, rtol=0)


def test_pissa_save_load_recomputes_the_same_residual(tmp_path):
    model = perturb(pk.apply(fresh("tiny"), pk.LoRA(r=4, init="pissa"))).eval()
    pk.save_adapter(model, tmp_path / "a")
    back = pk.load_adapter(fresh("tiny"), tmp_path / "a").eval()
    x = make_inputs("tiny")
    with torch.no_grad():
        torch.testing.assert_close(logits(back, x), logits(model, x), atol=1e-5, rtol=0)


def test_unconverted_peft_pissa_is_refused(tmp_path):
    import json
    pk.export_peft(perturb(pk.apply(fresh("tiny"), pk.LoRA(r=4))), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(pk.AdapterFileError, match="path_initial_model_for_weight_conversion"):
        pk.import_peft(fresh("tiny"), tmp_path)


def test_pissa_refuses_a_layer_whose_svd_does_not_fit(monkeypatch):
    monkeypatch.setattr(lora_specs, "available_memory", lambda: 1000)
    model = fresh("tiny")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(pk.TargetError, match=r"PiSSA cannot decompose '.*query'.*x.*GiB"):
        pk.apply(model, pk.LoRA(init="pissa"))
    assert applied(model) is None
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    pk.apply(model, pk.LoRA(init="lora"))  # the default init needs no SVD


def test_dora_and_pissa_refuse_other_layer_kinds():
    with pytest.raises(pk.TargetError, match="DoRA adapts Linear"):
        pk.apply(fresh("tiny"), pk.DoRA(targets=("word_embeddings",)))
    with pytest.raises(pk.TargetError, match="PiSSA initialises Linear"):
        pk.apply(fresh("tiny"), pk.LoRA(targets=("word_embeddings",), init="pissa"))
    with pytest.raises(ValueError, match="unknown LoRA init 'svd'"):
        pk.LoRA(init="svd")
    with pytest.raises(ValueError, match="DoRA takes init='lora' only"):
        pk.DoRA(init="pissa")


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "16", True])
def test_lr_ratio_must_be_positive(bad):
    with pytest.raises(ValueError, match="lr_ratio .* must be a positive number"):
        pk.LoRA(lr_ratio=bad)


def test_lora_plus_puts_b_in_its_own_group_at_lambda_times_the_rate():
    model = pk.apply(fresh("tiny"), pk.LoRA(r=4, lr_ratio=16.0))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = param_groups(model, named, 1e-3, 0.01)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for n, p in named.items():
        want = 16e-3 if n.endswith("lora_B") else 1e-3
        assert by_id[id(p)]["lr"] == pytest.approx(want), n
        assert by_id[id(p)]["weight_decay"] == (0.0 if p.ndim < 2 else 0.01), n
    assert groups[0]["lr"] == 1e-3  # history's "lr" stays the base rate
    assert sum(len(g["params"]) for g in groups) == len(named)
    plain = pk.apply(fresh("tiny"), pk.LoRA(r=4))
    assert {g["lr"] for g in param_groups(plain, dict(plain.named_parameters()), 1e-3, 0.0)} == {1e-3}


def test_lora_plus_training_moves_b_faster():
    """One AdamW step moves every entry by about lr (Adam's update is ~sign(g) at step 1): B by 16x."""
    from peftkit.training import TrainConfig, fit
    model = perturb(pk.apply(fresh("tiny"), pk.LoRA(r=4, lr_ratio=16.0, targets=("query",))))
    layer = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    x = make_inputs("tiny")
    batch = {**x, "labels": torch.tensor([0, 1, 0, 1])}
    fit(model, [batch], None, TrainConfig(epochs=1, lr=1e-3, warmup_ratio=0.0, progress=False))
    dA = (layer.lora_A - A0).abs().median()
    dB = (layer.lora_B - B0).abs().median()
    assert 8 < float(dB / dA) < 32


def test_plain_lora_files_and_cache_keys_are_unchanged():
    assert pk.LoRA().to_dict() == {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                                   "targets": ["query", "value"], "rslora": False}
    d = pk.LoRA(init="pissa", lr_ratio=4).to_dict()
    assert d["init"] == "pissa" and d["lr_ratio"] == 4.0
    assert pk.Method.from_dict(d) == pk.LoRA(init="pissa", lr_ratio=4)
    assert pk.Method.from_dict(pk.DoRA(r=4).to_dict()) == pk.DoRA(r=4)


@pytest.mark.parametrize("merged", [False, True])
def test_deployer_serves_dora_and_pissa_and_refuses_to_mix_them(merged, tmp_path):
    from peftkit.serving.deployer import Deployer, MixedBatchError
    texts = ["a gripping film", "dull and far too long"]
    dirs = {}
    for name, spec in {"dora": pk.DoRA(r=4), "pissa": pk.LoRA(r=4, init="pissa"), "lora": pk.LoRA(r=4)}.items():
        model, _ = pk.load_base("tiny")
        perturb(pk.apply(model, spec), std=0.3)
        dirs[name] = pk.save_adapter(model, tmp_path / name)
    dep = Deployer("tiny", device="cpu", merged=merged)
    for name, d in dirs.items():
        dep.register(name, d)
    _, tok = pk.load_base("tiny")
    for name in ("dora", "pissa", "lora", "dora"):  # switch there and back
        model, _ = pk.load_base("tiny")
        pk.load_adapter(model, dirs[name]).eval()
        with torch.no_grad():
            want = [torch.softmax(model(**tok([t], return_tensors="pt")).logits, -1)[0, 1].item() for t in texts]
        got = dep.predict(texts, adapter=name)
        probs = [p if lab == 1 else 1 - p for p, lab in zip(got.probability, got.label)]
        assert probs == pytest.approx(want, abs=1e-5), name
    if not merged:
        with pytest.raises(MixedBatchError, match=r"\['dora'\] cannot share a mixed batch"):
            dep.predict(texts, adapters=["dora", "lora"])


@pytest.mark.minilm
def test_dora_and_pissa_on_minilm_load_in_peft(minilm, tmp_path):
    import copy
    base, tok = minilm
    x = dict(tok(["a gripping, beautifully shot film", "dull and far too long"], padding=True, return_tensors="pt"))
    for name, spec in {"dora": pk.DoRA(r=8), "pissa": pk.LoRA(r=8, init="pissa")}.items():
        model = perturb(pk.apply(copy.deepcopy(base), spec), std=0.02).eval()
        pk.export_peft(model, tmp_path / name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / name)).eval()
        with torch.no_grad():
            ours = logits(model, x)
            torch.testing.assert_close(logits(theirs, x), ours, atol=1e-5, rtol=0, msg=name)
            assert not torch.allclose(ours, logits(base, x), atol=1e-3), name


def test_claim_words_follow_the_interval():
    from peftkit.studies import stats, variants as V
    iv = lambda lo, hi: stats.Interval((lo + hi) / 2, lo, hi, "test")
    assert V.direction_word(iv(0.01, 0.03)) == V.REPRODUCED
    assert V.direction_word(iv(-0.03, -0.01)) == V.NOT_REPRODUCED
    assert V.direction_word(iv(-0.01, 0.01)) == V.CANNOT_TELL
    assert V.direction_word(iv(-0.03, -0.01), better=stats.LOWER) == V.REPRODUCED  # a loss that falls
    assert V.direction_word(None) == V.CANNOT_TELL
    assert V.match_word(iv(-0.01, 0.015)) == V.REPRODUCED
    assert V.match_word(iv(0.01, 0.2)) == V.REPRODUCED
    assert V.match_word(iv(-0.10, -0.05)) == V.NOT_REPRODUCED
    assert V.match_word(iv(-0.05, -0.01)) == V.PARTLY
    assert V.match_word(iv(-0.05, 0.05)) == V.CANNOT_TELL
    assert V.match_word(iv(float("nan"), 0.0)) == V.CANNOT_TELL
    assert set(V.WORDS) == {"reproduced", "partly", "not reproduced", "cannot tell"}
