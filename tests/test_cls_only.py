"""The CLS-only last layer and the padding-free encoder compute the same function as the plain
padded model: in training, with the same random draws, and in eval for the classifier's logits
(the contract since issue 19: eval logits take the fast forward too; a direct encoder call in eval
still gets the padded, whole-layer output). They stay out of the way everywhere else."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import peftkit as pk
from peftkit.bases import fast_bert
from peftkit.bases.fast_bert import use_cls_only_last_layer, use_unpadded_encoder
from peftkit.layers.dropout import use_fast_dropout
from conftest import METHOD_KEYS, make_method, perturb

TEXTS = ["a fine film , really", "awful", "it was ok i guess but far too long for me"]


SWITCHES = {"cls_only": (use_cls_only_last_layer,), "unpad": (use_unpadded_encoder,),
            "both": (use_cls_only_last_layer, use_unpadded_encoder)}


def _pair(method, impl="sdpa", fast=False, switches=("cls_only",)):
    """The same model twice: a plain one, and one with the CLS-only last layer and/or the
    padding-free encoder."""
    plain, tok = pk.load_base("tiny", seed=0, cls_only=False, unpad=False)
    plain.set_attn_implementation(impl)
    if method is not None:
        pk.apply(plain, method)
    if fast:
        use_fast_dropout(plain)
    fast_model = copy.deepcopy(plain)
    for name in switches:
        assert all(switch(fast_model) for switch in SWITCHES[name])
    return plain, fast_model, tok(TEXTS, padding=True, return_tensors="pt")


def _train_step_outputs(model, enc, seed=5):
    model.train()
    torch.manual_seed(seed)
    logits = model(**enc).logits
    F.cross_entropy(logits, torch.tensor([1, 0, 1])).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, torch.get_rng_state()


@pytest.mark.parametrize("switch", list(SWITCHES))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method", [pk.FullFineTune(), pk.LoRA(r=4, alpha=8, dropout=0.1),
                                    pk.Adapter(reduction=4, placement="houlsby")], ids=["full", "lora", "adapter"])
def test_same_logits_gradients_and_random_stream_with_dropout_on(method, impl, switch):
    plain, fast, enc = _pair(method, impl, switches=(switch,))
    assert enc["attention_mask"].min() == 0  # padded batch: the mask path is exercised
    o1, g1, rng1 = _train_step_outputs(plain, enc)
    o2, g2, rng2 = _train_step_outputs(fast, enc)
    torch.testing.assert_close(o2, o1, atol=1e-6, rtol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)
    # Every dropout drew its full-shape mask: the generator ends in the same state.
    assert torch.equal(rng1, rng2)


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_fast_dropout_masks_are_drawn_at_full_shape_too(switch):
    plain, fast, enc = _pair(pk.LoRA(r=4, alpha=8, dropout=0.1), fast=True, switches=(switch,))
    o1, g1, rng1 = _train_step_outputs(plain, enc)
    o2, g2, rng2 = _train_step_outputs(fast, enc)
    torch.testing.assert_close(o2, o1, atol=1e-6, rtol=1e-5)
    assert torch.equal(rng1, rng2)


def test_training_and_eval_logits_run_the_cls_row_only_a_direct_encoder_call_the_whole_layer():
    plain, fast, enc = _pair(None)
    fast.train()
    assert fast.bert(**enc).last_hidden_state.shape[1] == 1  # the pooler's row only
    fast.eval(), plain.eval()
    b, t = enc["attention_mask"].shape
    assert _rows_seen(fast, enc, train=False) == [(b, t), (b, 1)]  # eval logits: the CLS row only
    with torch.no_grad():
        torch.testing.assert_close(fast(**enc).logits, plain(**enc).logits, atol=1e-6, rtol=1e-5)
        # Called directly (embeddings, not logits), the encoder runs the whole layer, bit for bit.
        h1, h2 = plain.bert(**enc).last_hidden_state, fast.bert(**enc).last_hidden_state
    assert h2.shape == h1.shape and torch.equal(h1, h2)
    # Asking for hidden states or attentions in training falls back to the whole layer.
    fast.train()
    out = fast.bert(**enc, output_hidden_states=True)
    assert out.last_hidden_state.shape == h1.shape and [h.shape for h in out.hidden_states] == [h1.shape] * 3
    fast.set_attn_implementation("eager")  # SDPA gives no attention maps
    out = fast.bert(**enc, output_attentions=True)
    assert out.last_hidden_state.shape == h1.shape and out.attentions[-1].shape[-2:] == (h1.shape[1],) * 2


def test_switch_is_idempotent_reversible_and_keeps_the_state_dict():
    model, _ = pk.load_base("tiny", seed=0)  # on by default
    last = model.bert.encoder.layer[-1]
    keys = list(model.state_dict())
    assert type(last).__name__ == "BertLayerClsOnly" and type(model.bert.encoder.layer[0]).__name__ == "BertLayer"
    assert use_cls_only_last_layer(model) and type(last).__name__ == "BertLayerClsOnly"  # twice: one level
    assert use_cls_only_last_layer(model, False) is False and type(last).__name__ == "BertLayer"
    assert list(model.state_dict()) == keys
    use_cls_only_last_layer(model)
    clone = pickle.loads(pickle.dumps(model))  # the class is importable, so the model pickles
    assert type(clone.bert.encoder.layer[-1]).__name__ == "BertLayerClsOnly"
    off, _ = pk.load_base("tiny", seed=0, cls_only=False, unpad=False)
    assert type(off.bert.encoder.layer[-1]).__name__ == "BertLayer"
    assert use_cls_only_last_layer(pk.MLP()) is False  # not a BERT classifier: nothing changes


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_peft_wrapped_model_gets_the_same_function(switch):
    peft = pytest.importorskip("peft")
    plain, tok = pk.load_base("tiny", seed=0, cls_only=False, unpad=False)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.1)
    plain = peft.get_peft_model(plain, cfg)
    fast = copy.deepcopy(plain)
    assert all(f(fast) for f in SWITCHES[switch])
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    o1, g1, rng1 = _train_step_outputs(plain, enc)
    o2, g2, rng2 = _train_step_outputs(fast, enc)
    torch.testing.assert_close(o2, o1, atol=1e-6, rtol=1e-5)
    assert torch.equal(rng1, rng2)


def _rows_seen(model, enc, train=True):
    """The leading shape of every feed-forward input in one forward of the classifier (training,
    or with train=False an eval forward)."""
    seen = []
    hooks = [layer.intermediate.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[:-1])))
             for layer in model.bert.encoder.layer]
    model.train(train)
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    return seen


def test_padding_free_encoder_runs_the_real_tokens_only():
    plain, fast, enc = _pair(None, switches=("both",))
    real = int(enc["attention_mask"].sum())
    b, t = enc["attention_mask"].shape
    assert real < b * t
    assert _rows_seen(plain, enc) == [(b, t), (b, t)]
    assert _rows_seen(fast, enc) == [(real,), (b, 1)]  # packed rows, then the CLS-only last layer
    assert fast.bert(**enc).last_hidden_state.shape == (b, 1, 32)
    use_cls_only_last_layer(fast, False)
    assert _rows_seen(fast, enc) == [(real,), (real,)]
    out = fast.bert(**enc).last_hidden_state  # unpacked: real rows as the padded model, pads 0
    plain.train()
    torch.manual_seed(0)
    ref = plain.bert(**enc).last_hidden_state
    torch.manual_seed(0)
    out = fast.bert(**enc).last_hidden_state
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-6, rtol=1e-5)
    assert torch.all(out[~keep] == 0)


def test_padding_free_encoder_falls_back_where_it_must():
    plain, fast, enc = _pair(None, switches=("unpad",))
    b, t = enc["attention_mask"].shape
    full = [(b, t), (b, t)]
    fast.eval()
    with torch.no_grad():
        h1, h2 = plain.eval().bert(**enc).last_hidden_state, fast.bert(**enc).last_hidden_state
    assert torch.equal(h1, h2)  # eval, the encoder called directly: the padded encoder, bit for bit
    assert _rows_seen(fast, enc, train=False)[0] == (int(enc["attention_mask"].sum()),)  # eval logits: packed
    # No padding, left padding, hidden states asked for, a hook on a layer: the padded encoder.
    same = {k: v[2:] for k, v in enc.items()}
    assert _rows_seen(fast, same) == [(1, t), (1, t)]
    left = {"input_ids": enc["input_ids"].flip(1), "attention_mask": enc["attention_mask"].flip(1)}
    assert _rows_seen(fast, left) == full
    fast.train()
    assert len(fast.bert(**enc, output_hidden_states=True).hidden_states) == 3  # leaves its hooks
    assert _rows_seen(fast, enc)[0] == (int(enc["attention_mask"].sum()),)  # which do not count
    hook = fast.bert.encoder.layer[0].register_forward_hook(lambda *a: None)
    assert _rows_seen(fast, enc) == full
    hook.remove()
    assert _rows_seen(fast, enc)[0] == (int(enc["attention_mask"].sum()),)


def test_padding_free_switch_is_idempotent_reversible_and_pickles():
    model, _ = pk.load_base("tiny", seed=0)  # on by default
    encoder, keys = model.bert.encoder, list(model.state_dict())
    assert type(encoder).__name__ == "BertEncoderUnpadded"
    assert use_unpadded_encoder(model) and type(encoder).__name__ == "BertEncoderUnpadded"
    assert use_unpadded_encoder(model, False) is False and type(encoder).__name__ == "BertEncoder"
    assert list(model.state_dict()) == keys
    use_unpadded_encoder(model)
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone.bert.encoder).__name__ == "BertEncoderUnpadded"
    assert use_unpadded_encoder(pk.MLP()) is False


# --- eval and inference: the classifier's logits take the fast forward -------------------------

def _random_batches(seed, n=3, batch=6, vocab=(1000, 5000)):
    """Random token batches, right-padded to their longest row, every row at least [CLS] + 1."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        lengths = torch.randint(2, 20, (batch,), generator=g)
        ids = torch.randint(*vocab, (batch, int(lengths.max())), generator=g)
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
        yield {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.parametrize("key", [k for k in METHOD_KEYS if k != "full"] + ["full", None])
def test_eval_logits_equal_the_padded_models_for_every_method(key):
    plain, _ = pk.load_base("tiny", seed=0, cls_only=False, unpad=False)
    if key is not None:
        pk.apply(plain, make_method(key, "tiny"))
        perturb(plain, seed=3, std=0.2)
    fast = copy.deepcopy(plain)
    assert use_cls_only_last_layer(fast) and use_unpadded_encoder(fast)
    plain.eval(), fast.eval()
    for i, enc in enumerate(_random_batches(seed=len(str(key)))):
        assert enc["attention_mask"].min() == 0
        with torch.inference_mode():
            torch.testing.assert_close(fast(**enc).logits, plain(**enc).logits, atol=1e-5, rtol=0)
    b = enc["input_ids"].shape[0]
    assert _rows_seen(fast, enc, train=False) == [(int(enc["attention_mask"].sum()),), (b, 1)]  # it ran packed


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_eval_logits_of_peft_lora_equal_the_padded_models(impl):
    peft = pytest.importorskip("peft")
    plain, _ = pk.load_base("tiny", seed=0, cls_only=False, unpad=False)
    plain.set_attn_implementation(impl)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.1)
    plain = peft.get_peft_model(plain, cfg)
    perturb(plain, seed=2, std=0.2)
    fast = copy.deepcopy(plain)
    assert use_cls_only_last_layer(fast) and use_unpadded_encoder(fast)
    plain.eval(), fast.eval()
    inner = fast.base_model.model
    for enc in _random_batches(seed=5):
        with torch.no_grad():
            torch.testing.assert_close(fast(**enc).logits, plain(**enc).logits, atol=1e-5, rtol=0)
    assert _rows_seen(inner, enc, train=False)[0] == (int(enc["attention_mask"].sum()),)


