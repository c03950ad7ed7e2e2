"""Any Hugging Face PEFT method through peftkit's harness: `PeftMethod(config)`.

`PeftMethod(peft.VeraConfig(r=256, target_modules=["query", "value"]))` (or the config as a
dict, as `to_dict` writes it) is a spec like any other: `apply` injects it in place with
`peft.get_peft_model`, and `report`, `compare` (cached under the config's JSON), `recommend`,
`save_adapter`/`load_adapter`, `export_peft` and the Deployer take it. Three choices make that work
without the rest of peftkit learning PEFT's classes:

- PEFT's adapter name is `adapter_peft` (`layers.names.PEFT_ADAPTER`). PEFT files every tensor it
  adds under that key (`query.vera_lambda_b.adapter_peft`), so the naming contract holds: freezing,
  counting and saving see them as adapter tensors by their prefix, as they see `lora_A`.
- peftkit keeps the task head (surgery's rules, as for LoRA), so the config is injected with
  task_type None and no modules_to_save. The task_type a config names is still checked against
  the model first, and a mismatch is an error (PEFT would build the wrong model class).
- PEFT's layers wrap their base as `base_layer`; `peft_layers` finds them (a PEFT module that has
  `get_base_layer`), unload replaces each by its base, and merge calls PEFT's own `merge`.

Prompt-learning methods (prompt tuning, prefix tuning, P-tuning) change the model's forward,
not its layers, and need PEFT's model wrapper around every call: they are refused, saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn
from transformers.models.auto import modeling_auto

from ..layers.names import PEFT_ADAPTER
from .spec import Method, register
from .targets import TargetError

# task_type by transformers' auto-class tables: the class names each task's Auto class builds.
_TASKS = (("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
          ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
          ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
          ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
          ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
          ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"))


def _class_names(table: str) -> set[str]:
    names = set()
    for v in getattr(modeling_auto, table, {}).values():
        names.update((v,) if isinstance(v, str) else v)
    return names


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for `model`: the task whose transformers Auto class builds its class,
    for a model that takes token ids; None for anything else (PEFT's plain PeftModel)."""
    if getattr(model, "main_input_name", None) != "input_ids":
        return None
    cls = type(model).__name__
    return next((task for task, table in _TASKS if cls in _class_names(table)), None)


def is_peft_layer(module: nn.Module) -> bool:
    """True for a layer PEFT injected (a tuner layer wrapping its `base_layer`)."""
    return type(module).__module__.startswith("peft.") and callable(getattr(module, "get_base_layer", None))


