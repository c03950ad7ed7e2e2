"""Serving many adapters from one base model, hot-swapped by copying their tensors.

A `Deployer` loads the base once. Each registered adapter is checked against that base (its
fingerprint, method, tensor names and shapes, finite values) and then held as CPU tensors, about
300 KB for a MiniLM LoRA on q and v at r=8 against the base's 90 MB. The model carries one live
set of LoRA/Adapter modules; switching adapter copies the new adapter's tensors into them:

    for every adapter tensor t:  live[t.name].copy_(t)        (plus the task head)

so a switch moves r(in + out) numbers per LoRA layer and never touches a base weight. When two
adapters use different methods or shapes (LoRA r=8 and a Pfeiffer adapter, say), the live
modules are rebuilt for the new one first: correct, only slower. With `merged=True` the active
LoRA is folded into W (no extra latency per forward) and subtracted again before a switch; each
such round trip rounds W by about one float32 ulp, which the tests bound.

One lock covers "make this adapter live, run the forward" for each batch, so threads calling
`predict` with different adapters each get their own adapter's answers.

Mixed batches: `predict(texts, adapters=[...])` takes one adapter name per text ("__base__" for
the base model alone) and runs each batch as one forward through the shared base, every row with
its own adapter's LoRA factors, bottleneck adapters and head (mixed.py says how). Every row's
answer equals that adapter served alone, up to float rounding. A merged Deployer cannot mix: its
base weights hold one LoRA folded in; it says so and what to do (MixedBatchError). Files are safetensors
and JSON only (see io.py); nothing is unpickled. Switch timings, resident memory and a
simulated request stream are in serve_eval.py; saving and loading a whole deployment in
serve_store.py.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..bases.models import load_base
from ..compress.precision import optimize_for_inference
from ..compress.timing import default_calibration
from ..core.methods import Method
from ..core.surgery import apply, find_head, lora_layers, remove
from ..data.loaders import pad_batch
from ..files.adapter_file import (
    CONFIG,
    WEIGHTS,
    AdapterFile,
    AdapterFileError,
    as_adapter,
    adapter_state,
    check_base,
    check_tensors,
    planned,
    read_adapter,
    skeleton,
)
from ..layers.names import under
from ..runtime import resolve_device
from .mixed import BASE, MixedModel, shared_copy
from .store import load_deployment, save_deployment

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a name is also a folder in save()
COLUMNS = ["text", "label", "probability", "truncated", "tokens", "unk_rate", "adapter"]


class MixedBatchError(ValueError):
    """A batch asked for several adapters (or the bare base) where this Deployer cannot mix them."""


class UnknownAdapterError(KeyError):
    """No adapter is registered under the requested name."""

    def __str__(self):  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class Registered:
    """One adapter held in memory: what it is, where it came from, and its CPU tensors."""

    name: str
    method: Method
    head: str | None
    keys: tuple  # tensor names, sorted: the order in which a switch copies them
    tensors: tuple  # the CPU tensors, in `keys` order
    meta: dict
    source: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)



def _plan_key(method: Method, head) -> tuple:
    """A hashable key for (method, head), whatever a file's spec held (lists, nested specs)."""
    return json.dumps(method.to_dict(), sort_keys=True, default=str), head if not isinstance(head, list) else tuple(head)