def test_eval_falls_back_when_outputs_are_asked_for_and_the_marker_survives_errors_and_copies():
    plain, fast, enc = _pair(None, switches=("both",))
    fast.eval()
    b, t = enc["attention_mask"].shape
    clone = pickle.loads(pickle.dumps(fast))  # the hooks are module-level functions: it pickles
    assert _rows_seen(clone, enc, train=False)[-1] == (b, 1)
    with torch.no_grad():
        out = fast(**enc, output_hidden_states=True)
    assert [h.shape[:2] for h in out.hidden_states] == [(b, t)] * 3  # hidden states asked for: padded, whole
    with pytest.raises(Exception):
        fast(input_ids=enc["input_ids"][:, :0])  # an empty batch fails inside the forward ...
    assert fast_bert._LOGITS_CALLS.get() == 0  # ... and leaves no marker behind
    assert _rows_seen(copy.deepcopy(fast), enc, train=False)[-1] == (b, 1)
    use_cls_only_last_layer(fast, False)
    use_unpadded_encoder(fast, False)
    assert not fast._forward_pre_hooks and not fast._forward_hooks  # both off: the hooks are gone
    assert _rows_seen(fast, enc, train=False) == [(b, t), (b, t)]


# --- robustness: the transformers internals the fast forward relies on ------------------------

