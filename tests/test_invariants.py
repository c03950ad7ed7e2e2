"""The invariants every method must satisfy, over the method x model matrix."""

import pytest
import torch

import peftkit as pk
from peftkit.layers.names import is_adapter_param
from peftkit.core.surgery import adapter_layers, lora_layers
from conftest import METHOD_KEYS, MODELS, adds, clone, fresh, logits, make_inputs, make_method, perturb

MATRIX = [(m, b) for b in MODELS for m in METHOD_KEYS]
HAS_LORA = {k for k in METHOD_KEYS if adds(k, "lora")}
HAS_ADAPTER = {k for k in METHOD_KEYS if adds(k, "adapter")}


def applied_pair(key, base):
    model = fresh(base)
    reference = clone(model)
    return reference, pk.apply(model, make_method(key, base)).eval()


@pytest.mark.parametrize("key,base", MATRIX)
def test_identity_at_init(key, base):
    reference, model = applied_pair(key, base)
    x = make_inputs(base)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), logits(reference, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("key,base", MATRIX)
def test_trainable_set(key, base):
    _, model = applied_pair(key, base)
    for name, p in model.named_parameters():
        head = name.startswith("classifier.")
        expected = key == "full" or head or (key != "head_only" and is_adapter_param(name))
        assert p.requires_grad == expected, name
    assert (pk.trainable_fraction(model) == 1.0) == (key == "full")


@pytest.mark.parametrize("key,base", [(m, b) for m, b in MATRIX if m in HAS_LORA])
def test_merge_equals_unmerged_and_is_idempotent(key, base):
    _, model = applied_pair(key, base)
    perturb(model)
    x = make_inputs(base)
    weights = {id(m): m.base.weight.detach().clone() for m in lora_layers(model)}
    with torch.no_grad():
        before = logits(model, x)
        with pytest.warns(UserWarning) if key == "hybrid" else _nothing():
            assert pk.merge(model) == len(weights)
        merged = logits(model, x)
        merged_w = {id(m): m.base.weight.detach().clone() for m in lora_layers(model)}
        with pytest.warns(UserWarning) if key == "hybrid" else _nothing():
            pk.merge(model)  # a second merge must change nothing
        for m in lora_layers(model):
            assert torch.equal(m.base.weight, merged_w[id(m)])
            torch.testing.assert_close(m.base.weight, weights[id(m)] + m.delta_weight(), atol=1e-6, rtol=0)
        torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
        pk.unmerge(model)
        pk.unmerge(model)
        for m in lora_layers(model):
            torch.testing.assert_close(m.base.weight, weights[id(m)], atol=1e-6, rtol=0)
        torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("key,base", [(m, b) for m, b in MATRIX if m in HAS_ADAPTER - HAS_LORA])
def test_adapters_refuse_to_merge(key, base):
    _, model = applied_pair(key, base)
    with pytest.raises(pk.MergeError, match="nonlinearity"):
        pk.merge(model)
    with pytest.raises(pk.MergeError, match="cannot unload"):
        pk.unload(model)
    assert len(adapter_layers(model)) > 0  # nothing was removed


@pytest.mark.parametrize("key,base", MATRIX)
def test_only_trainable_parameters_change(key, base):
    _, model = applied_pair(key, base)
    perturb(model)  # LoRA's B = 0 would otherwise leave A's gradient at zero
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = make_inputs(base)
    y = torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits(model, x), y).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert any(n.startswith("classifier.") for n in changed)
    if key not in ("full", "head_only"):
        assert any(is_adapter_param(n) for n in changed)


@pytest.mark.parametrize("key,base", [(m, b) for m, b in MATRIX if m in HAS_LORA])
def test_one_sgd_step_gives_w_plus_delta(key, base):
    _, model = applied_pair(key, base)
    perturb(model)
    w0 = {id(m): m.base.weight.detach().clone() for m in lora_layers(model)}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    x = make_inputs(base)
    torch.nn.functional.cross_entropy(logits(model, x), torch.tensor([0, 1, 1, 0])).backward()
    opt.step()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.merge(model)
    for m in lora_layers(model):
        delta = paper_delta(m, w0[id(m)])  # the updated factors, by each paper's formula
        assert delta.abs().max() > 0
        torch.testing.assert_close(m.base.weight, w0[id(m)] + delta, atol=1e-6, rtol=0)


def paper_delta(m, w0):
    """What a merge adds to W0, written from each paper: LoRA s B A; PiSSA s (B A - B0 A0) on its
    residual; DoRA m V / ||V|| - W0 with V = W0 + s B A (norm per output row)."""
    delta = (m.lora_B @ m.lora_A) * m.scale
    if getattr(m, "init", "lora") == "pissa":
        delta = delta - (m.lora_B0 @ m.lora_A0) * m.scale
    if isinstance(m, pk.DoRALinear):
        V = w0 + delta
        delta = m.lora_magnitude[:, None] * V / V.norm(dim=1, keepdim=True) - w0
    return delta


