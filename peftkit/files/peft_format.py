"""Hugging Face PEFT interoperability: LoRA adapters in PEFT's on-disk layout.

A PEFT LoRA folder holds `adapter_config.json` (peft_type "LORA", task_type, r, lora_alpha,
lora_dropout, target_modules, use_rslora, modules_to_save, fan_in_fan_out, ...) and
`adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r), plus the saved modules (the head) as `base_model.model.<path>.weight`
and `.bias`. PEFT's A and B are peftkit's A and B and both scale by lora_alpha / r (or / sqrt(r)
with use_rslora), so conversion is a renaming:

    Linear, GPT-2's Conv1D   <path>.lora_A            <path>.lora_A.weight            (r, in)
    Conv1d/2d/3d            <path>.lora_A            <path>.lora_A.weight            (r, in, k...)
    Embedding               <path>.lora_embedding_A  <path>.lora_embedding_A         (r, num)
    MultiheadAttention      <path>.lora_A            <path>.lora_A.weight            (r, E), in_proj
                            <path>.lora_out_A        <path>.base_layer.out_proj.lora_A.weight

and likewise for B. `task_type` follows the model (`peft_task_type`): CAUSAL_LM, SEQ_2_SEQ_LM,
SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION for a transformers text model without a
head, and none for anything else (a plain module, an image classifier), which PEFT then calls
with the model's own arguments. `fan_in_fan_out` is true when a target is a Conv1D.

`export_peft` also writes peftkit_base.json: the base fingerprint of adapter.json and the SHA-256
of adapter_model.safetensors (PEFT ignores the file). `import_peft` checks everything before the model changes, as `load_adapter` does
(tensor values, exact shapes, bounded target regexes), and also refuses:
  - a module named in modules_to_save whose tensors are missing (it would keep its random
    initial weights, and the outputs would differ from the exporter's);
  - a detectably different base: the fingerprint in peftkit_base.json when present, and the
    base named in base_model_name_or_path when both it and the model's name are Hub names or
    peftkit's (a local path proves nothing: it differs from machine to machine).
It reports what it loaded in one line (verbose=False to keep quiet).

The LoRA family travels too. DoRA is PEFT's `use_dora=True`, its magnitude
`<path>.lora_magnitude_vector` (out,). PiSSA (`LoRA(init="pissa")`) computes with
W0 - s B0 A0 + s B A on the untouched base, i.e. W0 + s [B, -B0] [A; A0]: `export_peft` writes
that rank-2r plain LoRA (lora_alpha scaled to keep s), which is what PEFT itself saves for PiSSA
when asked to convert (`path_initial_model_for_weight_conversion`); it loads in PEFT on the
original base with the same outputs, and imports back as a plain LoRA r=2r. A PEFT folder saved
with init_lora_weights="pissa" unconverted needs PEFT's residual base, and is refused.
LoRA+'s lr_ratio shapes training only and is not exported.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

import math

import torch

from ..core.methods import DoRA, LoRA
from ..core.peft_method import PeftMethod, peft_layers, peft_model_of, peft_task_type  # noqa: F401  (re-exported: tests and studies read it here)
from ..core.surgery import applied, canonical_name, lora_layers, wrapper_names
from ..layers.names import PEFT_ADAPTER
from ..storage import is_sha256, sha256_file
from ..layers.lora import LoRALinear
from .adapter_file import (
    AdapterFile,
    AdapterFileError,
    apply_and_fill,
    check_tensors,
    adapter_state,
    check_base,
    check_method,
    check_values,
    fingerprint,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
BASE_FILE = "peftkit_base.json"  # peftkit's fingerprint of the base, beside PEFT's files
_ALIASES = {"peftkit:minilm": "sentence-transformers/all-MiniLM-L6-v2"}  # load_base's names, as the Hub spells them
PREFIX = "base_model.model."
# PEFT features with no peftkit equivalent: importing them would silently change the outputs.
_UNSUPPORTED = {"bias": "none", "layers_to_transform": None,
                "layer_replication": None, "lora_bias": False, "use_qalora": False,
                "target_parameters": None, "trainable_token_indices": None, "exclude_modules": None}
# The MultiheadAttention out_proj pair: peftkit keeps it on the wrapper, PEFT on a LoRA Linear
# inside the module it wraps (its `base_layer`).
_OUT_PAIR = {".lora_out_A": ".base_layer.out_proj.lora_A.weight", ".lora_out_B": ".base_layer.out_proj.lora_B.weight",
             ".lora_magnitude": ".lora_magnitude_vector"}  # DoRA's magnitude, (out,)
def _peft_key(name: str) -> str:
    # ours: <path>.lora_A -> PEFT: base_model.model.<path>.lora_A.weight; embeddings' factors have
    # no ".weight" in either; the head keeps its name.
    for ours, theirs in _OUT_PAIR.items():
        if name.endswith(ours):
            return PREFIX + name[: -len(ours)] + theirs
    return PREFIX + (name + ".weight" if name.endswith((".lora_A", ".lora_B")) else name)


def _our_name(key: str) -> str:
    name = key[len(PREFIX):].replace(".modules_to_save.default.", ".").replace(".default.", ".")
    for ours, theirs in _OUT_PAIR.items():
        if name.endswith(theirs):
            return name[: -len(theirs)] + ours
    return name[: -len(".weight")] if name.endswith((".lora_A.weight", ".lora_B.weight")) else name


def export_peft(model: nn.Module, directory, base_model_name_or_path: str | None = None) -> Path:
    """Write a LoRA model as a PEFT adapter folder that `peft.PeftModel.from_pretrained` loads."""
    done = applied(model)
    if done is not None and isinstance(done.method, PeftMethod):
        return _export_peft_method(model, done, Path(directory), base_model_name_or_path)
    if done is None or not isinstance(done.method, LoRA):
        what = done.method.name if done else "no method"
        raise ValueError(f"export_peft writes LoRA adapters, and this model has {what}. PEFT's "
                         "LoRA layout has no place for bottleneck adapters; use save_adapter instead.")
    if any(m.merged for m in lora_layers(model)):
        raise ValueError("the LoRA is merged into the base weights; call peftkit.unmerge(model) "
                         "before export_peft, or PEFT would add the update a second time.")
    m = done.method
    state = adapter_state(model)
    r, alpha = m.r, m.alpha
    pissa = {n: x for n, x in model.named_modules() if isinstance(x, LoRALinear) and x.init == "pissa"}
    if pissa:  # as a plain rank-2r LoRA on W0 (module docstring); alpha keeps the scale s
        wraps = wrapper_names(model)
        r, alpha = 2 * m.r, m.alpha * (math.sqrt(2) if m.rslora else 2)
        for n, x in pissa.items():
            name = canonical_name(n, wraps)
            state[name + ".lora_A"] = torch.cat([x.lora_A, x.lora_A0]).detach()
            state[name + ".lora_B"] = torch.cat([x.lora_B, -x.lora_B0], dim=1).detach()
    wraps = wrapper_names(model)
    loras = {id(x) for x in lora_layers(model)}
    targets = sorted({canonical_name(n, wraps) for n, x in model.named_modules() if id(x) in loras})
    config = {
        "peft_type": "LORA", "task_type": peft_task_type(model), "r": r, "lora_alpha": alpha,
        "lora_dropout": m.dropout, "use_rslora": m.rslora,
        # full module names: PEFT matches list entries exactly or as a dotted suffix
        "target_modules": targets, "modules_to_save": list(done.heads) or None,
        "bias": "none", "init_lora_weights": True, "inference_mode": True,
        "fan_in_fan_out": any(isinstance(x, LoRALinear) and x.fan_in_fan_out for x in lora_layers(model)),
        "use_dora": isinstance(m, DoRA), "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None),
    }
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_tensors(d / PEFT_WEIGHTS, {_peft_key(k): v for k, v in state.items()}, {"format": "pt"})
    write_json(d / PEFT_CONFIG, config)
    write_json(d / BASE_FILE, {"format": "peftkit-base", "base": fingerprint(model, done.head, m),
                               "tensors_sha256": sha256_file(d / PEFT_WEIGHTS)})
    return d


def _base_name(name) -> str | None:
    """A base's name as the Hub spells it (peftkit's own names mapped to theirs), lower case; None
    when unknown or a local path (paths differ from machine to machine, so they prove nothing)."""
    if not isinstance(name, str) or not name.strip():
        return None
    name = _ALIASES.get(name, name).strip()
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return None
    return name.lower()


def _saved_heads(model: nn.Module, saved: list, tensors: dict) -> tuple[str, ...]:
    """The modules PEFT saved for `modules_to_save`: by PEFT's rule, every module whose name ends
    with an entry ("classifier" also catches DistilBERT's pre_classifier), here those whose
    tensors the file holds, outermost only."""
    found = [n for n, _ in model.named_modules() if n and any(n.endswith(e) for e in saved)
             and any(t.startswith(n + ".") for t in tensors)]
    return tuple(n for n in found if not any(n.startswith(o + ".") for o in found if o != n))


def import_peft(model: nn.Module, directory, verbose: bool = True, check_name: bool = True) -> nn.Module:
    """Apply a PEFT LoRA adapter folder to a fresh base `model`. Everything is checked first; on
    any error the model is unchanged. check_name=False skips only the comparison of the base's
    name (for a base known under two names); the fingerprint and every shape are always checked."""
    d = Path(directory)
    cfg = read_json(d / PEFT_CONFIG, "import_peft")
    if cfg.get("peft_type") != "LORA":
        return _import_peft_method(model, d, cfg, verbose)
    for key, plain in _UNSUPPORTED.items():
        if cfg.get(key, plain) not in (plain, None, False, {}, [], ""):
            raise AdapterFileError(f"{d / PEFT_CONFIG} uses {key}={cfg[key]!r}, which peftkit does not "
                                   f"implement (only {key}={plain!r}); importing it would change the outputs.")
    if isinstance(cfg.get("init_lora_weights"), str) and cfg["init_lora_weights"].lower().startswith(("pissa", "olora", "corda", "eva")):
        raise AdapterFileError(
            f"{d / PEFT_CONFIG} holds a LoRA initialised with {cfg['init_lora_weights']!r} and saved unconverted: "
            "its factors act on PEFT's residual base, not the original weights. Save it from PEFT with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...), which writes a plain LoRA, and import that.")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise AdapterFileError(f"{d / PEFT_CONFIG} sets per-layer {key}; peftkit uses one r and alpha for all layers.")
    targets = cfg.get("target_modules")
    if not targets:
        raise AdapterFileError(f"{d / PEFT_CONFIG} names no target_modules.")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise AdapterFileError(f"{d / PEFT_CONFIG}: target_modules must be a list of module names or one regex string, "
                               f"got {targets!r:.80}.")
    saved = cfg.get("modules_to_save") or []
    if not (isinstance(saved, list) and all(isinstance(h, str) and h for h in saved)):
        raise AdapterFileError(f"{d / PEFT_CONFIG}: modules_to_save must be a list of module names, got {saved!r:.80}.")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool):
        raise AdapterFileError(f"{d / PEFT_CONFIG}: r must be a positive integer, got {r!r:.40}.")
    try:
        method = (DoRA if cfg.get("use_dora") else LoRA)(r=r, alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                      targets=tuple(targets) if isinstance(targets, list) else targets,
                      rslora=bool(cfg.get("use_rslora", False)))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise AdapterFileError(f"{d / PEFT_CONFIG} has an invalid LoRA setting: {type(e).__name__}: {e}") from None
    check_method(method, str(d / PEFT_CONFIG))
    if applied(model) is not None:
        raise ValueError("import_peft needs a fresh base model; this one already has a method applied.")
    if check_name:
        theirs = _base_name(cfg.get("base_model_name_or_path"))
        ours = _base_name(getattr(getattr(model, "config", None), "name_or_path", None))
        if theirs and ours and theirs != ours:
            raise AdapterFileError(f"{d / PEFT_CONFIG} was made for base {cfg['base_model_name_or_path']!r}, and this "
                                   f"model is {model.config.name_or_path!r}. Load the base it was made for; if it is the "
                                   "same model under another name, pass check_name=False.")
    base = None
    if (d / BASE_FILE).exists():  # written by export_peft: the base's fingerprint and the tensors' checksum
        base = read_json(d / BASE_FILE, "import_peft")
        sha = base.get("tensors_sha256")
        if base.get("format") != "peftkit-base" or not isinstance(base.get("base"), dict) or not (sha is None or is_sha256(sha)):
            raise AdapterFileError(f"{d / BASE_FILE} is not the base fingerprint export_peft writes; remove it or export again.")
    try:
        raw = read_tensors(d / PEFT_WEIGHTS, base.get("tensors_sha256") if base else None, d / BASE_FILE)
    except AdapterFileError as e:
        if "SHA-256" not in str(e):
            raise
        raise AdapterFileError(f"{e} If PEFT saved this folder again after export_peft, delete {BASE_FILE}.") from None
    check_values(raw, str(d / PEFT_WEIGHTS))
    tensors = {}
    for k, v in raw.items():
        if not k.startswith(PREFIX):
            raise AdapterFileError(f"{d / PEFT_WEIGHTS}: unexpected key {k!r} (PEFT keys start with {PREFIX!r}).")
        tensors[_our_name(k)] = v
    _check_task(cfg.get("task_type"), model, d)
    # A module named in modules_to_save (exactly, or as a dotted suffix) that the file holds no
    # tensors for would keep its random initial weights: refuse rather than load a different model.
    missing = [n for n, _ in model.named_modules()
               if n and (n in saved or any(n.endswith("." + e) for e in saved))
               and not any(t.startswith(n + ".") for t in tensors)]
    if missing:
        raise AdapterFileError(f"{d / PEFT_CONFIG} names {missing} in modules_to_save, but {d / PEFT_WEIGHTS} holds no "
                               "tensors for it: the module would keep its random initial weights and the outputs would "
                               "differ from the exporter's. Export the adapter again with the module's weights.")
    heads = _saved_heads(model, saved, tensors)
    head = heads[0] if len(heads) == 1 else (heads or None)
    if base is not None:
        check_base(model, AdapterFile(d, method, head, {}, {"base": base["base"]}))
    model = apply_and_fill(model, method, head, tensors, str(d / PEFT_WEIGHTS))
    conv1d = [x.fan_in_fan_out for x in lora_layers(model) if isinstance(x, LoRALinear)]
    if conv1d and bool(cfg.get("fan_in_fan_out")) not in set(conv1d):
        warnings.warn(f"{d / PEFT_CONFIG} sets fan_in_fan_out={cfg.get('fan_in_fan_out')}, which does not fit "
                      "its targets' layout; as PEFT does, each layer uses its own (Conv1D: (in, out)).", stacklevel=2)
    if verbose:
        layers = [n for n, m in model.named_modules() if m in set(lora_layers(model))]
        leaves = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))
        saved_heads = ", ".join(repr(h) for h in heads)
        print(f"import_peft: {method.label} r={method.r} alpha={method.alpha:g}{' (rsLoRA)' if method.rslora else ''} on "
              f"{len(layers)} layers ({leaves}); head: "
              + (f"{saved_heads} from modules_to_save" if heads else "none saved, the model's own stays frozen")
              + f"; {len(raw)} tensors from {d / PEFT_WEIGHTS}")
    return model


def _check_task(task, model: nn.Module, d: Path) -> None:
    mine = peft_task_type(model)
    if task and task != mine:
        warnings.warn(f"{d / PEFT_CONFIG} was saved for task_type {task!r}, and this "
                      f"{type(model).__name__} is {mine or 'no transformers task'!r}; the adapter's tensors "
                      "fit it, but check it is the model the adapter was trained on.", stacklevel=3)


# -- any other PEFT method (core.peft_method.PeftMethod): PEFT's own state-dict functions -----------

def _export_peft_method(model: nn.Module, done, d: Path, base_name) -> Path:
    import peft

    if any(getattr(layer, "merged", False) for _, layer in peft_layers(model)):
        raise ValueError("the PEFT method is merged into the base weights; call peftkit.unmerge(model) before export_peft.")
    state = dict(peft.get_peft_model_state_dict(peft_model_of(model), adapter_name=PEFT_ADAPTER))  # base_model.model.*
    heads = {k: v for k, v in adapter_state(model).items() if any(k.startswith(h + ".") for h in done.heads)}
    state.update({PREFIX + k: v for k, v in heads.items()})
    config = {**done.method.config, "task_type": peft_task_type(model), "modules_to_save": list(done.heads) or None,
              "inference_mode": True,
              "base_model_name_or_path": base_name or getattr(getattr(model, "config", None), "name_or_path", None)}
    d.mkdir(parents=True, exist_ok=True)
    write_tensors(d / PEFT_WEIGHTS, {k: v.detach().contiguous() for k, v in state.items()}, {"format": "pt"})
    write_json(d / PEFT_CONFIG, config)
    write_json(d / BASE_FILE, {"format": "peftkit-base", "base": fingerprint(model, done.head, done.method),
                               "tensors_sha256": sha256_file(d / PEFT_WEIGHTS)})
    return d


def _import_peft_method(model: nn.Module, d: Path, cfg: dict, verbose: bool) -> nn.Module:
    """A PEFT folder of another tuner: applied as PeftMethod, filled by PEFT's set_peft_model_state_dict
    on a copy first, so a file that does not fit leaves the model unchanged."""
    import copy

    import peft

    saved = cfg.get("modules_to_save") or []
    try:
        method = PeftMethod({k: v for k, v in cfg.items() if k not in ("modules_to_save", "base_model_name_or_path",
                                                                        "inference_mode")})
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{d / PEFT_CONFIG}: {e}") from None
    if applied(model) is not None:
        raise ValueError("import_peft needs a fresh base model; this one already has a method applied.")
    raw = read_tensors(d / PEFT_WEIGHTS)
    check_values(raw, str(d / PEFT_WEIGHTS))
    if any(not k.startswith("base_model.") for k in raw):
        bad = next(k for k in raw if not k.startswith("base_model."))
        raise AdapterFileError(f"{d / PEFT_WEIGHTS}: unexpected key {bad!r} (PEFT keys start with 'base_model.').")
    tensors = {k[len(PREFIX):]: v for k, v in raw.items() if k.startswith(PREFIX)}
    heads = _saved_heads(model, saved, tensors)
    head_t = {k: v for k, v in tensors.items() if any(k.startswith(h + ".") for h in heads)}
    own = {k: v for k, v in raw.items() if k[len(PREFIX):] not in head_t}  # PEFT's keys, as PEFT wrote them

    def fill(m):
        from ..core.surgery import apply
        apply(m, method, head=heads or None)
        result = peft.set_peft_model_state_dict(peft_model_of(m), own, adapter_name=PEFT_ADAPTER)
        params = {PREFIX + n for n, p in m.named_parameters() if p.requires_grad}  # (AdaLoRA's ranknum is not saved)
        missing = [k for k in result.missing_keys if k in params and PEFT_ADAPTER in k.split(".")]
        if result.unexpected_keys or missing:
            raise AdapterFileError(f"{d / PEFT_WEIGHTS} does not fit this {method.peft_type} on this "
                                   f"{type(m).__name__}: missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}.")
        state = adapter_state(m)
        check_tensors({k: v for k, v in state.items() if k in head_t or any(k.startswith(h + ".") for h in heads)},
                      head_t, str(d / PEFT_WEIGHTS))
        with torch.no_grad():
            for k, v in head_t.items():
                state[k].copy_(v)
        return m

    _check_task(cfg.get("task_type"), model, d)
    fill(copy.deepcopy(model))  # every check, on a copy
    model = fill(model)
    if verbose:
        print(f"import_peft: {method.describe()} on {len(peft_layers(model))} layers; head: "
              + (", ".join(repr(h) for h in heads) or "none saved") + f"; {len(raw)} tensors from {d / PEFT_WEIGHTS}")
    return model
