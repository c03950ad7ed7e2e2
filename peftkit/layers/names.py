"""The naming contract: every parameter that peftkit adds lives under one of these prefixes.

Freezing, counting, saving and loading all decide "is this an adapter tensor?" by calling
`is_adapter_param`, and nothing else in the package matches on parameter names.
"""

LORA_PREFIX = "lora_"        # LoRALinear.lora_A, LoRALinear.lora_B
ADAPTER_PREFIX = "adapter_"  # AdapterLinear.adapter_branch.*
PREFIXES = (LORA_PREFIX, ADAPTER_PREFIX)
# The adapter name a PEFT-backed method (core.peft_method) gives PEFT: PEFT files every tensor it
# adds under it (query.vera_lambda_b.adapter_peft), so they fall under ADAPTER_PREFIX too.
PEFT_ADAPTER = ADAPTER_PREFIX + "peft"


def is_adapter_param(name: str) -> bool:
    """True when a dotted parameter name belongs to a LoRA or Adapter module added by peftkit."""
    return any(part.startswith(PREFIXES) for part in name.split("."))


def under(name: str, prefix: str | None) -> bool:
    """True when the dotted module or parameter `name` is `prefix` itself or lies inside it
    ("bert.encoder" is under "bert", "bertx" is not); never for a None prefix."""
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def under_any(name: str, prefixes) -> bool:
    """`under` for several prefixes: a tuple of names, one name, or None (never)."""
    if prefixes is None or isinstance(prefixes, str):
        return under(name, prefixes)
    return any(under(name, p) for p in prefixes)
