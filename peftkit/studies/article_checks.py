"""The seed article checked against peftkit: each defect of its layers measured with peftkit's own
code, its decision chain set beside peftkit's rules, and its comparison words measured.

A defect is reproduced by changing one thing in a peftkit layer (the scale set to 1, the base left
trainable, a merge that leaves the LoRA path on, an adapter's `up` drawn at random, a LayerNorm
after the residual, one rounding scale per tensor), then measured against peftkit's behaviour on
the same model and inputs. Every function returns a DataFrame; notebook 01 shows the layer
tables, notebook 06 the decision chain, notebook 04 the claims. docs/article.md lists every defect
with the article's line numbers.
"""

from __future__ import annotations

import copy
import itertools
import math

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..bases.models import load_base
from ..compress import (
    model_size,
    quantization_error,
    quantize_codes,
    quantize_int8,
    simulate_kbit,
)
from ..core.methods import Adapter, LoRA
from ..core.surgery import adapter_layers, apply, find_head, lora_layers, merge, remove
from ..layers.lora import LoRALinear
from . import stats
from ..style import readable
from .summary import _frame, accuracy_difference, paired_ratio
from .selection import (
    ARTICLE_CHOICES,
    ARTICLE_INPUTS,
    ARTICLE_RULES,
    METHOD_LABELS,
    RULES,
    choose_method,
)

# --- the layers' defects, measured -------------------------------------------------------------------


def _copy(model, seed: int):
    """A private eval-mode copy of `model` (a load_base BERT), or the tiny random BERT."""
    if model is None:
        model, _ = load_base("tiny", seed=seed)
    return copy.deepcopy(model).eval()


def _inputs(model, seed: int, batch: int = 4, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(model.config.vocab_size, 5000), (batch, length), generator=g)  # word pieces
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _hidden(model, inputs) -> torch.Tensor:
    """The encoder's output (the pretrained part), without the task head."""
    return model.eval().base_model(**inputs).last_hidden_state


def _maxdiff(a, b) -> float:
    return float((a - b).abs().max())


def lora_scale_demo(ranks=(4, 8, 16, 32, 64), alpha: float = 16, width: int = 256, lr: float = 1e-3,
                    seed: int = 0) -> pd.DataFrame:
    """The size of LoRA's update after one Adam step (the article's optimizer), by rank, with no
    scale (the article's LoRALinear, lines 95-100), alpha/r (peftkit, the LoRA paper) and
    alpha/sqrt(r) (rsLoRA): ||s·BA||_F and its ratio to the smallest rank's."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Linear(width, width)
    x, target = torch.randn(64, width, generator=g), torch.randn(64, width, generator=g)
    rows = []
    for r in ranks:
        for scheme, s in (("none (the article)", 1.0), ("alpha/r (peftkit)", alpha / r),
                          ("alpha/sqrt(r) (rsLoRA)", alpha / math.sqrt(r))):
            torch.manual_seed(seed)
            layer = LoRALinear(copy.deepcopy(base), r=r, alpha=alpha)
            layer.scale = s  # the one change: the article's layer multiplies BA by nothing
            opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr)
            F.mse_loss(layer(x), target).backward()
            opt.step()
            rows.append({"r": r, "scale": scheme, "s": s, "update norm": float(layer.delta_weight().detach().norm())})
    df = pd.DataFrame(rows)
    first = df[df.r == ranks[0]].set_index("scale")["update norm"]
    df[f"vs r={ranks[0]}"] = df["update norm"] / df.scale.map(first)
    return df


def trainable_base_demo(model=None, r: int = 8, steps: int = 3, lr: float = 1e-3, seed: int = 0) -> pd.DataFrame:
    """A few Adam steps of LoRA with the base frozen (peftkit) and with every parameter handed to
    the optimizer (the article, lines 76 and 321): trainable parameters, and how far the base's
    encoder output has moved once the LoRA layers are removed again."""
    base = _copy(model, seed)
    inputs = _inputs(base, seed)
    labels = torch.randint(0, base.config.num_labels, (len(inputs["input_ids"]),),
                           generator=torch.Generator().manual_seed(seed))
    ref = _hidden(base, inputs)
    head = find_head(base)
    rows = []
    for setting, everything in (("peftkit: base frozen", False), ("the article: every parameter trains", True)):
        m = apply(copy.deepcopy(base), LoRA(r=r, alpha=2 * r))
        if everything:
            for p in m.parameters():
                p.requires_grad_(True)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        torch.manual_seed(seed)
        m.train()
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(m(**inputs).logits, labels).backward()
            opt.step()
        lora = sum(p.numel() for l in lora_layers(m) for p in (l.lora_A, l.lora_B))
        total = sum(p.numel() for p in m.parameters())
        remove(m)  # the LoRA layers out: what is left is the base as training left it
        changed = [n for n, p in m.named_parameters() if not (head and (n == head or n.startswith(head + ".")))
                   and not torch.equal(p, base.get_parameter(n))]
        rows.append({"setting": setting, "trainable": sum(p.numel() for p in params), "LoRA factors": lora,
                     "trainable % of the model": 100 * sum(p.numel() for p in params) / total,
                     "base tensors changed": len(changed),
                     "max |encoder output - base's| without LoRA": _maxdiff(_hidden(m, inputs), ref)})
    return pd.DataFrame(rows)


def merge_demo(model=None, r: int = 8, std: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Merging with and without switching the LoRA path off, on a LoRA with a non-zero update: the
    encoder's output against the unmerged model's, and against the same model with its update
    doubled (B times 2). The base's row shows how large the update's own effect is."""
    m = apply(_copy(model, seed), LoRA(r=r, alpha=2 * r))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(m):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
    inputs = _inputs(m, seed)
    doubled, article, ours = copy.deepcopy(m), copy.deepcopy(m), copy.deepcopy(m)
    with torch.no_grad():
        for layer in lora_layers(doubled):
            layer.lora_B.mul_(2)  # the update counted twice, by construction
        for layer in lora_layers(article):
            layer.base.weight.add_(layer.delta_weight())  # W + s·BA written, the LoRA path left on
    merge(ours)
    once = _hidden(ours, inputs)
    merge(ours)  # a second call changes nothing
    unmerged, twice = _hidden(m, inputs), _hidden(doubled, inputs)
    rows = [("no LoRA (the base)", _hidden(remove(copy.deepcopy(m)), inputs)),
            ("the article: weight merged, LoRA path still on", _hidden(article, inputs)),
            ("peftkit merge()", once), ("peftkit merge() called twice", _hidden(ours, inputs))]
    return pd.DataFrame([{"setting": s, "max |output - unmerged|": _maxdiff(y, unmerged),
                          "max |output - update doubled|": _maxdiff(y, twice)} for s, y in rows])


