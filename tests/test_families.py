"""The family matrix: every registered method on tiny random models of every family peftkit adapts
(GPT-2, Llama, T5, BART, DistilBERT, RoBERTa, ViT, an MLP, a CNN, an embedding model and an
nn.MultiheadAttention model), through the same invariants, and LoRA through PEFT both ways."""

import contextlib
import copy
import dataclasses
import json
import warnings

import pytest
import torch

import peftkit as pk
from peftkit.bases.tiny import FAMILIES, tiny_inputs, tiny_model
from peftkit.core.surgery import adapter_layers, lora_layers
from peftkit.layers.names import is_adapter_param
from conftest import METHOD_KEYS, SMALL, perturb

peft = pytest.importorskip("peft")

FAMS = tuple(FAMILIES)
GENERATIVE = tuple(f for f, spec in FAMILIES.items() if spec.generative)
TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM",
         "distilbert": "SEQ_CLS", "roberta": "SEQ_CLS"}  # the rest: none
_BASES: dict = {}
PLAIN = ("mlp", "cnn", "embedding", "mha")  # plain torch modules, no transformers model_type
NOT_LINEAR = ("cnn", "embedding", "mha")  # families whose LoRA targets include convolutions, embeddings, MHA
LINEAR_ONLY = ("dora", "lora:pissa")  # DoRA and PiSSA adapt Linear (and Conv1D) layers only


def fresh(fam):
    if fam not in _BASES:
        _BASES[fam] = tiny_model(fam)
    return copy.deepcopy(_BASES[fam])


def method(key: str, fam: str) -> pk.Method:
    """The registry's method and variant, small, with the family's targets for plain modules."""
    name, _, variant = key.partition(":")
    cls = pk.METHODS[name]
    spec = FAMILIES[fam]

    def small(c, settings):
        fields = {f.name for f in dataclasses.fields(c)}
        kw = {k: v for k, v in SMALL.items() if k in fields} | settings
        targets = spec.lora_targets if issubclass(c, pk.LoRA) else spec.adapter_targets
        if "targets" in fields and targets:
            kw["targets"] = targets
        return c(**kw)

    if cls is pk.Hybrid:
        return pk.Hybrid(lora=small(pk.LoRA, {}), adapter=small(pk.Adapter, {"placement": "pfeiffer"}))
    if cls is pk.PeftMethod:  # on peftkit's architecture table's LoRA targets for the family
        if fam in PLAIN:
            pytest.skip("a plain module's targets are named per test in tests/test_peft_method.py")
        from peftkit.core.architectures import architecture
        return cls(config={**cls.variants[variant]["config"], "target_modules": list(architecture(fresh(fam)).lora)})
    return small(cls, cls.variants[variant])


def out(model, x):
    y = model(**x)
    return (y.logits if hasattr(y, "logits") else y).float()


