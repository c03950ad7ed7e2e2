"""Pruning: unstructured and row masks (torch.nn.utils.prune), baking them in, and shrinking
the feed-forward blocks physically, the only kind a dense CPU matmul runs faster for."""

from __future__ import annotations

import re

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import prune

from ..core.targets import replace_module
from .common import merged_plain, linear_layers

# --------------------------------------------------------------------------- pruning

def prune_unstructured(model: nn.Module, amount: float, scope: str = "global", skip="head",
                       inplace: bool = False) -> nn.Module:
    """Zero the `amount` fraction of smallest-magnitude weights: across all Linears or per layer.

    Masks are torch.nn.utils.prune reparametrizations; `make_permanent` bakes them in.
    """
    _check_amount(amount)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope={scope!r} is not one of 'global', 'layer'.")
    model = merged_plain(model, inplace)
    lins = list(linear_layers(model, skip).values())
    if scope == "global":
        prune.global_unstructured([(m, "weight") for m in lins], pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for m in lins:
            prune.l1_unstructured(m, "weight", amount=amount)
    return model


def prune_rows(model: nn.Module, amount: float, skip="head", inplace: bool = False) -> nn.Module:
    """Structured: zero the `amount` fraction of output rows with the smallest L2 norm, per layer."""
    _check_amount(amount)
    model = merged_plain(model, inplace)
    for m in linear_layers(model, skip).values():
        prune.ln_structured(m, "weight", amount=amount, n=2, dim=0)
    return model


# (inner, outer) feed-forward pairs by architecture: BERT-style and DistilBERT-style names.
FFN_PAIRS = [(r"(.*)\.intermediate\.dense$", r"\1.output.dense"), (r"(.*)\.ffn\.lin1$", r"\1.ffn.lin2")]


def ffn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    names = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    pairs = []
    for n in sorted(names):
        for pat, repl in FFN_PAIRS:
            if re.match(pat, n):
                outer = re.sub(pat, repl, n)
                if outer in names:
                    pairs.append((n, outer))
    return pairs


def shrink_ffn(model: nn.Module, amount: float, inplace: bool = False) -> nn.Module:
    """Remove the `amount` fraction of feed-forward neurons per block, physically.

    A neuron j is scored by ||W_in[j]|| * ||W_out[:, j]|| (L2 norms of what feeds it and what it
    feeds); the lowest go, and both Linears are rebuilt smaller, so every matmul shrinks.
    """
    _check_amount(amount)
    model = merged_plain(model, inplace)
    pairs = ffn_pairs(model)
    if not pairs:
        raise ValueError("no feed-forward pair found (BERT's intermediate/output.dense or DistilBERT's "
                         "ffn.lin1/lin2): shrink_ffn does not know this architecture; use prune_rows.")
    for inner_name, outer_name in pairs:
        inner, outer = model.get_submodule(inner_name), model.get_submodule(outer_name)
        score = inner.weight.detach().norm(dim=1) * outer.weight.detach().norm(dim=0)
        keep_n = max(1, inner.out_features - int(round(amount * inner.out_features)))
        keep = score.topk(keep_n).indices.sort().values
        new_in = nn.Linear(inner.in_features, keep_n, bias=inner.bias is not None)
        new_out = nn.Linear(keep_n, outer.out_features, bias=outer.bias is not None)
        with torch.no_grad():
            new_in.weight.copy_(inner.weight[keep])
            if inner.bias is not None:
                new_in.bias.copy_(inner.bias[keep])
            new_out.weight.copy_(outer.weight[:, keep])
            if outer.bias is not None:
                new_out.bias.copy_(outer.bias)
        replace_module(model, inner_name, new_in.to(inner.weight.dtype))
        replace_module(model, outer_name, new_out.to(outer.weight.dtype))
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "intermediate_size"):
        cfg.intermediate_size = model.get_submodule(pairs[0][0]).out_features
    return model


def _check_amount(amount) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise ValueError(f"amount={amount!r}: give the fraction to prune, at least 0 and below 1.")


def make_permanent(model: nn.Module) -> nn.Module:
    """Bake every pruning mask into its weight and drop the reparametrization (in place)."""
    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")
    return model


def sparsity_report(model: nn.Module) -> pd.DataFrame:
    """Zeros per Linear weight (masked or baked in), with a TOTAL row."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight.detach()
            rows.append({"layer": name, "shape": "x".join(map(str, w.shape)), "params": w.numel(),
                         "zeros": int((w == 0).sum()), "pruning_mask": prune.is_pruned(m)})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["sparsity"] = df.zeros / df.params
    total = {"layer": "TOTAL", "shape": "", "params": int(df.params.sum()), "zeros": int(df.zeros.sum()),
             "pruning_mask": bool(df.pruning_mask.any())}
    total["sparsity"] = total["zeros"] / total["params"]
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)
