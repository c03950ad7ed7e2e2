"""`Int8Embedding`: an embedding table stored as int8 codes with one fp32 scale per row.

In a small encoder the word embeddings are a large share of the weights (about half of
MiniLM's), so an int8 file that kept them in fp32 would save far less than 4x.
Per-row int8 keeps every row within half a step of its largest entry / 127, and a lookup is a
gather of codes and scales followed by one multiply: nothing else in the model changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import row_scale, modules_of_type


class Int8Embedding(nn.Module):
    """An ``nn.Embedding`` for inference with its table in int8, one fp32 scale per row."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        if embedding.max_norm is not None:
            raise ValueError("an embedding with max_norm renormalizes rows as it looks them up; it cannot be stored in int8.")
        w = embedding.weight.detach().float()
        scale = row_scale(w, 127)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.register_buffer("weight_int8", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale.squeeze(1))

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = F.embedding(ids, self.weight_int8)  # (..., dim) int8: a gather, no float table
        return codes.float() * F.embedding(ids, self.weight_scale[:, None])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


def embedding_layers(model: nn.Module, skip="head") -> dict[str, nn.Embedding]:
    """Every plain nn.Embedding outside `skip` ("head" or a list of module names)."""
    return modules_of_type(model, nn.Embedding, skip)
