"""Merging adapters: several trained adapters of one method combined into one ordinary adapter.

Every LoRA merge works on the updates themselves, dW_i = s_i B_i A_i per target layer (s_i is
alpha/r, or alpha/sqrt(r) with rsLoRA), never on A and B separately: B A is unchanged when a
rank component of A is negated together with B's, so the signs and magnitudes of A or B alone
mean nothing, and averaging them (what PEFT's "linear" does) is not the average of the updates.

    how               dW of the result                                        rank      default weights
    task_arithmetic   sum_i w_i dW_i (Ilharco et al., ICLR 2023)               sum r_i   1/n (the mean)
    cat               sum_i w_i dW_i, the factors concatenated (PEFT's "cat")  sum r_i   1   (the sum)
    svd               the best rank-k approximation of sum_i w_i dW_i          k         1/n
    ties              trim each w_i dW_i to its top `density` share by         full      1
                      magnitude, elect a sign per entry (that of the sum),
                      average the entries that agree (Yadav et al., NeurIPS 2023)
    dare              sum_i w_i m_i * dW_i / density, m_i ~ Bernoulli(density) full      1/n
                      per entry, seeded (Yu et al., ICML 2024)

`task_arithmetic` and `cat` are exact: A' stacks the A_i and B' the w_i s_i B_i, so the
result's rank is the sum of the ranks. `svd` is exact when k reaches sum r_i (rank(sum) <=
sum r_i), and otherwise the best rank-k approximation in Frobenius and spectral norm
(Eckart-Young). TIES and DARE act entry by entry, so their result is a dense matrix: by default
it is kept exactly (rank min(out, in): D as one factor, the identity as the other), and `rank=k`
truncates it by SVD as `svd` does.
Every result has scale 1 (alpha = r, no rsLoRA): the scale is folded into B.

**Bottleneck adapters** (x + up(act(down(x)))) can only be averaged parameter by parameter:
theta = sum_i w_i theta_i with the weights normalised to sum to 1 (`how="average"`, or
"task_arithmetic"). Because of the nonlinearity between down and up, this is *not* the average
of the adapters' functions, nor of their outputs: up(act(mean down)) != mean up(act(down)). It
means something only when the adapters lie near each other in parameter space, as adapters
fine-tuned briefly from one shared initialisation do (peftkit's seeds give every domain the same
initial adapter); adapters trained from different initialisations have their bottleneck units in
unrelated orders (any permutation of the units is the same function), and their average can be
worse than either. Measure it; notebook 10 does. TIES, DARE, cat and svd are defined on LoRA's
low-rank update and are refused for adapters.

**Heads.** Each adapter carries its own task head (trained with it). The merged head is the
weighted mean of the heads, with the weights normalised to sum to 1, whatever `how`.

The result is an in-memory `AdapterFile` (files/adapter_file.py): `load_adapter(fresh_base,
merged)`, `save_adapter(merged, folder)` and `Deployer.register(name, merged)` take it as they
take a folder, and a base with it loaded exports to PEFT with `export_peft`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.methods import Adapter, LoRA
from ..core.surgery import applied
from ..files.adapter_file import AdapterFile, adapter_state, as_adapter, fingerprint
from ..layers.names import LORA_PREFIX

HOWS = ("task_arithmetic", "ties", "dare", "cat", "svd")
ADAPTER_HOWS = ("average", "task_arithmetic")
MERGE_NAMES = {"task_arithmetic": "Task arithmetic", "ties": "TIES", "dare": "DARE", "cat": "Concatenation",
               "svd": "SVD", "average": "Average"}  # each `how` as the papers and the notebooks' prose name it
DEFAULT_WEIGHTS = {"task_arithmetic": "mean", "svd": "mean", "dare": "mean", "average": "mean",
                   "cat": "ones", "ties": "ones"}  # ties' disjoint mean already averages
DEFAULT_DENSITY = {"ties": 0.2,  # TIES keeps the top 20% (k = 20 in Yadav et al.)
                   "dare": 0.5}  # Yu et al. drop 90% of an LLM's delta; small models tolerate far less


class MergeInputError(ValueError):
    """The adapters cannot be merged as asked (different methods, bases, targets, shapes, weights)."""


def as_merge_input(x) -> AdapterFile:
    """An AdapterFile from a folder, an AdapterFile, or a model with a method applied (copied)."""
    if isinstance(x, nn.Module):
        done = applied(x)
        if done is None:
            raise MergeInputError(f"a {type(x).__name__} with no peftkit method applied cannot be merged: pass "
                                  "trained adapters (models after apply and fit, folders or AdapterFiles).")
        head = done.heads if len(done.heads) > 1 else done.head
        tensors = {k: v.detach().float().cpu().clone() for k, v in adapter_state(x).items()}
        meta = {"format": "peftkit-adapter", "method": done.method.to_dict(), "head": done.head,
                "base": fingerprint(x, head, done.method),
                **({"heads": list(done.heads)} if len(done.heads) > 1 else {})}
        return as_adapter(AdapterFile(None, done.method, head, tensors, meta))
    return as_adapter(x)


def check_compatible(adapters: list[AdapterFile]) -> None:
    """Raise MergeInputError unless the adapters share method family, base, targets, head and
    (for bottleneck adapters, whose parameters are averaged one by one) every shape."""
    if not adapters:
        raise MergeInputError("merge_adapters needs at least one adapter; got none.")
    first = adapters[0]
    for i, a in enumerate(adapters):
        if not isinstance(a.method, (LoRA, Adapter)):
            raise MergeInputError(f"adapter {i} is a {a.method.describe()}: merge_adapters combines LoRA adapters or "
                                  "bottleneck adapters only (a full fine-tune or a head alone has no update to merge; "
                                  "average such models' weights yourself).")
        if type(a.method) is not type(first.method):
            raise MergeInputError(f"adapter {i} is a {a.method.describe()} but adapter 0 a {first.method.describe()}: "
                                  "only adapters of one method can be merged into one.")
        base, base0 = a.meta.get("base", {}), first.meta.get("base", {})
        for key in ("architecture", "params_sha256", "stable_values_sha256"):
            if base.get(key) != base0.get(key):
                raise MergeInputError(f"adapter {i} was trained on a different base than adapter 0 (their {key} "
                                      f"differ: {base.get('architecture')} vs {base0.get('architecture')}); updates "
                                      "of different bases cannot be added. Merge adapters of one base.")
        if a.method.targets != first.method.targets or set(a.tensors) != set(first.tensors):
            extra = sorted(set(a.tensors) ^ set(first.tensors))[:3]
            raise MergeInputError(f"adapter {i} adapts other layers than adapter 0 (targets {a.method.targets} vs "
                                  f"{first.method.targets}; e.g. {extra}): retrain them with the same targets.")
        if a.head != first.head:
            raise MergeInputError(f"adapter {i} has head {a.head!r}, adapter 0 {first.head!r}; merge adapters of one task.")
        not_lora = [k for k in a.tensors if not _is_lora(k)]
        bad = [k for k in not_lora if a.tensors[k].shape != first.tensors[k].shape]
        if bad:
            what = ("bottleneck adapters are averaged parameter by parameter, so their sizes must match"
                    if isinstance(a.method, Adapter) else "the heads differ (a different num_labels?)")
            raise MergeInputError(f"adapter {i}: tensor {bad[0]} has shape {tuple(a.tensors[bad[0]].shape)}, adapter 0 "
                                  f"{tuple(first.tensors[bad[0]].shape)}; {what}.")


def _is_lora(name: str) -> bool:
    return any(part.startswith(LORA_PREFIX) for part in name.split("."))


def mixing_weights(weights, n: int, how: str) -> list[float]:
    """The weights as n finite floats: the default of `how` when None; a clear error otherwise."""
    if weights is None:
        return [1.0 / n] * n if DEFAULT_WEIGHTS[how] == "mean" else [1.0] * n
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise MergeInputError(f"weights={weights!r:.80} must be a sequence of {n} numbers, one per adapter.") from None
    if len(w) != n:
        raise MergeInputError(f"{len(w)} weights for {n} adapters: give one weight per adapter, in their order.")
    if not all(math.isfinite(x) for x in w):
        raise MergeInputError(f"weights={w} hold NaN or inf; give finite numbers.")
    return w


def _normalised(w: list[float], what: str) -> list[float]:
    total = sum(w)
    if not total > 0:
        raise MergeInputError(f"the weights {w} sum to {total:g}, so they cannot be normalised for {what}; give "
                              "weights with a positive sum.")
    return [x / total for x in w]


def _pairs(tensors: dict) -> list[tuple[str, str]]:
    """(A name, B name) of every LoRA factor pair: lora_A with lora_B, lora_out_A with lora_out_B, ..."""
    names = [k for k in tensors if _is_lora(k) and k.endswith("_A")]
    return sorted((a, a[:-1] + "B") for a in names)


def _delta(t: AdapterFile, a: str, b: str) -> torch.Tensor:
    """dW = s B A as a (out, in...) matrix in float64, the kernel dims of a conv flattened into `in`."""
    A, B = t.tensors[a].double(), t.tensors[b].double()
    r = A.shape[0]
    scale = t.method.alpha / (math.sqrt(r) if t.method.rslora else r)
    return scale * B.reshape(B.shape[0], r) @ A.reshape(r, -1)


def _factors(D: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (k, in), B (out, k)) with B A the best rank-k approximation of D; the singular values
    split evenly between the two factors (sqrt on each side), so neither dwarfs the other. At
    k = min(out, in), D itself with an identity: exact, and no SVD to pay for."""
    out_dim, in_dim = D.shape
    if k == min(out_dim, in_dim):
        eye = torch.eye(k, dtype=D.dtype)
        return (D, eye) if out_dim <= in_dim else (eye, D)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    k_eff = min(k, S.numel())
    root = S[:k_eff].sqrt()
    A, B = root[:, None] * Vh[:k_eff], U[:, :k_eff] * root
    if k_eff < k:  # a rank beyond min(out, in): zero rows, so every layer has the same r
        A = torch.cat([A, A.new_zeros(k - k_eff, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], k - k_eff)])
    return A, B


def ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging of (weighted) updates: trim each to its top `density` share of entries by
    magnitude, elect each entry's sign as that of the trimmed sum, average the agreeing nonzeros."""
    trimmed = []
    for d in deltas:
        keep = max(1, math.ceil(density * d.numel()))
        if keep >= d.numel():
            trimmed.append(d)
            continue
        cut = d.abs().flatten().kthvalue(d.numel() - keep).values  # entries above it: the top `keep`
        trimmed.append(torch.where(d.abs() > cut, d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)  # (n, out, in)
    sign = torch.sign(stack.sum(0))  # the elected sign: that of the larger total mass
    agree = (torch.sign(stack) == sign) & (stack != 0)
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare(deltas: list[torch.Tensor], weights: list[float], density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry of each update with probability 1 - density, rescale the rest by
    1/density (so the expectation is unchanged), then sum with the weights."""
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        mask = torch.rand(d.shape, generator=generator, dtype=torch.float64) < density
        out += w * torch.where(mask, d / density, torch.zeros_like(d))
    return out


def _merge_lora(adapters, how, w, density, seed, rank):
    pairs = _pairs(adapters[0].tensors)
    if how in ("task_arithmetic", "cat"):
        r_out = sum(a.method.r for a in adapters)
    elif how == "svd":
        r_out = rank or max(a.method.r for a in adapters)
    else:
        t = adapters[0].tensors  # dW is (out, in...) = (B's rows, A's columns per rank)
        r_out = rank or max(min(t[b].shape[0], t[a][0].numel()) for a, b in pairs)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for a_name, b_name in pairs:  # sorted: DARE's draws follow one fixed order of layers
        A0, B0 = adapters[0].tensors[a_name], adapters[0].tensors[b_name]
        if how in ("task_arithmetic", "cat"):  # exact: stack the factors, fold scale and weight into B
            A = torch.cat([t.tensors[a_name].double().reshape(t.method.r, -1) for t in adapters])
            B = torch.cat([wi * t.method.alpha / (math.sqrt(t.method.r) if t.method.rslora else t.method.r)
                           * t.tensors[b_name].double().reshape(B0.shape[0], t.method.r)
                           for t, wi in zip(adapters, w)], dim=1)
        else:
            deltas = [_delta(t, a_name, b_name) for t in adapters]
            if how == "svd":
                D = sum(wi * d for wi, d in zip(w, deltas))
            elif how == "ties":
                D = ties([wi * d for wi, d in zip(w, deltas)], density)
            else:
                D = dare(deltas, w, density, gen)
            A, B = _factors(D, r_out)
        out[a_name] = A.float().reshape(r_out, *A0.shape[1:]).contiguous()
        out[b_name] = B.float().reshape(B0.shape[0], r_out, *B0.shape[2:]).contiguous()
    spec = LoRA(r=r_out, alpha=float(r_out), dropout=adapters[0].method.dropout, targets=adapters[0].method.targets)
    return spec, out


def merge_adapters(models_or_dirs, how: str = "task_arithmetic", weights=None, density: float | None = None,
                   seed: int = 0, rank: int | None = None) -> AdapterFile:
    """Merge trained adapters of one method (folders, AdapterFiles or models) into one adapter.

    how: for LoRA "task_arithmetic", "ties", "dare", "cat" or "svd" (see the module docstring);
    for bottleneck adapters "average" (or "task_arithmetic"). weights: one per adapter (default
    per `how`, DEFAULT_WEIGHTS). density: the share kept by "ties" (default 0.2) and "dare"
    (default 0.5). seed: DARE's draws. rank: the result's rank for "svd" (default the largest
    input rank), "ties" and "dare" (default exact). Returns an in-memory AdapterFile.
    """
    adapters = [as_merge_input(x) for x in (models_or_dirs if isinstance(models_or_dirs, (list, tuple))
                                             else [models_or_dirs])]
    check_compatible(adapters)
    is_lora = isinstance(adapters[0].method, LoRA)
    allowed = HOWS if is_lora else ADAPTER_HOWS
    if how not in allowed:
        why = ("" if is_lora else " TIES, DARE, cat and svd act on LoRA's low-rank update; bottleneck adapters can "
               "only be averaged parameter by parameter.")
        raise MergeInputError(f"how={how!r} is not a merge of {adapters[0].method.label}: choose one of {list(allowed)}.{why}")
    if density is not None and how not in ("ties", "dare"):
        raise MergeInputError(f"density={density!r} applies to how='ties' or 'dare' only, not {how!r}.")
    density = DEFAULT_DENSITY.get(how) if density is None else density
    if density is not None and not (isinstance(density, (int, float)) and not isinstance(density, bool)
                                    and 0 < density <= 1):
        raise MergeInputError(f"density={density!r} must be a share in (0, 1]: the fraction of entries kept.")
    if rank is not None and not (is_lora and how in ("svd", "ties", "dare")):
        raise MergeInputError(f"rank={rank!r} applies to how='svd', 'ties' or 'dare' only (task_arithmetic and cat "
                              "are exact, with the ranks added up).")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeInputError(f"rank={rank!r} must be a positive integer.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeInputError(f"seed={seed!r} must be an integer.")
    w = mixing_weights(weights, len(adapters), how)
    head_w = _normalised(w, "the heads' weighted mean")
    if is_lora:
        method, tensors = _merge_lora(adapters, how, w, density, seed, rank)
    else:
        method, tensors = adapters[0].method, {}
    for k in adapters[0].tensors:
        if k in tensors:
            continue
        mix = head_w  # heads always; an adapter's own parameters too (normalised weights)
        tensors[k] = sum(wi * t.tensors[k].double() for wi, t in zip(mix, adapters)).float()
    first = adapters[0]
    meta = {k: first.meta[k] for k in ("head", "heads", "base") if k in first.meta}
    meta.update({"format": "peftkit-adapter", "method": method.to_dict(),
                 "merged": {"how": how, "n": len(adapters), "weights": w, "density": density,
                            "seed": seed, "rank": rank}})
    return as_adapter(AdapterFile(None, method, first.head, tensors, meta))


def lora_deltas(adapter) -> dict[str, torch.Tensor]:
    """{A name: dW = s B A (float64, (out, in...) flattened)} of a LoRA adapter (folder, AdapterFile or model)."""
    a = as_merge_input(adapter)
    if not isinstance(a.method, LoRA):
        raise MergeInputError(f"lora_deltas needs a LoRA adapter, got {a.method.describe()}.")
    return {an: _delta(a, an, bn) for an, bn in _pairs(a.tensors)}


