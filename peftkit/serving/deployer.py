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
base weights hold one LoRA folded in; it says so and what to do (MixedBatchError).

Beside it: registry.py checks and holds each registered adapter (files are safetensors and JSON
only, see files/adapter_file.py; nothing is unpickled); requests.py checks what predict takes and
builds what it returns; store.py saves and loads a whole deployment. Switch timings and a
simulated request stream are in studies/serving_study.py.
"""

from __future__ import annotations

import threading
import time
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
from ..files.adapter_file import adapter_state, check_base, planned, skeleton
from ..layers.names import under
from ..runtime import resolve_device
from .mixed import BASE, MixedModel, shared_copy
from .registry import (  # noqa: F401  (NAME_RE, UnknownAdapterError, Registered: importable from here as before)
    NAME_RE,
    ROW_COLUMNS,
    Registered,
    UnknownAdapterError,
    check_name,
    held_tensors,
    lookup,
    plan_key,
    read_servable,
    summary_row,
)
from .requests import (  # noqa: F401  (COLUMNS, MixedBatchError, check_texts: importable from here as before)
    COLUMNS,
    MixedBatchError,
    batches,
    check_row_names,
    check_texts,
    refuse_merged,
    refuse_unmixable,
    result_frame,
)
from .store import load_deployment, save_deployment


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
        anything changes (see files/adapter_file.py and registry.py, which lists the checks in
        order). Returns a summary row.
        """
        check_name(name, self._adapters, replace)
        adapter, d, where = read_servable(adapter_dir, self.merged)
        self._check_base(adapter)
        expected = self._expected_shapes(adapter.method, adapter.head, d)
        keys, tensors = held_tensors(adapter, expected, where, next(self.model.parameters()).dtype,
                                     pin=self.device.type == "cuda")
        entry = Registered(name, adapter.method, adapter.head, keys, tensors, adapter.meta, str(d))
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
        return pd.DataFrame(rows, columns=ROW_COLUMNS)

    def _row(self, e: Registered) -> dict:
        return summary_row(e, self._active)

    def _get(self, name) -> Registered:
        return lookup(self._adapters, name)

    def _check_base(self, adapter) -> None:
        # The fingerprint reads names, shapes and the non-Linear values, which no served method
        # changes; the lock keeps a concurrent rebuild from changing the module tree under it.
        with self._lock:
            check_base(self.model, adapter)  # raises AdapterFileError

    def _expected_shapes(self, method: Method, head, source) -> dict:
        key = plan_key(method, head)
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
            names = check_row_names(adapters, len(texts), self._adapters)
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
        for rows in batches(ids, batch_size):
            input_ids, mask = pad_batch([ids[i] for i in rows], pad)
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            with self._lock:  # the adapter must stay live for the whole forward
                self._switch(self._get(adapter))
                with torch.inference_mode():
                    logits = self.model(input_ids=input_ids, attention_mask=mask).logits
                    probs[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return self._frame(texts, probs, truncated, tokens, unk, adapter)

    def _predict_mixed(self, texts: list[str], names: list[str], batch_size: int) -> pd.DataFrame:
        refuse_merged(self.merged, names)
        refuse_unmixable(names, lambda n: self._get(n).method)
        if not texts:
            return self._frame([], np.zeros((0, self.num_labels)), [], [], [], [])
        ids, tokens, truncated, unk = self.encode(texts)
        probs = np.zeros((len(texts), self.num_labels), dtype=np.float32)
        pad = self.tokenizer.pad_token_id or 0
        for rows in batches(ids, batch_size):
            rows = rows[np.argsort([names[i] for i in rows], kind="stable")]  # each adapter's rows adjacent
            input_ids, mask = pad_batch([ids[i] for i in rows], pad)
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            with self._lock:
                refuse_merged(self.merged, names)  # set_merged may have run since the first check
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
        self._mixed.sync(self._adapters, lambda e: self._applied[plan_key(e.method, e.head)])
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
        return result_frame(texts, probs, truncated, tokens, unk, adapter, self.label_names)

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

