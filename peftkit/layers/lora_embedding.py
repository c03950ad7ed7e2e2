"""LoRA on an embedding table (`nn.Embedding`), with PEFT's factor shapes and names.

An embedding is a lookup: row i of W (num, dim) for token i. Its update is a lookup too:

    y = W[i] + s * (A^T)[i] B^T,      A: (r, num), B: (dim, r)

so each token costs r * dim multiply-adds, a gather of r numbers and one small matmul, and the
(num, dim) matrix s (B A)^T is never formed outside a merge. As in PEFT (`lora_embedding_A`,
`lora_embedding_B`), A starts at zero and B normal, so the layer is its base at initialisation
and A's rows train only for the tokens that occur.

Dropout: the input is token ids, so there is nothing to drop; LoRA's dropout is not applied here
(PEFT does the same). Embeddings that scale their output (BART's `embed_scale`, Gemma's) scale
the update the same way, so merged equals unmerged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALayer
from .names import LORA_PREFIX


def embedding_problem(base: nn.Module) -> str | None:
    """Why LoRA cannot wrap this embedding, or None when it can."""
    if not isinstance(base, nn.Embedding):
        return f"LoRAEmbedding wraps nn.Embedding, got {type(base).__name__}"
    if base.max_norm is not None:
        return "it renormalises rows in place (max_norm), which no low-rank update survives"
    if base.sparse:
        return "it makes sparse gradients (sparse=True)"
    return None


class LoRAEmbedding(LoRALayer):
    """Wraps a frozen nn.Embedding and adds s * (A^T)[ids] B^T (see the module docstring)."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        problem = embedding_problem(base)
        if problem:
            raise TypeError(f"cannot apply LoRA to this {type(base).__name__}: {problem}.")
        self._setup(base, r, alpha, dropout, rslora)
        w = base.weight  # (num, dim)
        kw = dict(dtype=w.dtype, device=w.device)
        setattr(self, LORA_PREFIX + "embedding_A", nn.Parameter(torch.zeros(r, w.shape[0], **kw)))
        setattr(self, LORA_PREFIX + "embedding_B", nn.Parameter(torch.empty(w.shape[1], r, **kw)))
        nn.init.normal_(self.lora_embedding_B)

    _B_NAME = LORA_PREFIX + "embedding_B"

    def _embed_scale(self):
        scale = getattr(self.base, "embed_scale", None)
        return scale if isinstance(scale, (int, float, torch.Tensor)) else None

    def delta_weight(self) -> torch.Tensor:
        """s * (B A)^T, (num, dim), in the base weight's dtype."""
        return (self.lora_embedding_B @ self.lora_embedding_A).t().mul(self.scale).to(self.base.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        if self.merged:
            return y
        # Rows of A^T, (..., r): a gather, as the base's own lookup; then (..., r) @ (r, dim).
        h = F.embedding(ids, self.lora_embedding_A.t(), padding_idx=self.base.padding_idx,
                        scale_grad_by_freq=self.base.scale_grad_by_freq)
        s, embed_scale = self.scale, self._embed_scale()
        if isinstance(embed_scale, torch.Tensor):
            return y + (F.linear(h, self.lora_embedding_B) * (s * embed_scale)).to(y.dtype)
        if embed_scale is not None:
            s = s * embed_scale
        # y + s h B^T in one addmm: one pass over the (tokens, dim) output, where a matmul, a
        # scaling and a sum would take three.
        dim = y.shape[-1]
        B = self.lora_embedding_B.to(y.dtype)
        return torch.addmm(y.reshape(-1, dim), h.reshape(-1, h.shape[-1]).to(y.dtype), B.t(), alpha=s).view(y.shape)
