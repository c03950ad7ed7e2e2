"""Architecture defaults as data, heads, and tied weights.

Every entry of the architecture table is built tiny from its transformers config class and gets
LoRA with its default targets and adapters in both placements, each the identity at init; an
unknown architecture is refused with the table's closest entries. Heads are found for
classifiers and language models; a tied weight is counted once, warned about, and not merged
unless asked."""

import copy
import warnings

import pytest
import torch
import transformers as T
from torch import nn

import peftkit as pk
from peftkit.bases.tiny import tiny_inputs, tiny_model
from peftkit.core.architectures import ARCHITECTURES, architecture_name
from peftkit.core.surgery import adapter_layers, find_head, lora_layers
from conftest import fresh, perturb
from test_io import assert_untouched, snapshot

_S = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64,
          max_position_embeddings=40)
_TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64,
             max_position_embeddings=40)
_VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8,
               patch_size=4)
TABLE = {
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**_S)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**_S, pad_token_id=1)),
    "xlm-roberta": lambda: T.XLMRobertaForSequenceClassification(T.XLMRobertaConfig(**_S, pad_token_id=1)),
    "electra": lambda: T.ElectraForSequenceClassification(T.ElectraConfig(**_S, embedding_size=8)),
    "albert": lambda: T.AlbertForSequenceClassification(T.AlbertConfig(**_S, embedding_size=8)),
    "deberta-v2": lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(**_S)),
    "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=64, max_position_embeddings=40)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=40,
                                                   bos_token_id=1, eos_token_id=2)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**_S)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_S, num_key_value_heads=1)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_S, num_key_value_heads=1)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_S, num_key_value_heads=1)),
    "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**_S)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                                          vocab_size=64, decoder_start_token_id=0)),
    "mt5": lambda: T.MT5ForConditionalGeneration(T.MT5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                                            vocab_size=64, decoder_start_token_id=0)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64, max_position_embeddings=40)),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(**_VISION, num_channels=1, num_labels=3)),
    "clip": lambda: T.CLIPModel(T.CLIPConfig(text_config=dict(_TEXT, bos_token_id=1, eos_token_id=2),
                                             vision_config=_VISION, projection_dim=8)),
}
ISSUE_LIST = ("bert", "roberta", "distilbert", "albert", "electra", "deberta-v2", "gpt2", "gpt_neox", "llama",
              "mistral", "qwen2", "phi", "t5", "bart", "vit", "clip")


def build(arch):
    torch.manual_seed(0)
    from transformers.utils import logging
    logging.set_verbosity_error()
    return TABLE[arch]().eval()


def inputs(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (2, 6), generator=g)
    if model.main_input_name == "pixel_values":
        return {"pixel_values": torch.randn(2, 1, 8, 8, generator=g)}
    if isinstance(model, T.CLIPModel):
        return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    return {"input_ids": ids}


def output(model, x):
    y = model(**x)
    return y.logits_per_text if isinstance(model, T.CLIPModel) else y.logits


def test_the_table_covers_the_issue_list_and_every_entry_is_tested():
    assert set(ISSUE_LIST) <= set(ARCHITECTURES) and set(ARCHITECTURES) == set(TABLE)


@pytest.mark.parametrize("arch", sorted(TABLE))
def test_defaults_apply_on_every_architecture(arch):
    base = build(arch)
    assert architecture_name(base) == arch
    x = inputs(base)
    with torch.no_grad():
        ref = output(base, x)
    entry = ARCHITECTURES[arch]
    model = pk.apply(copy.deepcopy(base), pk.LoRA(r=2))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, pk.LoRALinear)]
    assert wrapped and all(n.rsplit(".", 1)[-1] in entry.lora for n in wrapped)
    found = {n.rsplit(".", 1)[-1] for n in wrapped}
    assert found == set(entry.lora)  # every default target exists in the architecture
    for placement in ("pfeiffer", "houlsby"):
        model = pk.apply(copy.deepcopy(base), pk.Adapter(size=4, placement=placement))
        assert adapter_layers(model)
        with torch.no_grad():
            torch.testing.assert_close(output(model, x), ref, atol=1e-6, rtol=0)
    n_pf = len(adapter_layers(pk.apply(copy.deepcopy(base), pk.Adapter(size=4))))
    assert len(adapter_layers(model)) > n_pf  # houlsby adds the attention outputs


def test_lora_default_still_means_query_value_on_bert():
    model = pk.apply(fresh("tiny"), pk.LoRA())
    assert sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, pk.LoRALinear)}) == \
        ["query", "value"]
    assert pk.LoRA().to_dict()["targets"] == ["query", "value"]  # cache keys of earlier runs stay valid


def test_explicit_targets_win_over_the_table():
    model = pk.apply(tiny_model("llama"), pk.LoRA(r=2, targets=("k_proj",)))
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, pk.LoRALinear)} == {"k_proj"}


