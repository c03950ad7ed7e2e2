"""Shared fixtures: the method matrix and the models it runs on."""

import copy

import pytest
import torch

torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation (and thrashes on a busy machine)

import peftkit as pk

MODELS = ("mlp", "tiny")


def make_method(key: str, base: str) -> pk.Method:
    """The method matrix. The MLP has no BERT names, so it gets explicit targets."""
    mlp = base == "mlp"
    lora_t = ("fc1", "fc2") if mlp else ("query", "value")
    ad_t = ("fc2",) if mlp else None
    return {
        "lora": pk.LoRA(r=4, alpha=8, targets=lora_t),
        "lora_rslora": pk.LoRA(r=4, alpha=8, targets=lora_t, rslora=True),
        "adapter_pfeiffer": pk.Adapter(size=8, placement="pfeiffer", targets=ad_t),
        "adapter_houlsby": pk.Adapter(size=8, placement="houlsby", targets=("fc1", "fc2") if mlp else None),
        "adapter_deep": pk.Adapter(size=8, variant="deep", layernorm=True, targets=ad_t),
        "hybrid": pk.Hybrid(lora=pk.LoRA(r=4, alpha=8, targets=lora_t), adapter=pk.Adapter(size=8, targets=ad_t)),
        "full": pk.FullFineTune(),
        "head_only": pk.HeadOnly(),
    }[key]


METHOD_KEYS = ("lora", "lora_rslora", "adapter_pfeiffer", "adapter_houlsby", "adapter_deep",
               "hybrid", "full", "head_only")


def make_inputs(base: str, seed: int = 0, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    if base == "mlp":
        return {"x": torch.randn(batch, 16, generator=g)}
    ids = torch.randint(1000, 5000, (batch, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # one padded row, so masking is exercised
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def fresh(base: str, seed: int = 0):
    model, _ = pk.load_base(base, seed=seed)
    return model.eval()


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) for the real MiniLM; tests deep-copy the model before changing it."""
    model, tok = pk.load_base("minilm", seed=0)
    return model.eval(), tok


def perturb(model, seed: int = 1, std: float = 0.05):
    """Give every adapter tensor non-zero values so an identity init cannot hide a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def clone(model):
    return copy.deepcopy(model)