def test_the_fast_forward_is_on_with_the_pinned_transformers():
    """Fails if the fallback is taken on the transformers version pyproject.toml pins."""
    assert fast_bert.FAST_FORWARD_MISSING is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model, _ = pk.load_base("tiny")
    assert model.bert.encoder.unpadded and model.bert.encoder.layer[-1].cls_only


@pytest.mark.parametrize("how", ["missing import", "missing layer part"])
def test_a_missing_internal_warns_once_and_falls_back(how, monkeypatch):
    monkeypatch.setattr(fast_bert, "_warned", [])
    if how == "missing import":
        monkeypatch.setattr(fast_bert, "BertForSequenceClassification", None)
        monkeypatch.setattr(fast_bert, "FAST_FORWARD_MISSING", "ImportError: cannot import name '_active_collector'")
    else:
        monkeypatch.setattr(fast_bert, "_LAYER_PARTS", fast_bert._LAYER_PARTS + ("attention.self.rotary",))
    with pytest.warns(RuntimeWarning, match="fast BERT training forward is off") as caught:
        model, tok = pk.load_base("tiny")
    assert len([w for w in caught if "fast BERT" in str(w.message)]) == 1  # once, not per switch
    assert not getattr(model.bert.encoder, "unpadded", False)
    assert not getattr(model.bert.encoder.layer[-1], "cls_only", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert use_unpadded_encoder(model) is False  # asked again: no second warning
    plain, _ = pk.load_base("tiny", cls_only=False, unpad=False)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    model.train(), plain.train()
    torch.manual_seed(0)
    a = model(**enc).logits
    torch.manual_seed(0)
    assert torch.equal(a, plain(**enc).logits)  # the plain forward, untouched