def test_fallback_by_submodule_config_and_by_module_class():
    class Wrapper(nn.Module):  # no config of its own: the transformers model inside has one
        def __init__(self):
            super().__init__()
            self.backbone = T.GPT2Model(T.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    assert architecture_name(Wrapper()) == "gpt2"
    renamed = T.LlamaConfig(**_S, num_key_value_heads=1)
    model = T.LlamaForCausalLM(renamed)
    model.config.model_type = "my-llama"  # unknown name, known classes (LlamaAttention)
    assert architecture_name(model) == "llama"
    pk.apply(model, pk.LoRA(r=2))
    assert len(lora_layers(model)) == 2


def test_unknown_architecture_names_the_closest_entries():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    model = Decoder()
    snap = snapshot(model)
    with pytest.raises(pk.TargetError) as e:
        pk.apply(model, pk.LoRA())
    msg = str(e.value)
    assert "unknown LoRA target 'query'" in msg and "Linear layers in this model: q_proj" in msg
    assert "not in peftkit's architecture table" in msg and "closest entries" in msg and "llama (LoRA q_proj" in msg
    assert "targets=(" in msg
    with pytest.raises(pk.TargetError, match="closest entries"):
        pk.apply(model, pk.Adapter())
    assert_untouched(model, snap)
    pk.apply(model, pk.LoRA(targets=("q_proj",)))  # explicit targets always work


def test_gpt2_error_lists_conv1d_and_embeddings():
    with pytest.raises(pk.TargetError) as e:
        pk.apply(tiny_model("gpt2"), pk.LoRA(targets=("c_atn",)))
    msg = str(e.value)
    assert "Did you mean 'c_attn'" in msg and "Conv1D layers: c_attn" in msg and "Embedding layers: wte" in msg


# -- heads ----------------------------------------------------------------------------------------

def test_heads_of_classifiers_and_language_models(tmp_path):
    model = pk.apply(tiny_model("distilbert"), pk.LoRA(r=2))
    assert model.peftkit.heads == ("pre_classifier", "classifier") and model.peftkit.head == "classifier"
    assert find_head(tiny_model("distilbert")) == "classifier"
    trains = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trains == {"pre_classifier", "classifier"}
    pk.save_adapter(model, tmp_path)
    from safetensors.torch import load_file
    assert {k.split(".")[0] for k in load_file(str(tmp_path / "adapter.safetensors")) if "lora_" not in k} == \
        {"pre_classifier", "classifier"}
    gpt2 = pk.apply(tiny_model("gpt2"), pk.LoRA(r=2))
    assert gpt2.peftkit.heads == ()  # a pretrained lm_head does not train with LoRA
    assert not gpt2.lm_head.weight.requires_grad


def test_head_only_needs_a_head():
    model = T.GPT2Model(T.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    snap = snapshot(model)
    with pytest.raises(pk.TargetError, match="trains the head only, and this GPT2Model has none"):
        pk.apply(model, pk.HeadOnly())
    assert_untouched(model, snap)
    with pytest.raises(pk.TargetError, match="would train nothing"):
        pk.apply(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), pk.HeadOnly(), head="1")
    with pytest.warns(UserWarning, match="shares its weight with transformer.wte.weight"):
        lm = pk.apply(tiny_model("gpt2"), pk.HeadOnly())
    assert lm.peftkit.heads == ("lm_head",) and lm.transformer.wte.weight.requires_grad


# -- tied weights ---------------------------------------------------------------------------------

def unique_total(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("fam", ["gpt2", "t5", "bart"])
def test_report_counts_a_tied_weight_once(fam):
    model = pk.apply(tiny_model(fam), pk.LoRA(r=2))
    df = pk.report(model)
    assert df[df.module == "TOTAL"].total.item() == unique_total(model)
    assert (df.kind.str.endswith("(tied)") & (df.total == 0)).any()  # lm_head: its weight counted before


@pytest.mark.parametrize("target", ["lm_head", "wte"])
def test_lora_on_a_tied_weight_warns_and_merge_refuses(target):
    model = tiny_model("gpt2")
    with pytest.warns(UserWarning, match="tied weight"):
        pk.apply(model, pk.LoRA(r=2, targets=(target,)))
    perturb(model)
    x = tiny_inputs("gpt2")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    wte = model.transformer.wte.weight.detach().clone()
    with pytest.raises(pk.MergeError, match="tied weights.*allow_tied=True"):
        pk.merge(model)
    with pytest.raises(pk.MergeError, match="tied"):
        pk.unload(copy.deepcopy(model))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        before = model(**x).logits
        pk.merge(model, allow_tied=True)  # asked explicitly: both holders change
        assert not torch.equal(model.transformer.wte.weight, wte)
        assert not torch.allclose(model(**x).logits, before, atol=1e-4)  # which is why it is refused
        pk.unmerge(model)
        torch.testing.assert_close(model(**x).logits, before, atol=1e-5, rtol=1e-5)


def test_default_targets_are_not_tied_and_merge_quietly():
    for fam in ("gpt2", "t5", "bart"):
        model = perturb(pk.apply(tiny_model(fam), pk.LoRA(r=2)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pk.merge(model)


def test_adapter_on_t5_reads_the_wrapped_weight():
    """T5's feed-forward reads `wo.weight.dtype`: an adapter on wo must expose it."""
    model = pk.apply(tiny_model("t5"), pk.Adapter(size=4))
    assert all(n.endswith("DenseReluDense.wo") for n, m in model.named_modules() if isinstance(m, pk.AdapterLinear))
    with torch.no_grad():
        model(**tiny_inputs("t5"))
