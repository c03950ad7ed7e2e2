"""What every peftkit wrapper shares: it holds the layer it wraps as `base`, and model code that reads
an attribute of the wrapped layer (`weight`, `bias`, `nf`, `embed_dim`, `batch_first`, ...) gets the
base's. T5 reads `wo.weight.dtype`, GPT-2's pruning reads `nf`, `nn.TransformerEncoderLayer` reads
`self_attn.batch_first`: a wrapper must not break them."""

from __future__ import annotations

from torch import nn


class WrapsBase:
    """Mixin for an nn.Module with a submodule `base`: attributes it lacks are read from `base`."""

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            # During __init__, copy or unpickling `base` may not exist yet: then the plain error.
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None or name.startswith("__") or name == "base":
                raise
            return getattr(base, name)