class Deployer:
    """One base model in memory, many adapters, one of them live at a time.

    Args:
        base: "minilm" or "tiny" (see `load_base`); loaded once.
        num_labels: the classifier's width; every adapter's head must match it.
        device: "auto" (cuda, then mps, then cpu), or any torch device string.
        merged: fold the active LoRA into the base weights (lowest latency); switching unmerges first.
        max_length: longer texts are truncated to this many tokens and flagged in the result.
        seed: the base's seed (it decides the "tiny" base's weights, so it must match the adapters').
        label_names: optional names for the labels, e.g. ("negative", "positive").
        precision: "fp32" (default), "bf16" (autocast) or "auto": the faster of the two here that
            agrees with fp32 on `calibration` (`peftkit.optimize_for_inference` with swappable=True;
            int8 and bf16 weights would replace the weights adapters are swapped into). The choice
            and its reason are in `self.model.inference_precision`.
        calibration: texts like those you will serve, for precision="auto" (None: 32 texts of each
            domain of the bundled corpus).
    """

    def __init__(self, base: str = "minilm", num_labels: int = 2, device: str = "auto",
                 merged: bool = False, max_length: int = 128, seed: int = 0, label_names=None,
                 precision: str = "fp32", calibration=None):
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"max_length must be an integer of at least 2 (room for [CLS] and [SEP]), got {max_length!r}.")
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(f"label_names has {len(label_names)} names for num_labels={num_labels}; give one per label.")
        try:
            self.device = resolve_device(device)
        except RuntimeError as e:
            raise ValueError(f"unknown device {device!r} ({e}); use 'auto', 'cpu' or 'cuda'.") from None
        model, tokenizer = load_base(base, num_labels=num_labels, seed=seed)
        if tokenizer is None:
            raise ValueError(f"base {base!r} has no tokenizer, so it cannot serve text; use 'minilm' or 'tiny'.")
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        if precision != "fp32":
            self.model = optimize_for_inference(
                self.model, "bf16-autocast" if precision == "bf16" else precision, swappable=True, inplace=True,
                calibration=default_calibration() if calibration is None and precision == "auto" else calibration,
                tokenizer=tokenizer, max_length=min(max_length, getattr(model.config, "max_position_embeddings", max_length)))
        self.base, self.num_labels, self.seed = base, num_labels, seed
        self.label_names = list(label_names) if label_names is not None else None
        limit = getattr(model.config, "max_position_embeddings", max_length)
        self.max_length = min(max_length, limit)
        self.merged = bool(merged)
        self._skeleton = skeleton(model)
        self._plain = shared_copy(model)  # the base's module tree before any method, for mixed batches
        self._mixed: MixedModel | None = None
        self._applied: dict = {}  # (method, head) -> the meta skeleton with that method applied
        self._head = find_head(model)
        self._head0 = {k: v.detach().clone() for k, v in model.named_parameters()
                       if under(k, self._head)}  # for adapters saved without a head
        self._expected: dict = {}  # (method, head) -> {name: shape}
        self._adapters: dict[str, Registered] = {}
        self._live: tuple | None = None  # (method, head) the live modules are built for
        self._slots: tuple = ()  # live tensors, in the order of Registered.keys
        self._active: str | None = None
        self._lock = threading.RLock()  # switch + forward, registry changes
        self._tok_lock = threading.Lock()  # a fast tokenizer is not safe to call from two threads at once
        self.switches = self.rebuilds = 0

    # -- the registry -------------------------------------------------------------------------

    def register(self, name: str, adapter_dir, replace: bool = False) -> dict:
        """Check the adapter in `adapter_dir` against this base and hold it under `name`.

        Refuses (AdapterFileError) a missing, corrupt or pickled file, a checksum that does not
        match, an adapter trained on another base, tensors that do not fit the method exactly,
        non-float, NaN, inf or absurdly large values, and unsafe target regexes, all before
        anything changes (see files/adapter_file.py). Returns a summary row.
        """
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit (it also names a folder in save()).")
        if name in self._adapters and not replace:
            raise ValueError(f"an adapter named {name!r} is already registered (from "
                             f"{self._adapters[name].source}); pass replace=True to swap it, or pick another name.")
        if isinstance(adapter_dir, AdapterFile):  # in memory (a merge's result): checked as a file is
            adapter = as_adapter(adapter_dir)
            d, where = adapter.source, adapter.source
        else:
            d = Path(adapter_dir)
            if d.is_file():
                raise AdapterFileError(
                    f"{d} is a file; register takes an adapter folder holding {CONFIG} and {WEIGHTS} "
                    "(written by save_adapter or experiments.compare). Pickle files (.pt, .bin) are never "
                    "loaded, since unpickling runs arbitrary code.")
            adapter, where = read_adapter(d), str(d / WEIGHTS)
        if self.merged and getattr(adapter.method, "peft_type", None):
            raise AdapterFileError(f"{d} holds a PEFT-backed method ({adapter.method.describe()}); a merged Deployer folds "
                                   "peftkit's LoRA into the base and cannot swap PEFT's layers. Serve it with an unmerged "
                                   "Deployer (merged=False).")
        if adapter.method.trains_base:
            raise AdapterFileError(f"{d} holds a full fine-tune ({adapter.method.name}): it replaces every base "
                                   "weight, so it cannot be hot-swapped on a shared base. Serve it as a model of its own.")
        self._check_base(adapter)
        expected = self._expected_shapes(adapter.method, adapter.head, d)
        check_tensors(expected, adapter.tensors, where)
        dtype = next(self.model.parameters()).dtype
        keys = tuple(sorted(expected))
        tensors = []
        for k in keys:
            t = adapter.tensors[k]
            if not torch.isfinite(t).all():
                raise AdapterFileError(f"{where}: tensor {k} holds NaN or inf (a diverged training run?); "
                                       "it would poison every prediction. Retrain or pick an earlier checkpoint.")
            t = t.to(dtype).contiguous().clone()  # owned memory, not a view of the file buffer
            tensors.append(t.pin_memory() if self.device.type == "cuda" else t)
        entry = Registered(name, adapter.method, adapter.head, keys, tuple(tensors), adapter.meta, str(d))
        with self._lock:
            self._adapters[name] = entry
            if self._active == name:
                self._active = None  # the live copy is stale: the next predict copies it again
        return self._row(entry)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._get(name)
            del self._adapters[name]
            if self._active == name:
                self._active = None

    def names(self) -> list[str]:
        return list(self._adapters)

    @property
    def active(self) -> str | None:
        """The adapter whose tensors are in the live modules now."""
        return self._active

    def adapters(self) -> pd.DataFrame:
        """One row per registered adapter: name, method, tensors, bytes, source, active."""
        rows = [self._row(e) for e in self._adapters.values()]
        return pd.DataFrame(rows, columns=["name", "method", "tensors", "bytes", "source", "active"])

    def _row(self, e: Registered) -> dict:
        return {"name": e.name, "method": e.method.describe(), "tensors": len(e.keys), "bytes": e.nbytes,
                "source": e.source, "active": e.name == self._active}

    def _get(self, name) -> Registered:
        if name not in self._adapters:
            known = sorted(self._adapters) or "none yet"
            raise UnknownAdapterError(f"no adapter named {name!r}; registered: {known}. "
                                      "Add one with register(name, adapter_dir).")
        return self._adapters[name]

    def _check_base(self, adapter) -> None:
        # The fingerprint reads names, shapes and the non-Linear values, which no served method
        # changes; the lock keeps a concurrent rebuild from changing the module tree under it.
        with self._lock:
            check_base(self.model, adapter)  # raises AdapterFileError

    def _expected_shapes(self, method: Method, head, source) -> dict:
        key = _plan_key(method, head)
        if key not in self._expected:  # on the meta skeleton: no allocation, whatever the rank
            self._applied[key], self._expected[key] = planned(self._skeleton, method, head, source)
        return self._expected[key]

    # -- switching ----------------------------------------------------------------------------

    def activate(self, name: str) -> float:
        """Make `name` the live adapter now. Returns the seconds the switch took (0 if it was live)."""
        with self._lock:
            entry = self._get(name)
            if self._active == name:
                return 0.0
            t0 = time.perf_counter()
            self._switch(entry)
            return time.perf_counter() - t0

    def set_merged(self, merged: bool) -> None:
        """Fold (True) or unfold (False) the active LoRA into the base weights."""
        with self._lock:
            peft_backed = sorted(n for n, e in self._adapters.items() if getattr(e.method, "peft_type", None))
            if merged and peft_backed:
                raise ValueError(f"{peft_backed} are PEFT-backed methods, which a merged Deployer cannot swap; "
                                 "unregister them first, or stay unmerged.")
            self.merged = bool(merged)
            with torch.no_grad():
                for m in lora_layers(self.model):
                    m.merge() if self.merged else m.unmerge()

    @torch.no_grad()
    def _switch(self, entry: Registered) -> None:
        """Under self._lock: copy `entry` into the live modules (rebuilding them if need be)."""
        if self._active == entry.name:
            return
        loras = lora_layers(self.model)
        for m in loras:
            m.unmerge()  # subtract the old update before its factors are overwritten
        if self._live != (entry.method, entry.head):
            self._rebuild(entry)
            loras = lora_layers(self.model)
        for dst, src in zip(self._slots, entry.tensors):
            dst.copy_(src, non_blocking=True)
        if entry.head is None and self._head0:
            for k, v in self._head0.items():
                self.model.get_parameter(k).copy_(v)
        if self.merged:
            for m in loras:
                m.merge()
        self._active = entry.name
        self.switches += 1

    def _rebuild(self, entry: Registered) -> None:
        if self._live is not None:
            remove(self.model)
        apply(self.model, entry.method, head=entry.head)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        state = adapter_state(self.model)
        self._slots = tuple(state[k] for k in entry.keys)
        self._live = (entry.method, entry.head)
        self.rebuilds += 1

    # -- prediction ---------------------------------------------------------------------------

    def predict(self, texts, adapter: str | None = None, batch_size: int = 64, adapters=None) -> pd.DataFrame:
        """Classify `texts` with adapter `adapter` (None: the active one), or with `adapters`, one
        name per text, in mixed batches (see the module docstring); "__base__" names the base model
        with its own head and no adapter, in either.

        Returns one row per text: text, label, probability (of that label), truncated (the text
        had more than max_length tokens), tokens (its word pieces, before truncation), unk_rate
        (the share of them the vocabulary does not know) and adapter.
        """
        texts = check_texts(texts)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if adapters is not None:
            if adapter is not None:
                raise ValueError("pass adapter=<name> (one adapter for every text) or adapters=[...] (one per "
                                 "text), not both.")
            names = self._row_names(adapters, len(texts))
            if len(set(names)) == 1 and names[0] != BASE:
                adapter = names[0]  # one adapter after all: the ordinary path, the same answers bit for bit
            else:
                return self._predict_mixed(texts, names, batch_size)
        if adapter == BASE:
            return self._predict_mixed(texts, [BASE] * len(texts), batch_size)
        if adapter is None:
            if self._active is None:
                raise UnknownAdapterError(f"no adapter is active; pass adapter=<name> (registered: {sorted(self._adapters) or 'none yet'}).")
            adapter = self._active
        self._get(adapter)
        if not texts:
            return self._frame([], np.zeros((0, self.num_labels)), [], [], [], adapter)
        ids, tokens, truncated, unk = self.encode(texts)
        probs = np.zeros((len(texts), self.num_labels), dtype=np.float32)
        pad = self.tokenizer.pad_token_id or 0
        for rows in self._batches(ids, batch_size):
            input_ids, mask = pad_batch([ids[i] for i in rows], pad)
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            with self._lock:  # the adapter must stay live for the whole forward
                self._switch(self._get(adapter))
                with torch.inference_mode():
                    logits = self.model(input_ids=input_ids, attention_mask=mask).logits
                    probs[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return self._frame(texts, probs, truncated, tokens, unk, adapter)

    @staticmethod
    def _batches(ids, batch_size: int):
        """Row indices of each batch: by length (similar lengths pad less), batch_size at a time."""
        order = np.argsort([len(x) for x in ids], kind="stable")
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size]

    def _row_names(self, adapters, n: int) -> list[str]:
        """`adapters` checked: a list of n registered names (or "__base__")."""
        if isinstance(adapters, (str, bytes)):
            raise TypeError(f"adapters takes one name per text, got the single string {adapters!r}; for one "
                            "adapter on every text pass adapter=<name>.")
        try:
            names = list(adapters)
        except TypeError:
            raise TypeError(f"adapters takes a list of names, one per text, got {type(adapters).__name__}.") from None
        if len(names) != n:
            raise ValueError(f"adapters has {len(names)} names for {n} texts; give one adapter name per text.")
        known = set(self._adapters)
        for i, name in enumerate(names):
            if not isinstance(name, str):
                raise TypeError(f"adapters[{i}] is {type(name).__name__} ({name!r:.40}), not an adapter name.")
            if name != BASE and name not in known:
                raise UnknownAdapterError(f"adapters[{i}]: no adapter named {name!r}; registered: "
                                          f"{sorted(known) or 'none yet'} (and {BASE!r} for the base alone).")
        return names

    def _refuse_merged(self, names) -> None:
        if self.merged:
            asked = sorted(set(names))
            raise MixedBatchError(
                f"this Deployer runs merged (merged=True): its base weights hold the active LoRA folded in, "
                f"so one batch cannot serve {asked}. For mixed batches use an unmerged Deployer "
                "(dep.set_merged(False), or Deployer(..., merged=False)); or call predict once per adapter.")

    def _refuse_unmixable(self, names) -> None:
        # Mixed batches add s B A x per row on the plain W0; DoRA rescales each output by its
        # magnitude, PiSSA's factors act on a residual, and a PEFT method is PEFT's own model.
        odd = sorted({n for n in names if n != BASE and (getattr(self._get(n).method, "dora", False)
                      or getattr(self._get(n).method, "init", "lora") != "lora"
                      or getattr(self._get(n).method, "mixes", True) is False)})
        if odd:
            raise MixedBatchError(
                f"{odd} cannot share a mixed batch: a mixed batch adds each row's s B A x to the plain base, and "
                "DoRA (a magnitude per output), PiSSA (factors on a residual) and PEFT-backed methods do not "
                "compute that way. Call predict(texts, adapter=<name>) once per adapter for them.")

    def _predict_mixed(self, texts: list[str], names: list[str], batch_size: int) -> pd.DataFrame:
        self._refuse_merged(names)
        self._refuse_unmixable(names)
        if not texts:
            return self._frame([], np.zeros((0, self.num_labels)), [], [], [], [])
        ids, tokens, truncated, unk = self.encode(texts)
        probs = np.zeros((len(texts), self.num_labels), dtype=np.float32)
        pad = self.tokenizer.pad_token_id or 0
        for rows in self._batches(ids, batch_size):
            rows = rows[np.argsort([names[i] for i in rows], kind="stable")]  # each adapter's rows adjacent
            input_ids, mask = pad_batch([ids[i] for i in rows], pad)
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            with self._lock:
                self._refuse_merged(names)  # set_merged may have run since the first check
                for n in set(names[i] for i in rows) - {BASE}:
                    self._get(n)  # unregistered meanwhile: refuse rather than serve stale tensors
                mixed = self._mixed_model()
                with torch.inference_mode():
                    logits = mixed.logits(input_ids, mask, [names[i] for i in rows])
                    probs[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return self._frame(texts, probs, truncated, tokens, unk, names)

    def _mixed_model(self) -> MixedModel:
        """Under self._lock: the mixed-batch model, holding exactly the registered adapters."""
        if self._mixed is None:
            self._mixed = MixedModel(self._plain, self._head, self._head0, self.device)
        self._mixed.sync(self._adapters, lambda e: self._applied[_plan_key(e.method, e.head)])
        return self._mixed

    def encode(self, texts: list[str]):
        """Token ids (truncated to max_length), token counts before truncation, truncation flags
        and unknown-token rates, for checked texts."""
        tok, n = self.tokenizer, self.max_length
        with self._tok_lock:
            ids = tok(texts, truncation=True, max_length=n)["input_ids"]
            # Only a row that came out exactly max_length long can have lost tokens: count those again.
            full = {i: len(tok(texts[i], add_special_tokens=False, verbose=False)["input_ids"])
                    for i, x in enumerate(ids) if len(x) >= n}
        special = set(tok.all_special_ids)
        unk_id = tok.unk_token_id
        tokens, truncated, unk = [], [], []
        for i, x in enumerate(ids):
            body = [t for t in x if t not in special or t == unk_id]
            tokens.append(full.get(i, len(body)))
            truncated.append(i in full and full[i] > len(body))
            unk.append(sum(t == unk_id for t in body) / len(body) if body else 0.0)
        return ids, tokens, truncated, unk

    def _frame(self, texts, probs, truncated, tokens, unk, adapter) -> pd.DataFrame:
        label = probs.argmax(-1) if len(probs) else np.zeros(0, dtype=int)
        df = pd.DataFrame({"text": list(texts), "label": label.astype(int),
                           "probability": probs.max(-1) if len(probs) else np.zeros(0),
                           "truncated": np.asarray(truncated, dtype=bool), "tokens": np.asarray(tokens, dtype=int),
                           "unk_rate": np.asarray(unk, dtype=float), "adapter": adapter}, columns=COLUMNS)
        if self.label_names is not None:
            df.insert(2, "label_name", [self.label_names[i] for i in df["label"]])
        return df

    # -- files --------------------------------------------------------------------------------

    def save(self, directory) -> Path:
        """Write every registered adapter (safetensors + JSON) and a manifest.json into `directory`."""
        return save_deployment(self, directory)

    @classmethod
    def load(cls, directory, device: str = "auto") -> "Deployer":
        """Rebuild a Deployer from save(): the same base, every adapter checked again, the same one active."""
        return load_deployment(cls, directory, device)

    def snapshot(self) -> tuple[list, str | None]:
        """(the registered entries, the active name), read together under the lock."""
        with self._lock:
            return list(self._adapters.values()), self._active

    def __repr__(self):
        return (f"Deployer(base={self.base!r}, device={str(self.device)!r}, adapters={self.names()}, "
                f"active={self._active!r}, merged={self.merged})")


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
