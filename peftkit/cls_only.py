"""A CLS-only last layer for BERT sequence classifiers in training.

BERT's classification head reads one position of the last layer, [CLS]: the pooler takes
`hidden[:, 0]` and nothing else looks at the rest. In the last layer the other positions still
serve as keys and values for [CLS], but their own queries, attention outputs and feed-forward
blocks feed nothing. On MiniLM that dead work is 5/6 of the last layer's matrix products, about
a seventh of every training step, in the forward and the backward pass, for every method.

`use_cls_only_last_layer(model)` switches the last encoder layer to a class whose training
forward computes the query, attention, output projection and feed-forward block for [CLS] only
(keys and values still for every token). The function is the same: logits and gradients agree
with the full layer up to float rounding. So is the random stream: each dropout in the layer
draws its mask for the full (batch, tokens, ...) shape, exactly as before, and keeps row 0, so a
seeded run draws the same masks everywhere else too and trains the same model.

It is off in eval mode (evaluation, serving and exports see the ordinary layer), when a caller
asks for hidden states or attentions, for decoders and caches, and for one-token inputs. The
layer's output in training is (batch, 1, hidden): code that reads `last_hidden_state` of a
training-mode forward should turn it off (`use_cls_only_last_layer(model, False)`).
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

_SUBCLASSES: dict = {}  # (plain class, flag) -> its training-forward subclass


def _collector_wants_outputs() -> bool:
    """True while transformers is recording per-layer hidden states or attentions."""
    from transformers.utils.output_capturing import _active_collector
    collected = _active_collector.get()
    return bool(collected) and ("hidden_states" in collected or "attentions" in collected)


def _noise(mod: nn.Module, run, like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The scaled mask, mask / (1 - p), that dropout `mod` would draw for an input of `shape`.
    torch's CPU dropout draws it as bernoulli_(1 - p) then div_(1 - p), and that is done here
    directly; any other dropout (FastDropout; CUDA's fused kernel) is run on ones, which gives
    its scaled mask bit for bit."""
    if type(mod) is nn.Dropout and like.device.type == "cpu" and mod.p < 1:
        return like.new_empty(shape).bernoulli_(1 - mod.p).div_(1 - mod.p)
    return run(like.new_ones(shape))


@contextlib.contextmanager
def _full_shape_masks(layer: nn.Module, tokens: int, rows: torch.Tensor | None = None, batch: int = 0):
    """While active, a dropout in `layer` draws its mask for the shape the padded whole layer
    would give it, so the random stream is unchanged, and applies the part its input covers:
    a one-token input (batch, 1, ...) gets row 0 of a (batch, tokens, ...) mask; with `rows` (the
    flat indices of the real tokens, `peftkit.unpad`) an unpadded (n, ...) input gets those rows
    of a (batch * tokens, ...) mask. Same numel, same memory order: the same draws."""
    patched = []
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Dropout) and not name.endswith("attention.self.dropout"):
            run = mod.forward  # the class's forward, bound; FastDropout and nn.Dropout alike

            def forward(x, run=run, mod=mod):
                if mod.p == 0 or not mod.training or x.dim() < 2:
                    return run(x)
                # x times the rows of the scaled mask it covers is what the padded layer computes
                # there, and the gradient is the same mask.
                if rows is not None and x.dim() == 2 and x.shape[0] == rows.numel():
                    return x * _noise(mod, run, x, (batch * tokens,) + tuple(x.shape[1:])).index_select(0, rows)
                if x.dim() > 2 and x.shape[1] == 1:
                    return x * _noise(mod, run, x, (x.shape[0], tokens) + tuple(x.shape[2:]))[:, :1]
                return run(x)
            mod.forward = forward
            patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


def _cls_attention(sa: nn.Module, q, k, v, mask, tokens: int):
    """Attention of the [CLS] query over every key, with attention-probability dropout drawn as
    the full (batch, heads, tokens, tokens) mask, row 0 kept (as eager and SDPA math draw it)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * sa.scaling  # (B, h, 1, T)
    if mask is not None:
        if mask.dim() == 4 and mask.shape[-2] == tokens:
            mask = mask[..., :1, :]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    p = sa.dropout.p
    if p > 0:
        full = (q.shape[0], q.shape[1], tokens, tokens)
        probs = probs * F.dropout(probs.new_ones(full), p, training=True)[:, :, :1]
    return torch.matmul(probs, v)  # (B, h, 1, d)


def _forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
             encoder_attention_mask=None, cache=None, **kwargs):
    tokens = hidden_states.shape[1]
    if (not self.training or tokens < 2 or cache is not None or encoder_hidden_states is not None
            or getattr(self, "is_decoder", False) or _collector_wants_outputs()):
        return super(type(self), self).forward(hidden_states, attention_mask, encoder_hidden_states,
                                               encoder_attention_mask=encoder_attention_mask, cache=cache, **kwargs)
    sa = self.attention.self
    b, d = hidden_states.shape[0], sa.attention_head_size
    cls = hidden_states[:, :1]
    with _full_shape_masks(self, tokens):
        # Same order of calls (and so of random draws) as the full layer: query, key, value,
        # attention dropout, output projection's dropout, feed-forward's dropout.
        q = sa.query(cls).view(b, 1, -1, d).transpose(1, 2)
        k = sa.key(hidden_states).view(b, tokens, -1, d).transpose(1, 2)
        v = sa.value(hidden_states).view(b, tokens, -1, d).transpose(1, 2)
        ctx = _cls_attention(sa, q, k, v, attention_mask, tokens).transpose(1, 2).reshape(b, 1, -1)
        return self.feed_forward_chunk(self.attention.output(ctx, cls))


def switch_class(module: nn.Module, flag: str, suffix: str, forward, home: str, enabled: bool) -> bool:
    """Give `module` a subclass of its plain class whose forward is `forward`, marked by the class
    attribute `flag`, or with enabled=False its plain class back; switching twice is one switch.
    The subclass is named plain name + `suffix` and set on module `home`, so pickle finds it and the
    model still pickles; the state dict is untouched. Returns whether it is on now: False, changing
    nothing, under a transformers without output capture (4.x), where the training forwards could
    not tell whether hidden states are wanted."""
    try:
        _collector_wants_outputs()
    except ImportError:
        return False
    base = type(module).__mro__[1] if getattr(module, flag, False) else type(module)
    if enabled and (base, flag) not in _SUBCLASSES:
        cls = type(base.__name__ + suffix, (base,), {"forward": forward, "__module__": home, flag: True})
        setattr(sys.modules[home], cls.__name__, cls)
        _SUBCLASSES[base, flag] = cls
    module.__class__ = _SUBCLASSES[base, flag] if enabled else base
    return enabled


def _last_bert_layer(model: nn.Module):
    from transformers import BertForSequenceClassification
    for m in model.modules():
        if isinstance(m, BertForSequenceClassification):
            return m.bert.encoder.layer, len(m.bert.encoder.layer) - 1
    return None, None


def use_cls_only_last_layer(model: nn.Module, enabled: bool = True) -> bool:
    """Switch the last encoder layer of a BERT sequence classifier (plain, or wrapped by peftkit
    or PEFT) to the CLS-only training forward, or back with enabled=False. Returns whether it is
    on now; False, changing nothing, for other models or a transformers without output capture."""
    layers, i = _last_bert_layer(model)
    if layers is None:
        return False
    return switch_class(layers[i], "cls_only", "ClsOnly", _forward, __name__, enabled)
