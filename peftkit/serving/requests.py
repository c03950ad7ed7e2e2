"""What `Deployer.predict` takes and what it gives back.

Before any forward: the texts (a list of strings), one adapter name per text for a mixed batch,
and the mixed batches a Deployer refuses (MixedBatchError): a merged one, whose base weights hold
one LoRA folded in, and adapters that do not compute as s B A x on the plain base (DoRA, PiSSA,
PEFT-backed methods). After it: the rows batched by length and the result table (COLUMNS).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .mixed import BASE
from .registry import UnknownAdapterError

COLUMNS = ["text", "label", "probability", "truncated", "tokens", "unk_rate", "adapter"]


class MixedBatchError(ValueError):
    """A batch asked for several adapters (or the bare base) where this Deployer cannot mix them."""


def check_texts(texts) -> list[str]:
    """A list of strings, or a TypeError that says which item is wrong."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("predict takes a list of texts, got a single string; wrap it: predict([text]).")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"predict takes a list of texts, got {type(texts).__name__}.") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__} ({t!r:.40}), not a string; every item must be "
                            "text (convert numbers with str(), drop missing values).")
    return texts


def check_row_names(adapters, n: int, known) -> list[str]:
    """`adapters` checked: a list of n names, each in `known` (the registered ones) or "__base__"."""
    if isinstance(adapters, (str, bytes)):
        raise TypeError(f"adapters takes one name per text, got the single string {adapters!r}; for one "
                        "adapter on every text pass adapter=<name>.")
    try:
        names = list(adapters)
    except TypeError:
        raise TypeError(f"adapters takes a list of names, one per text, got {type(adapters).__name__}.") from None
    if len(names) != n:
        raise ValueError(f"adapters has {len(names)} names for {n} texts; give one adapter name per text.")
    known = set(known)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"adapters[{i}] is {type(name).__name__} ({name!r:.40}), not an adapter name.")
        if name != BASE and name not in known:
            raise UnknownAdapterError(f"adapters[{i}]: no adapter named {name!r}; registered: "
                                      f"{sorted(known) or 'none yet'} (and {BASE!r} for the base alone).")
    return names


def refuse_merged(merged: bool, names) -> None:
    """Raise MixedBatchError if a merged Deployer is asked for a mixed batch of `names`."""
    if merged:
        asked = sorted(set(names))
        raise MixedBatchError(
            f"this Deployer runs merged (merged=True): its base weights hold the active LoRA folded in, "
            f"so one batch cannot serve {asked}. For mixed batches use an unmerged Deployer "
            "(dep.set_merged(False), or Deployer(..., merged=False)); or call predict once per adapter.")


def refuse_unmixable(names, method_of) -> None:
    """Raise MixedBatchError if any adapter in `names` (method_of(name) gives its method) cannot mix."""
    # Mixed batches add s B A x per row on the plain W0; DoRA rescales each output by its
    # magnitude, PiSSA's factors act on a residual, and a PEFT method is PEFT's own model.
    odd = sorted({n for n in names if n != BASE and (getattr(method_of(n), "dora", False)
                  or getattr(method_of(n), "init", "lora") != "lora"
                  or getattr(method_of(n), "mixes", True) is False)})
    if odd:
        raise MixedBatchError(
            f"{odd} cannot share a mixed batch: a mixed batch adds each row's s B A x to the plain base, and "
            "DoRA (a magnitude per output), PiSSA (factors on a residual) and PEFT-backed methods do not "
            "compute that way. Call predict(texts, adapter=<name>) once per adapter for them.")


def batches(ids, batch_size: int):
    """Row indices of each batch: by length (similar lengths pad less), batch_size at a time."""
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def result_frame(texts, probs, truncated, tokens, unk, adapter, label_names=None) -> pd.DataFrame:
    """predict's table (COLUMNS, with label_name after label when `label_names` is given)."""
    label = probs.argmax(-1) if len(probs) else np.zeros(0, dtype=int)
    df = pd.DataFrame({"text": list(texts), "label": label.astype(int),
                       "probability": probs.max(-1) if len(probs) else np.zeros(0),
                       "truncated": np.asarray(truncated, dtype=bool), "tokens": np.asarray(tokens, dtype=int),
                       "unk_rate": np.asarray(unk, dtype=float), "adapter": adapter}, columns=COLUMNS)
    if label_names is not None:
        df.insert(2, "label_name", [label_names[i] for i in df["label"]])
    return df
