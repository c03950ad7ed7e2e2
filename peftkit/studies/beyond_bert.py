"""Beyond BERT, on real data (notebook 09): LoRA on convolutions, and LoRA on GPT-2's Conv1D.

Vision. scikit-learn's bundled handwritten digits (`load_digits`: 1,797 real 8x8 images, offline).
A small CNN (`bases.tiny.CNN`) is pre-trained on the digits 0-4, then adapted to 5-9 with a fresh
head and each method: LoRA on its convolutions and fc layer, a bottleneck adapter after fc,
head-only and a full fine-tune (`adapt_digits`).

A causal LM. A tiny GPT-2 built from its config is pre-trained for a time budget on one domain
of the corpus, then adapted to another with LoRA on its `c_attn` (GPT-2's `Conv1D`) and with a
full fine-tune, on the same number of steps (`adapt_lm`). Held-out perplexity (per character)
on both domains says what each learned and what it forgot. The model reads characters (`Vocab`):
no tokenizer, a tiny output layer, and text after a minute of CPU time.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..bases.tiny import CNN
from ..core.methods import Method
from ..core.surgery import apply, trainable_fraction
from ..data import corpus
from ..training.loop import TrainConfig, fit
from ..training.metrics import evaluate, step_time

# -- vision: digits 0-4, then 5-9 ------------------------------------------------------------------


def digits_tasks(seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> dict:
    """{"source": digits 0-4, "target": digits 5-9 (labelled 0-4)}, each {"train", "val", "test"}
    as (images (n, 1, 8, 8) scaled to [0, 1], labels), split per class in `fractions`."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    rng = np.random.default_rng(seed)
    tasks = {}
    for task, first in (("source", 0), ("target", 5)):
        parts = {"train": [], "val": [], "test": []}
        for c in range(first, first + 5):
            idx = rng.permutation(np.flatnonzero(d.target == c))
            a, b = int(len(idx) * fractions[0]), int(len(idx) * (fractions[0] + fractions[1]))
            for name, chunk in (("train", idx[:a]), ("val", idx[a:b]), ("test", idx[b:])):
                parts[name].append(chunk)
        tasks[task] = {name: (x[np.sort(np.concatenate(v))], y[np.sort(np.concatenate(v))] - first)
                       for name, v in parts.items()}
    return tasks


def image_batches(split: tuple, batch_size: int = 32, seed: int | None = 0) -> list[dict]:
    """Batches {"x", "labels"} of one split, shuffled with `seed` (None: in order)."""
    x, y = split
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if seed is not None \
        else torch.arange(len(y))
    return [{"x": x[order[i:i + batch_size]], "labels": y[order[i:i + batch_size]]}
            for i in range(0, len(y), batch_size)]


def pretrain_cnn(tasks: dict, epochs: int = 30, lr: float = 3e-3, seed: int = 0, progress: bool = False):
    """A CNN trained on the source digits (0-4). Returns (model, history)."""
    torch.manual_seed(seed)
    model = CNN(num_labels=5)
    src = tasks["source"]
    hist = fit(model, image_batches(src["train"], seed=seed), image_batches(src["val"], seed=None),
               TrainConfig(epochs=epochs, lr=lr, seed=seed, progress=progress, device="cpu"))
    return model.eval(), hist


def with_fresh_head(model: CNN, seed: int = 0) -> CNN:
    """A copy of `model` whose classifier is drawn anew (the 5-9 task has its own head)."""
    new = copy.deepcopy(model)
    torch.manual_seed(seed)
    new.classifier.reset_parameters()
    return new


def adapt_digits(pretrained: CNN, tasks: dict, methods: dict[str, Method], epochs: int = 20,
                 lrs: dict[str, float] | None = None, seed: int = 0, progress: bool = False):
    """Adapt the pre-trained CNN to digits 5-9 with each method. Returns (table, models): accuracy
    on the target's test split, trainable parameters, the median step time, and the gap between
    the adapted model and its base at initialisation (0: each method starts as the base)."""
    tgt = tasks["target"]
    probe = image_batches(tgt["test"], seed=None)[0]
    rows, models = [], {}
    for name, method in methods.items():
        base = with_fresh_head(pretrained, seed)
        model = apply(copy.deepcopy(base), method)
        with torch.no_grad():
            gap = (model(probe["x"]) - base(probe["x"])).abs().max().item()
        lr = (lrs or {}).get(name, method.default_lr)
        t0 = time.perf_counter()
        fit(model, image_batches(tgt["train"], seed=seed), image_batches(tgt["val"], seed=None),
            TrainConfig(epochs=epochs, lr=lr, seed=seed, progress=progress, device="cpu"))
        train_s = time.perf_counter() - t0
        res = evaluate(model, image_batches(tgt["test"], seed=None))
        step = step_time(model, image_batches(tgt["train"], seed=seed)[0], repeats=10)
        model.eval()
        rows.append({"method": name, "accuracy": res["accuracy"], "f1_macro": res["f1_macro"],
                     "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "trainable %": 100 * trainable_fraction(model), "ms per step": 1e3 * step["sec_per_step"],
                     "train s": train_s, "lr": lr, "gap at init": gap})
        models[name] = model
    return pd.DataFrame(rows).set_index("method"), models


# -- a causal LM: a tiny GPT-2 on one domain, then another ------------------------------------------


@dataclass
class Vocab:
    """Characters, numbered: 0 is padding, 1 an unknown character, 2 the end of a text. A
    character-level model needs no tokenizer and a tiny output layer, so it learns to write
    in a minute of CPU time."""

    chars: str

    PAD, UNK, EOS = 0, 1, 2

    def __post_init__(self):
        self.index = {c: i + 3 for i, c in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars) + 3

    @classmethod
    def build(cls, texts, min_count: int = 5) -> "Vocab":
        counts = Counter(c for t in texts for c in t)
        return cls("".join(sorted(c for c, n in counts.items() if n >= min_count)))

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, self.UNK) for c in text]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if i == self.EOS:
                break
            out.append(self.chars[i - 3] if i >= 3 else "?")
        return "".join(out)


