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
    cfg["lora_bias"] = True  # (use_dora, refused here before, is DoRA now: tests/test_lora_variants.py)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    target = fresh("tiny")
    with pytest.raises(pk.AdapterFileError, match="lora_bias"):
        pk.import_peft(target, tmp_path)
    assert not hasattr(target, "peftkit")


# -- beyond BERT: task types, GPT-2's layout, MultiheadAttention ---------------------------------

def test_task_type_follows_the_model():
    import transformers as T
    from peftkit.bases.tiny import tiny_model
    from peftkit.files.peft_format import peft_task_type
    bert = T.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    expected = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM",
                "distilbert": "SEQ_CLS", "roberta": "SEQ_CLS", "vit": None, "mlp": None, "cnn": None, "mha": None}
    for fam, task in expected.items():
        assert peft_task_type(tiny_model(fam)) == task, fam
    assert peft_task_type(T.BertForTokenClassification(bert)) == "TOKEN_CLS"
    assert peft_task_type(T.BertForQuestionAnswering(bert)) == "QUESTION_ANS"
    assert peft_task_type(T.BertModel(bert)) == "FEATURE_EXTRACTION"
    assert peft_task_type(fresh("tiny")) == "SEQ_CLS"


def test_gpt2_file_without_fan_in_fan_out_imports_like_peft(tmp_path):
    """PEFT corrects fan_in_fan_out=False on a Conv1D (with a warning); so does import_peft."""
    from peftkit.bases.tiny import tiny_inputs, tiny_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_model("gpt2"), peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]))
    perturb(pm)
    pm.eval().save_pretrained(str(tmp_path))
    import json
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = False
    cfg["task_type"] = "SEQ_CLS"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning) as record:
        ours = pk.import_peft(tiny_model("gpt2"), tmp_path).eval()
    messages = " ".join(str(w.message) for w in record)
    assert "fan_in_fan_out=False" in messages and "task_type 'SEQ_CLS'" in messages
    x = tiny_inputs("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, pm(**x).logits, atol=1e-5, rtol=1e-5)


def test_multihead_attention_against_reference_and_peft(tmp_path):
    """Ours is nn.MultiheadAttention with W + s B A in both projections. PEFT 0.21 adds the
    out_proj update twice (huggingface/peft#3774, open): its output is the reference with 2 s B_o A_o.
    The files still carry the same tensors, under the same names."""
    import copy as _copy
    from peftkit.bases.tiny import tiny_inputs, tiny_model
    base = tiny_model("mha")
    model = pk.apply(_copy.deepcopy(base), pk.LoRA(r=2, targets=("self_attn",))).eval()
    layer = perturb(model.encoder.self_attn, std=0.3)
    ids = tiny_inputs("mha")["input_ids"]
    reference = _copy.deepcopy(base)
    doubled = _copy.deepcopy(base)
    with torch.no_grad():
        for ref, k in ((reference, 1), (doubled, 2)):
            ref.encoder.self_attn.in_proj_weight.add_(layer.delta_weight())
            ref.encoder.self_attn.out_proj.weight.add_(k * layer.out_delta_weight())
        ours = model(input_ids=ids)
        torch.testing.assert_close(ours, reference(input_ids=ids), atol=1e-5, rtol=1e-5)
    pk.export_peft(model, tmp_path)
    theirs = _peft_model(_copy.deepcopy(base), tmp_path)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            peft_out = theirs(input_ids=ids)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    fixed = torch.allclose(peft_out, ours, atol=1e-5)
    assert fixed or torch.allclose(peft_out, doubled(input_ids=ids), atol=1e-5)
    back = pk.import_peft(_copy.deepcopy(base), tmp_path)
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert torch.equal(back.get_parameter(n), p)