def quiet_apply(model, m, head="auto"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pk.apply(model, m, head=head)


def unique_params(model):
    return {id(p): p for p in model.parameters()}.values()


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("key", METHOD_KEYS)
def test_family_invariants(fam, key, tmp_path):
    if key in LINEAR_ONLY and fam in NOT_LINEAR:
        with pytest.raises(pk.TargetError, match="Linear"):  # refused, by name, before anything changes
            quiet_apply(fresh(fam), method(key, fam))
        return
    ref, model = fresh(fam), quiet_apply(fresh(fam), method(key, fam)).eval()
    x = tiny_inputs(fam)
    with torch.no_grad():  # identity at init
        torch.testing.assert_close(out(model, x), out(ref, x), atol=1e-5, rtol=0)
    # report counts every parameter once (tied weights too), and agrees with trainable_fraction
    total = pk.report(model).set_index("module").loc["TOTAL"]
    assert total.total == sum(p.numel() for p in unique_params(model))
    assert total.trainable == sum(p.numel() for p in unique_params(model) if p.requires_grad) > 0
    assert abs(pk.trainable_fraction(model) - total.trainable / total.total) < 1e-12

    perturb(model)
    with torch.no_grad():
        before = out(model, x)
    loras = lora_layers(model)
    if loras:  # merged equals unmerged; a second merge is a no-op; unmerge restores W
        w0 = {(i, j): w.detach().clone() for i, m in enumerate(loras) for j, (w, _) in enumerate(m.deltas())}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert pk.merge(model) == len(loras)
            merged = {(i, j): (w.detach().clone(), d) for i, m in enumerate(loras) for j, (w, d) in enumerate(m.deltas())}
            torch.testing.assert_close(out(model, x), before, atol=1e-5, rtol=1e-5)
            pk.merge(model)
            for (i, j), (w, d) in merged.items():
                now = loras[i].deltas()[j][0]
                assert torch.equal(now, w)
                torch.testing.assert_close(w, w0[i, j] + d, atol=1e-6, rtol=0)
            pk.unmerge(model)
            pk.unmerge(model)
            for (i, j), w in w0.items():
                torch.testing.assert_close(loras[i].deltas()[j][0], w, atol=1e-6, rtol=0)
            torch.testing.assert_close(out(model, x), before, atol=1e-5, rtol=1e-5)
    elif adapter_layers(model):
        with pytest.raises(pk.MergeError, match="nonlinearity"):
            pk.merge(model)

    # save, then load into a fresh base: the same outputs
    pk.save_adapter(model, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = pk.load_adapter(fresh(fam), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(out(restored, x), before, atol=1e-6, rtol=0)

    # three SGD steps change only trainable parameters, and do change the adapter's
    model.train()
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        out(model, x).pow(2).mean().backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, params0[n])}
    assert changed and changed <= {n for n, p in model.named_parameters() if p.requires_grad}
    if key not in ("full", "head_only"):
        assert any(is_adapter_param(n) for n in changed)


@contextlib.contextmanager
def no_fused_attention():
    """PEFT's MultiheadAttention layer merges in its own forward, which nn.TransformerEncoderLayer's
    fused inference path skips (it reads in_proj_weight itself); compare PEFT with it off."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def without_out_proj_update(model):
    """PEFT 0.21 adds a MultiheadAttention's out_proj update twice (huggingface/peft#3774, see
    test_multihead_attention_against_reference_and_peft); compare with PEFT with that pair at 0."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_out_B" in n or "out_proj.lora_B" in n:
                p.zero_()
    return model


def peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(path)).eval()


def greedy(model, x):
    kw = {"input_ids": x["input_ids"], "max_new_tokens": 5, "do_sample": False, "min_new_tokens": 5}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(**kw)


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("rslora", [False, True])
def test_family_peft_export(fam, rslora, tmp_path):
    model = perturb(quiet_apply(fresh(fam), dataclasses.replace(method("lora", fam), rslora=rslora))).eval()
    without_out_proj_update(model)
    pk.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == TASKS.get(fam)
    assert cfg["fan_in_fan_out"] == (fam == "gpt2")
    assert cfg["modules_to_save"] == (list(model.peftkit.heads) or None)
    theirs = peft_load(fresh(fam), tmp_path)
    x = tiny_inputs(fam)
    with torch.no_grad(), no_fused_attention():
        torch.testing.assert_close(out(theirs, x), out(model, x), atol=1e-5, rtol=1e-5)
    if fam in GENERATIVE:  # greedy generation: unmerged, merged, and PEFT's load of the export
        ours = greedy(model, x)
        assert torch.equal(greedy(theirs, x), ours)
        merged = copy.deepcopy(model)
        pk.merge(merged, allow_tied=True)  # default targets are never tied
        assert torch.equal(greedy(merged, x), ours)


def peft_targets(fam, model):
    spec = FAMILIES[fam]
    if spec.lora_targets:
        return list(spec.lora_targets)
    from peftkit.core.architectures import architecture
    return list(architecture(model).lora)


@pytest.mark.parametrize("fam", FAMS)
def test_family_peft_import(fam, tmp_path):
    base = fresh(fam)
    task = TASKS.get(fam)
    save = None if task else (["classifier"] if hasattr(base, "classifier") else None)
    cfg = peft.LoraConfig(task_type=task, r=4, lora_alpha=12, target_modules=peft_targets(fam, base),
                          modules_to_save=save, fan_in_fan_out=fam == "gpt2", use_rslora=fam == "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    without_out_proj_update(pm).eval().save_pretrained(str(tmp_path))
    ours = pk.import_peft(fresh(fam), tmp_path).eval()
    x = tiny_inputs(fam)
    with torch.no_grad(), no_fused_attention():
        theirs = out(pm, x)
        assert not torch.allclose(theirs, out(fresh(fam), x), atol=1e-4)  # the adapter acts
    with torch.no_grad():
        torch.testing.assert_close(out(ours, x), theirs, atol=1e-5, rtol=1e-5)
    if fam in GENERATIVE:
        assert torch.equal(greedy(ours, x), greedy(pm, x))