def peft_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for the outermost PEFT tuner layers of `model`."""
    found = []
    for n, m in model.named_modules():
        if is_peft_layer(m) and not any(n.startswith(o + ".") for o, _ in found):
            found.append((n, m))
    return found


def _json_safe(v):
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "value") and type(v).__module__.startswith("peft"):  # PEFT's enums
        return v.value
    return v


def config_dict(config) -> dict:
    """A PEFT config (or its dict) as plain, sorted JSON values: the spec's identity and cache key."""
    import peft

    if isinstance(config, peft.PeftConfig):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"PeftMethod takes a peft config (e.g. peft.VeraConfig(...)) or its dict, got "
                        f"{type(config).__name__}.")
    d = _json_safe(dict(config))
    if not isinstance(d.get("peft_type"), str):
        raise ValueError("a PEFT config dict needs its peft_type (e.g. 'VERA'); build it with peft's config "
                         "class, e.g. peft.VeraConfig(...), and pass that.")
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def build_config(d: dict):
    """The peft config object for a `config_dict`; raises ValueError naming what peft refused."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(d["peft_type"])
    if cls is None:
        raise ValueError(f"peft {peft.__version__} has no method {d['peft_type']!r}; it has "
                         f"{', '.join(sorted(PEFT_TYPE_TO_CONFIG_MAPPING))}.")
    kwargs = {k: v for k, v in d.items() if k not in ("peft_type", "peft_version", "revision", "auto_mapping")}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"peft refused this {d['peft_type']} config: {e}") from None


@register("peft")
@dataclass(frozen=True, eq=True)
class PeftMethod(Method):
    """Any Hugging Face PEFT tuner (VeRA, IA3, LoHa, LoKr, AdaLoRA, OFT, ...), applied by PEFT."""

    label: ClassVar[str] = "PEFT"
    color: ClassVar[str] = "#252525"  # near black: every PEFT-backed method (no registry colour repeats a quantity's)
    default_lr: ClassVar[float] = 5e-3
    lr_reason: ClassVar[str] = ("LoRA's rate, a starting point only: PEFT's methods differ (VeRA's paper trains "
                                "its vectors at about 10x LoRA's), so compare them with lr='val' or a rate of their own")
    lr_grid: ClassVar[tuple[float, ...]] = (2e-3, 5e-3, 1e-2)
    mixes: ClassVar[bool] = False  # the Deployer's mixed batches add s B A x per row; PEFT's layers do not
    # The test matrix: targets that exist on each test model (PEFT needs only one to match).
    variants: ClassVar[dict[str, dict]] = {
        "vera": {"config": {"peft_type": "VERA", "r": 4, "target_modules": ["fc1", "fc2", "query", "value"]}},
        "ia3": {"config": {"peft_type": "IA3", "target_modules": ["fc1", "fc2", "query", "value"],
                           "feedforward_modules": []}},
    }

    config: Any = None

    def __post_init__(self):
        if self.config is None:
            raise TypeError("PeftMethod(config) takes a peft config, e.g. PeftMethod(peft.VeraConfig(r=256, "
                            "target_modules=['query', 'value'])).")
        d = config_dict(self.config)
        cfg = build_config(d)
        if cfg.is_prompt_learning:
            raise ValueError(f"{d['peft_type']} is a prompt-learning method: it changes the model's forward, not "
                             "its layers, and needs PEFT's model wrapper around every call, which peftkit's "
                             "harness does not use. Use a tuner method (LORA, VERA, IA3, LOHA, LOKR, ADALORA, OFT, ...).")
        if d.get("modules_to_save"):
            raise ValueError(f"this {d['peft_type']} config sets modules_to_save={d['modules_to_save']}; peftkit "
                             "trains and saves the task head itself (apply(..., head=...)). Leave it out.")
        object.__setattr__(self, "config", d)

    def __hash__(self):
        return hash(json.dumps(self.config, sort_keys=True))

    @property
    def peft_type(self) -> str:
        return self.config["peft_type"]

    def peft_config(self, task_type="keep"):
        """The peft config object; task_type=None gives the one `inject` uses (peftkit keeps the head)."""
        cfg = build_config(self.config)
        if task_type != "keep":
            cfg.task_type = task_type
        return cfg

    def describe(self):
        r = self.config.get("r")
        return f"peft {self.peft_type.lower()}" + (f" r={r}" if isinstance(r, int) else "")

    def plan(self, model, exclude=()):
        want, mine = self.config.get("task_type"), peft_task_type(model)
        if want and want != mine:
            raise TargetError(
                f"this {self.peft_type} config is for task_type {want!r}, and this {type(model).__name__} is "
                f"{mine or 'no transformers task'!r}: PEFT would wrap it in the wrong model class. Set "
                f"task_type={mine!r} (or leave it out: peftkit keeps the model's own head).")
        import copy

        from peft import get_peft_model

        probe = copy.deepcopy(model)  # PEFT's own target matching, on a copy: the model stays as it is
        try:
            get_peft_model(probe, self.peft_config(task_type=None), adapter_name=PEFT_ADAPTER)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise TargetError(f"PEFT cannot apply this {self.peft_type} config to this {type(model).__name__}: {e}") from None
        names = [n for n, _ in peft_layers(probe)]
        bad = [n for n in names if any(n == e or n.startswith(e + ".") for e in exclude)]
        if bad:
            raise TargetError(f"this {self.peft_type} config targets {bad[0]!r}, which is the task head; peftkit "
                              "trains the head whole. Leave it out of target_modules.")
        return names

    def inject(self, model, names):
        from peft import get_peft_model

        wrapper = get_peft_model(model, self.peft_config(task_type=None), adapter_name=PEFT_ADAPTER)
        # Kept beside the modules (not registered as one: it holds the model), for PEFT's own
        # state-dict functions, which read tuner-level tensors such as VeRA's shared projections.
        model.__dict__[PEFT_MODEL_ATTR] = wrapper


PEFT_MODEL_ATTR = "_peftkit_peft_model"


def peft_model_of(model: nn.Module):
    """The PeftModel that `PeftMethod.inject` made around `model` (None for other methods)."""
    return model.__dict__.get(PEFT_MODEL_ATTR)
