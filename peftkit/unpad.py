"""Padding-free training for BERT sequence classifiers: the encoder skips the pad tokens.

A batch is padded to its longest member, and the padded positions go through every matrix
product of every layer although nothing reads them: the attention mask hides them as keys, and
the head reads [CLS]. On the movie snippets in random batches of 32 that is about half of all
tokens (858 real of 1,654 a batch), so about half of every step's matrix products, for every method.

`use_unpadded_encoder(model)` switches the encoder to a class whose training forward packs the
real tokens into one (tokens, hidden) matrix and runs the projections, the feed-forward blocks,
the LayerNorms and the dropouts (and any LoRA or adapter inside them) on that matrix only. Only
attention itself sees the padded (batch, heads, length, d) layout, rebuilt from the packed rows
each layer, so every attention kernel and mask works unchanged. With the CLS-only last layer
(`peftkit.cls_only`) on, the last layer computes [CLS] from the packed keys and values.

The function is the same: logits and gradients agree with the padded encoder up to float
rounding. So is the random stream: each dropout draws its mask for the padded shape, as before,
and keeps the rows of the real tokens, so a seeded run trains the same model.

It is off in eval mode, when a caller asks for hidden states or attentions, for decoders,
caches, gradient checkpointing, chunked feed-forward and hooks on a layer, for batches without padding, and
when position 0 is padding (left-padded batches). In a training forward with padding, the
encoder's `last_hidden_state` is 0 at pad positions.
"""

from __future__ import annotations

import torch
from torch import nn

from .cls_only import _cls_attention, _collector_wants_outputs, _full_shape_masks, switch_class


def _real_tokens(mask) -> torch.Tensor | None:
    """(batch, length) bool of the real tokens, read from the 4-D attention mask that BERT builds
    (bool for SDPA, additive float for eager); None when there is no mask, so no padding."""
    if mask is None or mask.dim() != 4:
        return None
    row = mask[:, 0, 0, :]  # what [CLS] may attend to: the real tokens of each sequence
    return row if row.dtype == torch.bool else row == 0


def _user_hooks(layer: nn.Module) -> bool:
    """Whether a forward hook other than transformers' own output capture sits on `layer`: the
    packed forward calls the layer's parts, not the layer, so such a hook would not run."""
    hooks = list(layer._forward_hooks.values()) + list(layer._forward_pre_hooks.values())
    return any(getattr(h, "__module__", "") != "transformers.utils.output_capturing" for h in hooks)


def _padded(x: torch.Tensor, rows: torch.Tensor, batch: int, tokens: int, heads: int) -> torch.Tensor:
    """Packed (n, hidden) rows back into the (batch, heads, tokens, d) layout attention wants; pad
    positions are 0 (the mask hides them)."""
    full = x.new_zeros(batch * tokens, x.shape[1]).index_copy(0, rows, x)
    return full.view(batch, tokens, heads, -1).transpose(1, 2)


def _attention(sa, q, k, v, mask):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager_attention_forward)
    out, _ = attend(sa, q, k, v, mask, dropout=sa.dropout.p if sa.training else 0.0, scaling=sa.scaling)
    return out  # (batch, tokens, heads, d)


def _layer(layer, x, rows, cls_rows, batch: int, tokens: int, mask):
    """One BERT layer on the packed rows `x` (n, hidden). The same calls in the same order as the
    padded layer (query, key, value, attention, output projection, feed-forward), so the same
    random draws. With `cls_rows`, the CLS-only form: returns (batch, 1, hidden)."""
    sa = layer.attention.self
    heads = sa.num_attention_heads
    with _full_shape_masks(layer, tokens, rows, batch):
        if cls_rows is not None:
            cls = x.index_select(0, cls_rows).unsqueeze(1)
            q = sa.query(cls).view(batch, 1, heads, -1).transpose(1, 2)
            k = _padded(sa.key(x), rows, batch, tokens, heads)
            v = _padded(sa.value(x), rows, batch, tokens, heads)
            ctx = _cls_attention(sa, q, k, v, mask, tokens).transpose(1, 2).reshape(batch, 1, -1)
            return layer.feed_forward_chunk(layer.attention.output(ctx, cls))
        q = _padded(sa.query(x), rows, batch, tokens, heads)
        k = _padded(sa.key(x), rows, batch, tokens, heads)
        v = _padded(sa.value(x), rows, batch, tokens, heads)
        ctx = _attention(sa, q, k, v, mask).reshape(batch * tokens, -1).index_select(0, rows)
        return layer.feed_forward_chunk(layer.attention.output(ctx, x))


def _forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
             encoder_attention_mask=None, cache=None, use_cache=None, **kwargs):
    real = None
    if (self.training and cache is None and encoder_hidden_states is None
            and not getattr(self.config, "is_decoder", False)
            and not any(getattr(layer, "gradient_checkpointing", False) or layer.chunk_size_feed_forward
                        or _user_hooks(layer) for layer in self.layer)
            and not _collector_wants_outputs()):
        real = _real_tokens(attention_mask)
    if real is None or bool(real.all()) or not bool(real[:, 0].all()):
        return super(type(self), self).forward(hidden_states, attention_mask, encoder_hidden_states,
                                               encoder_attention_mask, cache=cache, use_cache=use_cache, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
    batch, tokens, hidden = hidden_states.shape
    rows = real.reshape(-1).nonzero().squeeze(1)
    lengths = real.sum(1)
    x = hidden_states.reshape(batch * tokens, hidden).index_select(0, rows)
    last = len(self.layer) - 1
    for i, layer in enumerate(self.layer):
        cls_rows = torch.cumsum(lengths, 0) - lengths if i == last and getattr(layer, "cls_only", False) else None
        x = _layer(layer, x, rows, cls_rows, batch, tokens, attention_mask)
    if x.dim() == 2:  # the whole last layer ran: unpack, pad positions 0
        x = x.new_zeros(batch * tokens, hidden).index_copy(0, rows, x).view(batch, tokens, hidden)
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=x)


def _bert_encoder(model: nn.Module):
    from transformers import BertForSequenceClassification
    for m in model.modules():
        if isinstance(m, BertForSequenceClassification):
            return m.bert.encoder
    return None


def use_unpadded_encoder(model: nn.Module, enabled: bool = True) -> bool:
    """Switch the encoder of a BERT sequence classifier (plain, or wrapped by peftkit or PEFT) to
    the padding-free training forward, or back with enabled=False. Returns whether it is on now;
    False, changing nothing, for other models or a transformers without output capture (4.x)."""
    encoder = _bert_encoder(model)
    if encoder is None:
        return False
    return switch_class(encoder, "unpadded", "Unpadded", _forward, __name__, enabled)