def adapter_init_demo(model=None, size: int = 8, seed: int = 0) -> pd.DataFrame:
    """How far an adapter moves the pretrained encoder's output before any training: peftkit's
    (up = 0; a LayerNorm, if any, inside the branch) against the article's Xavier-drawn `up`
    (lines 164-168) and its LayerNorm after the residual sum (lines 180-186)."""
    base = _copy(model, seed)
    inputs = _inputs(base, seed)
    ref = _hidden(base, inputs)
    rows = []
    for setting in ("peftkit: up = 0", "peftkit: LayerNorm inside the branch",
                    "the article: up drawn Xavier-uniform", "the article: LayerNorm after the residual"):
        torch.manual_seed(seed)
        m = apply(copy.deepcopy(base), Adapter(size=size, placement="houlsby", layernorm="inside" in setting))
        for ad in adapter_layers(m):
            if "Xavier" in setting:
                nn.init.xavier_uniform_(ad.adapter_branch.up.weight)
            if "after the residual" in setting:
                ad.adapter_branch = nn.Sequential(ad.adapter_branch, nn.LayerNorm(ad.out_features))
        rows.append({"setting": setting, "max |encoder output - base's| at initialisation": _maxdiff(_hidden(m, inputs), ref)})
    return pd.DataFrame(rows)


def quantization_demo(model=None, seed: int = 0) -> pd.DataFrame:
    """The article's 8-bit rounding (one scale per tensor, the result stored back in float32, lines
    450-459) against one scale per output row and against real int8 storage: bytes, the weights'
    relative error, the encoder output's change, and on one matrix with a single outlier (as
    trained weights have) the relative error and the share of its weights rounded to zero."""
    bits = 8
    m = _copy(model, seed)
    inputs = _inputs(m, seed)
    ref = _hidden(m, inputs)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 256, generator=g) * 0.02
    w[0, 0] = 1.0  # one outlier
    q8 = quantize_int8(m)

    def outlier(per_channel):
        codes, scale = quantize_codes(w, bits, per_channel)
        return float(((codes.float() * scale - w).norm() / w.norm())), float((codes == 0).float().mean())

    rows = []
    for setting, per_channel, stored, out in (
            ("the article: per tensor, stored as float32", False, model_size(m, "fp32"),
             _hidden(simulate_kbit(m, bits, per_channel=False), inputs)),
            ("per output row, still float32 (compress.simulate_kbit)", True, model_size(m, "fp32"),
             _hidden(simulate_kbit(m, bits, per_channel=True), inputs)),
            ("int8 storage, per row (compress.quantize_int8)", True, model_size(q8), _hidden(q8, inputs))):
        err, zeros = outlier(per_channel)
        rows.append({"setting": setting, "bytes": stored, "vs float32": stored / model_size(m, "fp32"),
                     "weight relative error": float(quantization_error(m, bits, per_channel).iloc[-1].rel_err),
                     "max |encoder output change|": _maxdiff(out, ref),
                     "outlier matrix: relative error": err, "outlier matrix: weights rounded to 0": zeros})
    return pd.DataFrame(rows)


