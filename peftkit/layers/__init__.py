"""Layers: `nn.Module`s only. The LoRA wrappers, one per layer kind, with PEFT's factor shapes:
`LoRALinear` (nn.Linear, and transformers' Conv1D with fan_in_fan_out) in `lora`, `LoRAConv`
(Conv1d/2d/3d) in `lora_conv`, `LoRAEmbedding` in `lora_embedding`, `LoRAMultiheadAttention` in
`lora_attention`, all sharing `LoRALayer`'s exact, NaN-checked merges; the bottleneck adapters
(Pfeiffer, Houlsby, deep) and `AdapterLinear`; `FastDropout`; `wrap` (a wrapper reads through to
the layer it wraps); and the naming contract (`names`: every added parameter lives under one
declared prefix).

May import: torch only. Nothing here knows about methods, files or models.
"""
