"""Hugging Face PEFT interoperability: LoRA adapters in PEFT's on-disk layout.

A PEFT LoRA folder holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, lora_dropout,
target_modules, use_rslora, modules_to_save, ...) and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), plus the
head as `base_model.model.<head path>.weight` and `.bias`. PEFT's A and B are peftkit's A and B
and both scale by lora_alpha / r (or / sqrt(r) with use_rslora), so conversion is a renaming.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..core.methods import LoRA
from ..core.surgery import applied, lora_layers
from .adapter_file import (
    AdapterFileError,
    apply_and_fill,
    adapter_state,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT features with no peftkit equivalent: importing them would silently change the outputs.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "layers_to_transform": None,
                "layer_replication": None, "lora_bias": False, "use_qalora": False}


def _peft_key(name: str) -> str:
    # ours: <path>.lora_A -> PEFT: base_model.model.<path>.lora_A.weight; the head keeps its name.
    return PREFIX + (name + ".weight" if name.endswith((".lora_A", ".lora_B")) else name)


def export_peft(model: nn.Module, directory, base_model_name_or_path: str | None = None) -> Path:
    """Write a LoRA model as a PEFT adapter folder that `peft.PeftModel.from_pretrained` loads."""
    done = applied(model)
    if done is None or not isinstance(done.method, LoRA):
        what = done.method.name if done else "no method"
        raise ValueError(f"export_peft writes LoRA adapters, and this model has {what}. PEFT's "
                         "LoRA layout has no place for bottleneck adapters; use save_adapter instead.")
    if any(m.merged for m in lora_layers(model)):
        raise ValueError("the LoRA is merged into the base weights; call peftkit.unmerge(model) "
                         "before export_peft, or PEFT would add the update a second time.")
    m = done.method
    state = adapter_state(model)
    targets = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith((".lora_A", ".lora_B"))})
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": m.r, "lora_alpha": m.alpha,
        "lora_dropout": m.dropout, "use_rslora": m.rslora,
        # full module names: PEFT matches list entries exactly or as a dotted suffix
        "target_modules": targets, "modules_to_save": [done.head] if done.head else None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None),
    }
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_tensors(d / PEFT_WEIGHTS, {_peft_key(k): v for k, v in state.items()}, {"format": "pt"})
    write_json(d / PEFT_CONFIG, config)
    return d


def import_peft(model: nn.Module, directory) -> nn.Module:
    """Apply a PEFT LoRA adapter folder to a fresh base `model`. The model is unchanged on error."""
    d = Path(directory)
    cfg = read_json(d / PEFT_CONFIG, "import_peft")
    if cfg.get("peft_type") != "LORA":
        raise AdapterFileError(f"{d / PEFT_CONFIG} has peft_type {cfg.get('peft_type')!r}; peftkit imports LORA only.")
    for key, plain in _UNSUPPORTED.items():
        if cfg.get(key, plain) not in (plain, None, False, {}, []):
            raise AdapterFileError(f"{d / PEFT_CONFIG} uses {key}={cfg[key]!r}, which peftkit does not "
                                   f"implement (only {key}={plain!r}); importing it would change the outputs.")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise AdapterFileError(f"{d / PEFT_CONFIG} sets per-layer {key}; peftkit uses one r and alpha for all layers.")
    targets = cfg.get("target_modules")
    if not targets:
        raise AdapterFileError(f"{d / PEFT_CONFIG} names no target_modules.")
    try:
        method = LoRA(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                      targets=tuple(targets) if isinstance(targets, list) else targets,
                      rslora=bool(cfg.get("use_rslora", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{d / PEFT_CONFIG} has an invalid LoRA setting: {e}") from None
    raw = read_tensors(d / PEFT_WEIGHTS)
    tensors = {}
    for k, v in raw.items():
        if not k.startswith(PREFIX):
            raise AdapterFileError(f"{d / PEFT_WEIGHTS}: unexpected key {k!r} (PEFT keys start with {PREFIX!r}).")
        name = k[len(PREFIX):].replace(".modules_to_save.default.", ".").replace(".default.", ".")
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            name = name[: -len(".weight")]
        tensors[name] = v
    saved = cfg.get("modules_to_save") or []
    head = next((h for h in saved if any(t.startswith(h + ".") for t in tensors)), None)
    if applied(model) is not None:
        raise ValueError("import_peft needs a fresh base model; this one already has a method applied.")
    return apply_and_fill(model, method, head, tensors, str(d / PEFT_WEIGHTS))
