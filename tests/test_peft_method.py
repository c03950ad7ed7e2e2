"""Any PEFT method through peftkit's harness: pk.PeftMethod(config)."""

import json
import warnings

import pytest
import torch

import peftkit as pk
from peftkit.core.surgery import applied
from peftkit.studies.experiments import compare, config_key, make_spec
from peftkit.training import TrainConfig
from conftest import fresh, logits, make_inputs, perturb

peft = pytest.importorskip("peft")

CONFIGS = {
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["query", "value"]),
    "ia3": lambda: peft.IA3Config(target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"]),
    "loha": lambda: peft.LoHaConfig(r=4, target_modules=["query"]),
    "lokr": lambda: peft.LoKrConfig(r=4, target_modules=["query"]),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=["query"], total_step=10),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["query"]),
}


def _peft(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(fresh("tiny"), str(path)).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_export_and_import_agree_with_peft(name, tmp_path):
    model = perturb(pk.apply(fresh("tiny"), pk.PeftMethod(CONFIGS[name]()))).eval()
    x = make_inputs("tiny")
    pk.export_peft(model, tmp_path)
    theirs = _peft(tmp_path)
    with torch.no_grad():
        ours = logits(model, x)
        assert not torch.allclose(ours, logits(fresh("tiny"), x), atol=1e-3)  # it acts
        torch.testing.assert_close(logits(theirs, x), ours, atol=1e-5, rtol=0)
    theirs.save_pretrained(str(tmp_path / "peft"))
    back = pk.import_peft(fresh("tiny"), tmp_path / "peft", verbose=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(back, x), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vera", "loha", "adalora"])
def test_save_load_merge_unload(name, tmp_path):
    model = perturb(pk.apply(fresh("tiny"), pk.PeftMethod(CONFIGS[name]()))).eval()
    x = make_inputs("tiny")
    with torch.no_grad():
        before = logits(model, x)
        pk.save_adapter(model, tmp_path / "a")
        back = pk.load_adapter(fresh("tiny"), tmp_path / "a").eval()
        torch.testing.assert_close(logits(back, x), before, atol=1e-6, rtol=0)
        assert pk.merge(model) > 0
        torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
        pk.merge(model)  # a no-op
        pk.unmerge(model)
        torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
        plain = pk.unload(model)
        assert not any(type(m).__module__.startswith("peft.") for m in plain.modules())
        assert not hasattr(plain, "peft_config") and applied(plain) is None
        torch.testing.assert_close(logits(plain, x), before, atol=1e-5, rtol=0)


def test_adalora_constants_stay_frozen_and_report_counts():
    model = pk.apply(fresh("tiny"), pk.PeftMethod(CONFIGS["adalora"]()))
    ranknum = [p for n, p in model.named_parameters() if "ranknum" in n]
    assert ranknum and not any(p.requires_grad for p in ranknum)
    df = pk.report(model)
    assert df[df.kind.str.startswith("peft")].trainable.sum() > 0
    assert df[df.module == "TOTAL"].trainable.iloc[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_a_layer_that_cannot_merge_says_so(monkeypatch):
    model = perturb(pk.apply(fresh("tiny"), pk.PeftMethod(CONFIGS["vera"]())))
    layer = next(m for m in model.modules() if type(m).__module__.startswith("peft.tuners.vera"))

    def refuse(*a, **k):
        raise NotImplementedError("no merge for this layer")
    monkeypatch.setattr(type(layer), "merge", refuse)
    with pytest.raises(pk.MergeError, match=r"PEFT's vera layer .* cannot merge: no merge for this layer\. Serve it unmerged"):
        pk.merge(model)


def test_clear_errors_before_anything_changes():
    model = fresh("tiny")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(pk.TargetError, match="task_type 'CAUSAL_LM'.*BertForSequenceClassification is 'SEQ_CLS'"):
        pk.apply(model, pk.PeftMethod(peft.VeraConfig(task_type="CAUSAL_LM", r=4, target_modules=["query"])))
    with pytest.raises(pk.TargetError, match="PEFT cannot apply this VERA config"):
        pk.apply(model, pk.PeftMethod(peft.VeraConfig(r=4, target_modules=["qurey"])))
    with pytest.raises(pk.TargetError, match="task head"):
        pk.apply(model, pk.PeftMethod(peft.IA3Config(target_modules=["classifier"], feedforward_modules=[])))
    assert applied(model) is None and not hasattr(model, "peft_config")
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not any(type(m).__module__.startswith("peft.") for m in model.modules())
    with pytest.raises(ValueError, match="prompt-learning"):
        pk.PeftMethod(peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="modules_to_save"):
        pk.PeftMethod(peft.VeraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="has no method 'NOPE'"):
        pk.PeftMethod({"peft_type": "NOPE"})
    with pytest.raises(TypeError, match="takes a peft config"):
        pk.PeftMethod()
    with pytest.raises(TypeError, match="takes a peft config"):
        pk.PeftMethod("vera")


def test_spec_roundtrip_and_cache_key_follow_the_config():
    a = pk.PeftMethod(peft.VeraConfig(r=4, target_modules=["query"]))
    assert pk.Method.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert hash(a) == hash(pk.PeftMethod(a.config))
    b = pk.PeftMethod(peft.VeraConfig(r=8, target_modules=["query"]))
    keys = {config_key(make_spec(m, base="tiny")) for m in (a, b, pk.PeftMethod(a.config))}
    assert len(keys) == 2


def test_compare_runs_and_caches_a_peft_method(tmp_path):
    m = pk.PeftMethod(peft.VeraConfig(r=4, target_modules=["query", "value"]))
    kw = dict(base="tiny", domain="tweets", n_train=32, n_eval=40, eval_domains=False, fresh_process=False,
              progress=False, cache=tmp_path / "r.jsonl", cfg=TrainConfig(epochs=1, lr=1e-2, batch_size=16, progress=False))
    df = compare([m, pk.LoRA(r=4)], **kw)
    assert list(df.method) == ["peft", "lora"] and df.trainable.iloc[0] < df.trainable.iloc[1]
    from peftkit.studies.recommend import recommend
    assert "PEFT VeRA r=4" in str(recommend(df))  # the evidence weighs it beside LoRA (by the name people read)
    again = compare([m], **kw)
    assert again.key.iloc[0] == df.key.iloc[0] and len((tmp_path / "r.jsonl").read_text().splitlines()) == 2


def test_deployer_serves_a_peft_method_and_refuses_to_merge_or_mix_it(tmp_path):
    from peftkit.serving.deployer import Deployer, MixedBatchError
    dirs = {}
    for name, spec in {"vera": pk.PeftMethod(CONFIGS["vera"]()), "lora": pk.LoRA(r=4)}.items():
        model, _ = pk.load_base("tiny")
        perturb(pk.apply(model, spec), std=0.3)
        dirs[name] = pk.save_adapter(model, tmp_path / name)
    dep = Deployer("tiny", device="cpu")
    for name, d in dirs.items():
        dep.register(name, d)
    _, tok = pk.load_base("tiny")
    texts = ["a gripping film", "dull and far too long"]
    for name in ("vera", "lora", "vera"):
        model, _ = pk.load_base("tiny")
        pk.load_adapter(model, dirs[name]).eval()
        with torch.no_grad():
            want = [torch.softmax(model(**tok([t], return_tensors="pt")).logits, -1)[0].max().item() for t in texts]
        assert list(dep.predict(texts, adapter=name).probability) == pytest.approx(want, abs=1e-5), name
    with pytest.raises(MixedBatchError, match="cannot share a mixed batch"):
        dep.predict(texts, adapters=["vera", "lora"])
    with pytest.raises(ValueError, match="PEFT-backed"):
        dep.set_merged(True)
    with pytest.raises(pk.AdapterFileError, match="merged=False"):
        Deployer("tiny", device="cpu", merged=True).register("v", dirs["vera"])