@pytest.mark.parametrize("base", MODELS)
def test_unload_gives_plain_model_with_same_outputs(base):
    _, model = applied_pair("lora", base)
    perturb(model)
    x = make_inputs(base)
    with torch.no_grad():
        before = logits(model, x)
        plain = pk.unload(model)
        assert not any(isinstance(m, (pk.LoRALinear, pk.AdapterLinear)) for m in plain.modules())
        assert not any(is_adapter_param(n) for n, _ in plain.named_parameters())
        torch.testing.assert_close(logits(plain, x), before, atol=1e-5, rtol=0)
    pk.apply(plain, pk.LoRA(targets=make_method("lora", base).targets))  # usable again


@pytest.mark.parametrize("base", MODELS)
def test_report_counts(base):
    _, model = applied_pair("lora", base)
    df = pk.report(model)
    total = df[df.module == "TOTAL"].iloc[0]
    assert total.total == sum(p.numel() for p in model.parameters())
    assert total.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = df[df.kind == "lora"]
    for _, row in lora.iterrows():
        layer = model.get_submodule(row.module)
        assert row.trainable == 4 * (layer.in_features + layer.out_features)  # r (in + out)
    assert abs(pk.trainable_fraction(model) - total.trainable / total.total) < 1e-12


def test_leading_batch_shapes_dtype_and_device():
    base = torch.nn.Linear(6, 5).double()
    layer = pk.LoRALinear(base, r=2, alpha=4)
    assert layer.lora_A.dtype == torch.float64 and layer.lora_A.device == base.weight.device
    perturb(layer)
    for shape in [(6,), (3, 6), (2, 3, 6), (2, 1, 3, 6)]:
        x = torch.randn(*shape, dtype=torch.float64)
        expected = base(x) + layer.scale * (x @ layer.lora_A.T @ layer.lora_B.T)
        torch.testing.assert_close(layer(x), expected)
    assert layer.scale == 2.0
    assert pk.LoRALinear(torch.nn.Linear(6, 5), r=4, alpha=4, rslora=True).scale == 2.0


def test_lora_init_follows_the_paper():
    layer = pk.LoRALinear(torch.nn.Linear(64, 32), r=8)
    assert layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (32, 8)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt 5) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 3
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad


def test_merge_refuses_nan():
    layer = pk.LoRALinear(torch.nn.Linear(4, 4), r=2)
    with torch.no_grad():
        layer.lora_B.fill_(float("nan"))
    w = layer.base.weight.detach().clone()
    with pytest.raises(pk.MergeError, match="NaN or inf"):
        layer.merge()
    assert torch.equal(layer.base.weight, w) and not layer.merged


def test_adapter_size_activation_and_layernorm_identity():
    from peftkit.layers.adapters import BottleneckAdapter
    assert BottleneckAdapter(384, reduction=16).size == 24
    assert BottleneckAdapter(384, size=64).size == 64
    for act in ("gelu", "relu", "silu"):
        for ln in (False, True):
            for variant in ("simple", "deep"):
                ad = BottleneckAdapter(32, size=4, activation=act, layernorm=ln, variant=variant)
                x = torch.randn(3, 7, 32)
                assert torch.equal(ad(x), x)
    ad = BottleneckAdapter(32, size=4)
    assert sum(p.numel() for p in ad.parameters()) == 2 * 32 * 4 + 32 + 4


def test_houlsby_and_pfeiffer_placements_on_bert():
    model = fresh("tiny")
    pk.apply(model, pk.Adapter(placement="houlsby", size=4))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, pk.AdapterLinear)]
    assert wrapped == ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
                       "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"]
    model = fresh("tiny")
    pk.apply(model, pk.Adapter(placement="pfeiffer", size=4))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, pk.AdapterLinear)]
    assert wrapped == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]


@pytest.mark.parametrize("key", METHOD_KEYS)
def test_method_specs_round_trip(key):
    m = make_method(key, "tiny")
    d = m.to_dict()
    import json
    assert pk.Method.from_dict(json.loads(json.dumps(d))) == m
    assert d["method"] in pk.METHODS


def test_teaching_wrappers():
    base = fresh("tiny")
    ref = clone(base)
    wl = pk.ModelWithLoRA(base, r=2, alpha=4)
    x = make_inputs("tiny")
    with torch.no_grad():
        torch.testing.assert_close(logits(wl, x), logits(ref, x))
    wa = pk.ModelWithAdapters(fresh("tiny"), size=4)
    assert len(adapter_layers(wa)) == 4


def test_lora_fast_path_under_autocast():
    """bf16 autocast (what fit uses on CUDA) runs the fast path with fp32 factors."""
    layer = pk.LoRALinear(torch.nn.Linear(16, 8), r=2)
    perturb(layer)
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    exact = torch.autograd.grad((layer.base(x) + layer.scale * (x @ layer.lora_A.T @ layer.lora_B.T)).sum(),
                                layer.lora_B)[0]
    torch.testing.assert_close(layer.lora_B.grad, exact, atol=0.05, rtol=0.05)  # bf16 precision