def domain_texts(domain: str, seed: int = 0) -> dict[str, list[str]]:
    """The corpus texts of `domain`, split as every notebook splits it (train, val, test)."""
    splits = corpus.split(corpus.load_corpus(domain), seed=seed)
    return {k: v.text.tolist() for k, v in splits.items()}


def lm_batches(vocab: Vocab, texts, batch_size: int = 32, max_length: int = 128,
               seed: int | None = 0) -> list[dict]:
    """Batches {"input_ids", "attention_mask", "labels"}: each text, then end of text, padded;
    labels are the ids with padding masked out (-100)."""
    seqs = [(vocab.encode(t) + [Vocab.EOS])[:max_length] for t in texts]
    order = list(range(len(seqs)))
    if seed is not None:
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for i in range(0, len(order), batch_size):
        chunk = [seqs[j] for j in order[i:i + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), Vocab.PAD)
        for k, s in enumerate(chunk):
            ids[k, :len(s)] = torch.tensor(s)
        mask = (ids != Vocab.PAD).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def tiny_gpt2(vocab_size: int, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_positions: int = 128,
              seed: int = 0):
    """A small GPT-2 from its config (no download), with pad/eos ids matching `Vocab`."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
                     bos_token_id=Vocab.EOS, eos_token_id=Vocab.EOS, pad_token_id=Vocab.PAD)
    model = GPT2LMHeadModel(cfg)
    model.generation_config.pad_token_id = Vocab.PAD
    return model


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of `batch`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def train_lm(model, batches: list[dict], lr: float, steps: int | None = None, seconds: float | None = None,
             seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """AdamW on the parameters that require grad, cycling through `batches`, for `steps` steps or
    `seconds` of wall time (whichever comes first). Returns the history (step, loss, seconds)."""
    if steps is None and seconds is None:
        raise ValueError("train_lm needs steps or seconds.")
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    rows, t0, step = [], time.perf_counter(), 0
    bar = tqdm(total=steps, disable=not progress, desc="steps")
    while (steps is None or step < steps) and (seconds is None or time.perf_counter() - t0 < seconds):
        loss = lm_loss(model, batches[step % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        rows.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - t0})
        bar.update()
    bar.close()
    model.eval()
    return pd.DataFrame(rows)


@torch.no_grad()
def perplexity(model, batches: list[dict]) -> float:
    """exp(mean next-token cross-entropy) over every real token of `batches`."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        n = int((b["labels"][:, 1:] != -100).sum())
        total += lm_loss(model, b).item() * n
        count += n
    model.train(was)
    return math.exp(total / max(count, 1))


@torch.no_grad()
def generate(model, vocab: Vocab, prompts: list[str], new_tokens: int = 40) -> list[torch.Tensor]:
    """Greedy continuations of `prompts`, as id tensors (prompt included)."""
    out = []
    for p in prompts:
        ids = torch.tensor([vocab.encode(p)])
        out.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False)[0])
    return out


def continue_text(model, vocab: Vocab, prompts: list[str], new_tokens: int = 40, temperature: float | None = None,
                  seed: int = 0) -> list[str]:
    """Continuations of `prompts` (the prompt, then what the model writes): greedy, or sampled at
    `temperature` from the 10 likeliest characters, seeded, so the same call writes the same text."""
    if temperature is None:
        return [p + vocab.decode(g[len(vocab.encode(p)):].tolist())
                for p, g in zip(prompts, generate(model, vocab, prompts, new_tokens))]
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([vocab.encode(p)])
            torch.manual_seed(seed)
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=True, temperature=temperature, top_k=10)[0]
            out.append(p + vocab.decode(g[ids.shape[1]:].tolist()))
    return out


def adapt_lm(pretrained, methods: dict[str, Method], train: list[dict], evals: dict[str, list[dict]],
             steps: int, lrs: dict[str, float], seed: int = 0, progress: bool = False):
    """Adapt a copy of `pretrained` with each method for `steps` steps. Returns (table, models):
    held-out perplexity on each of `evals` (before: the pretrained model), trainable parameters and
    the median seconds per step."""
    rows = [{"method": "pretrained", "trainable": 0, **{f"ppl {k}": perplexity(pretrained, v) for k, v in evals.items()}}]
    models = {}
    for name, method in methods.items():
        model = apply(copy.deepcopy(pretrained), method)
        hist = train_lm(model, train, lr=lrs[name], steps=steps, seed=seed, progress=progress)
        rows.append({"method": name, "trainable": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
                                                      if p.requires_grad),
                     **{f"ppl {k}": perplexity(model, v) for k, v in evals.items()},
                     "ms per step": 1e3 * float(np.median(np.diff([0.0] + hist.seconds.tolist())))})
        models[name] = model
    return pd.DataFrame(rows).set_index("method"), models


def layers_table(model: nn.Module) -> pd.DataFrame:
    """What LoRA wrapped: module, layer kind, A and B shapes, parameters."""
    from ..core.surgery import lora_layers
    names = {id(m): n for n, m in model.named_modules()}
    return pd.DataFrame([{"module": names[id(m)], "wraps": type(m.base).__name__,
                          "factors": ", ".join(f"{n} {tuple(p.shape)}" for n, p in m.named_parameters(recurse=False)),
                          "parameters": sum(p.numel() for p in m.parameters(recurse=False))}
                         for m in lora_layers(model)])