@torch.no_grad()
def init_scale_demo(widths=(64, 512, 4096), out: int = 256, seed: int = 0) -> pd.DataFrame:
    """The spread of a layer's output on unit-variance inputs: a base weight drawn standard normal
    (the article's LoRALinear, line 76) against nn.Linear's own initialisation."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for d in widths:
        x = torch.randn(512, d, generator=g)
        torch.manual_seed(seed)
        rows.append({"in_features": d, "output std, weight ~ N(0, 1) (the article)":
                     float((x @ torch.randn(out, d, generator=g).T).std()),
                     "output std, nn.Linear's init": float(nn.Linear(d, out, bias=False)(x).std())})
    return pd.DataFrame(rows)


# --- the decision chain, beside peftkit's --------------------------------------------------------


def article_tree_markdown() -> str:
    """The article's chain in its own words, one numbered line per test, from ARTICLE_RULES."""
    lines = []
    for i, rule in enumerate(ARTICLE_RULES, 1):
        test = " and ".join(f"{q} is `{'/'.join(v)}`" for q, v in rule.when.items())
        lines.append(f"{i}. {'if ' + test if test else 'otherwise'}: **{METHOD_LABELS[rule.method.name]}** "
                     f"(rule `{rule.name}`)")
    vocab = "; ".join(f"{q}: {'/'.join(ARTICLE_CHOICES[q])}" for q in ARTICLE_INPUTS)
    return "\n".join(lines) + f"\n\nIts vocabulary: {vocab}."


def article_vs_peftkit() -> pd.DataFrame:
    """Every combination of the article's vocabulary (in its words): the article's answer and rule,
    peftkit's (RULES, its other questions at their defaults) and, where they part, both reasons."""
    rows = []
    for combo in itertools.product(*(ARTICLE_CHOICES[q] for q in ARTICLE_INPUTS)):
        answers = dict(zip(ARTICLE_INPUTS, combo))
        theirs, ours = choose_method(ARTICLE_RULES, **answers), choose_method(RULES, **answers)
        agree = theirs.method.name == ours.method.name
        rows.append({**answers, "article": METHOD_LABELS[theirs.method.name], "article rule": theirs.rule.name,
                     "peftkit": METHOD_LABELS[ours.method.name], "peftkit rule": ours.rule.name, "agree": agree,
                     "article's reason": "" if agree else theirs.reasons[0],
                     "peftkit's reason": "" if agree else ours.reasons[0]})
    return pd.DataFrame(rows)


def disagreements(grid: pd.DataFrame) -> pd.DataFrame:
    """The rows of `article_vs_peftkit()` where the two part, grouped by the pair of rules that
    decided: how many combinations, the two answers, and the reason peftkit's rule gives."""
    reasons = {r.name: r.reason for r in RULES}
    out = (grid[~grid.agree].groupby(["article rule", "article", "peftkit rule", "peftkit"], sort=False)
           .size().rename("combinations").reset_index())
    out["peftkit's reason"] = out["peftkit rule"].map(reasons)
    return out


def disagreement_text(grid: pd.DataFrame) -> str:
    """`disagreements(grid)` as Markdown, one line per pair of deciding rules."""
    lines = []
    for r in disagreements(grid).to_dict("records"):
        n, why = r["combinations"], r["peftkit's reason"]
        lines.append(f"- {n} combination{'s' if n > 1 else ''}: the article's `{r['article rule']}` answers "
                     f"{r['article']}; peftkit's `{r['peftkit rule']}` answers {r['peftkit']}, because {why}")
    return "\n".join(lines) or "- none: the two tables agree on every combination."


# --- the comparison words, measured ------------------------------------------------------------

# method -> the article's words for training time and storage (its table, lines 263-267)
CLAIMS = {
    "full": {"training time": "long", "storage": "high"},
    "lora": {"training time": "shorter", "storage": "extremely low"},
    "adapter": {"training time": "medium", "storage": "low"},
}
# each word as a range of the measured ratio against the full fine-tune: [low, high)
TIME_WORDS = {"long": (0.9, float("inf")), "medium": (0.6, 0.9), "shorter": (0.0, 0.75)}
STORAGE_WORDS = {"high": (0.5, float("inf")), "low": (0.0, 0.10), "extremely low": (0.0, 0.01)}


