"""Layers: `nn.Module`s only. `LoRALinear` wraps a frozen Linear with s·BA; the bottleneck
adapters (Pfeiffer, Houlsby, deep) and `AdapterLinear`; `FastDropout`; and the naming contract
(`names`: every added parameter lives under one declared prefix).

May import: torch only. Nothing here knows about methods, files or models.
"""
