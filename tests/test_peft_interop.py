"""Agreement with Hugging Face PEFT on the same weights, in both directions."""

import warnings

import pytest
import torch

import peftkit as pk
from conftest import clone, fresh, logits, make_inputs, perturb

peft = pytest.importorskip("peft")


def _peft_model(base_model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base_model, str(path)).eval()


def _text_inputs(tok):
    batch = tok(["a gripping, beautifully shot film", "dull and far too long", "fine"],
                padding=True, return_tensors="pt")
    return dict(batch)


@pytest.mark.parametrize("rslora", [False, True])
def test_export_loads_in_peft_with_our_logits_tiny(rslora, tmp_path):
    model = perturb(pk.apply(fresh("tiny"), pk.LoRA(r=4, alpha=8, rslora=rslora))).eval()
    pk.export_peft(model, tmp_path)
    theirs = _peft_model(fresh("tiny"), tmp_path)
    x = make_inputs("tiny")
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-5, rtol=0)


@pytest.mark.minilm
def test_export_loads_in_peft_with_our_logits_minilm(minilm, tmp_path):
    base, tok = minilm
    model = perturb(pk.apply(clone(base), pk.LoRA(r=8, alpha=16)), std=0.02).eval()
    pk.export_peft(model, tmp_path)
    theirs = _peft_model(clone(base), tmp_path)
    x = _text_inputs(tok)
    with torch.no_grad():
        ours = logits(model, x)
        torch.testing.assert_close(logits(theirs, x), ours, atol=1e-5, rtol=0)
        assert not torch.allclose(ours, logits(base, x), atol=1e-3)  # the adapter really acts


@pytest.mark.minilm
def test_peft_made_lora_imports_with_peft_logits_minilm(minilm, tmp_path):
    base, tok = minilm
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=12, lora_dropout=0.0,
                          target_modules=["query", "value", "dense"])
    pm = peft.get_peft_model(clone(base), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.02)
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    ours = pk.import_peft(clone(base), tmp_path).eval()
    assert sum(isinstance(m, pk.LoRALinear) for m in ours.modules()) == 6 * 5 + 1  # q, v, 3 dense per layer + pooler
    x = _text_inputs(tok)
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, x), logits(pm, x), atol=1e-5, rtol=0)


def test_export_refuses_adapters_and_merged(tmp_path):
    with pytest.raises(ValueError, match="save_adapter"):
        pk.export_peft(pk.apply(fresh("tiny"), pk.Adapter()), tmp_path)
    m = pk.apply(fresh("tiny"), pk.LoRA())
    pk.merge(m)
    with pytest.raises(ValueError, match="unmerge"):
        pk.export_peft(m, tmp_path)


def test_import_refuses_unsupported_peft_features(tmp_path):
    import json
    m = perturb(pk.apply(fresh("tiny"), pk.LoRA()))
    pk.export_peft(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    target = fresh("tiny")
    with pytest.raises(pk.AdapterFileError, match="use_dora"):
        pk.import_peft(target, tmp_path)
    assert not hasattr(target, "peftkit")