REFERENCE = "reference"  # the full fine-tune's verdicts: the ratios are measured against it


def claims_table(df: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per method family in `df` (compare() rows, one or more seeds each, with a full
    fine-tune): the article's words for training time and storage, the measured ratio to the full
    fine-tune (paired by seed, with its interval) and each claim's verdict, computed from the
    interval: "holds" (inside the word's range), "does not hold" (outside it) or "cannot tell at
    this precision" (across its edge, or one run only). Storage is exact (file bytes). Also the
    accuracy difference to the full fine-tune with its interval."""
    df = _frame(df)
    full = df[df.method == "full"]
    if full.empty:
        raise ValueError("claims_table needs a full fine-tune row to compare against; include FullFineTune().")
    full = full[full.config == full.groupby("config", sort=False).size().idxmax()]  # the one with most seeds
    rows = []
    for method, words in CLAIMS.items():
        d = df[df.method == method]
        if d.empty:
            continue
        # the family's most typical member: the median step time
        per = d.groupby("config", sort=False).sec_per_step.median()
        runs = d[d.config == (per - per.median()).abs().idxmin()]
        t = paired_ratio(runs, full, "sec_per_step", level)
        storage = float(runs.adapter_bytes.iloc[0]) / float(full.adapter_bytes.iloc[0])
        acc, _ = accuracy_difference(runs, full, level)
        if method == "full":
            acc = stats.Interval(0.0, 0.0, 0.0, "the reference")
        word_t, word_s = words["training time"], words["storage"]
        rows.append({"method": method, "measured run": runs.label.iloc[0], "seeds": t.n_seeds if t else 0,
                     "claimed training time": word_t,
                     "step time vs full": round(t.estimate, 3) if t else math.nan,
                     "time lo": round(t.lo, 3) if t else math.nan, "time hi": round(t.hi, 3) if t else math.nan,
                     # the full fine-tune is what every ratio divides by: its own claims cannot be tested here
                     "time claim": REFERENCE if method == "full" else
                     stats.verdict(t.lo, t.hi, *TIME_WORDS[word_t]) if t else stats.CANNOT_TELL,
                     "claimed storage": word_s, "storage vs full": round(storage, 5),
                     "storage claim": REFERENCE if method == "full" else
                     stats.verdict(storage, storage, *STORAGE_WORDS[word_s]),
                     "accuracy": round(float(runs.accuracy.mean()), 4),
                     "accuracy vs full (pt)": round(100 * acc.estimate, 2) if acc else math.nan,
                     "accuracy lo (pt)": round(100 * acc.lo, 2) if acc else math.nan,
                     "accuracy hi (pt)": round(100 * acc.hi, 2) if acc else math.nan,
                     "accuracy vs full": REFERENCE if method == "full" else
                     stats.direction(acc.lo, acc.hi) if acc else stats.CANNOT_TELL})
    return pd.DataFrame(rows)


def claims_text(table: pd.DataFrame) -> str:
    """`claims_table` in sentences (Markdown list), every number and verdict read from the table."""
    lines = []
    for r in table.to_dict("records"):
        name = readable(r["method"])  # "LoRA", not the key "lora"
        if r["time claim"] == REFERENCE:
            lines.append(f"- {name}: the reference every ratio below divides by; the article calls its training "
                         f"time '{r['claimed training time']}' and its storage '{r['claimed storage']}', which a "
                         "comparison with itself cannot test.")
            continue
        n = r["seeds"]
        seeds = f"{n} seed{'s' * (n != 1)}"
        lo, hi = r["time lo"], r["time hi"]
        span = f" [{lo:g}, {hi:g}]" if lo == lo and hi == hi else " (no interval from one run)"
        lines.append(f"- {name}: '{r['claimed training time']}' training time ({TIME_WORDS_TEXT[r['claimed training time']]}) "
                     f"**{r['time claim']}**: measured {r['step time vs full']:g}x the full fine-tune's step{span}, {seeds}.")
        lines.append(f"- {name}: '{r['claimed storage']}' storage ({STORAGE_WORDS_TEXT[r['claimed storage']]}) "
                     f"**{r['storage claim']}**: its file is {r['storage vs full']:.3g}x the full fine-tune's (exact).")
    return "\n".join(lines)


def _range_text(words: dict) -> dict:
    def one(lo, hi):
        if hi == float("inf"):
            return f"at least {lo:g}x"
        return f"below {hi:g}x" if lo == 0 else f"{lo:g}x to {hi:g}x"
    return {w: one(*r) for w, r in words.items()}


TIME_WORDS_TEXT = _range_text(TIME_WORDS)
STORAGE_WORDS_TEXT = _range_text(STORAGE_WORDS)
