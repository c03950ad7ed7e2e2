"""The exact fast BERT forward, in training and inference: a CLS-only last layer and a padding-free encoder.

Both rest on one observation: a BERT sequence classifier's head reads the [CLS] position of the
last layer and nothing else, and the attention mask hides the pad tokens as keys. So in training
1. the last layer needs queries, attention outputs and feed-forward blocks for [CLS] only (keys
   and values still for every token): the rest is dead work, 5/6 of that layer's products;
2. the pad tokens of a batch padded to its longest member feed nothing anywhere: the encoder can
   pack the real tokens into one (tokens, hidden) matrix and run the projections, feed-forward
   blocks, LayerNorms and dropouts (and any LoRA or adapter inside them) on that matrix only.
   Attention alone sees the padded (batch, heads, length, d) layout, rebuilt from the packed rows
   in each layer, so every attention kernel and mask works unchanged.

Both compute the same function (logits and gradients agree with the plain padded model up to
float rounding) with the same random stream: each dropout draws its mask at the padded, whole-layer
shape and keeps the rows its input covers, so a seeded run trains the same model.

`use_cls_only_last_layer(model)` and `use_unpadded_encoder(model)` switch them on (load_base does
so by default) or off (enabled=False); `switch_class` is the one class-swapping helper behind
both. They run in every training forward, and in eval mode (evaluation, serving) inside a forward
of the sequence classifier itself (or of PEFT's wrapper around it), whose result is the logits:
a forward hook on the classifier marks those calls. A direct call of the encoder in eval
(`model.bert(...)`, embeddings) gets the ordinary padded, whole-layer output. They are off when a
caller asks for hidden states or attentions, for decoders, caches, gradient checkpointing,
chunked feed-forward, hooks on a layer, batches without padding and left-padded batches. In a
fast forward the encoder's `last_hidden_state` is 0 at pad positions, and holds the [CLS] row
only when the CLS-only layer is on; the logits equal the padded model's up to float rounding.

They rely on transformers internals (its output-capture collector, its attention-function table,
BERT's layer attributes). pyproject.toml pins transformers to the minor version the tests run on.
Under any other version where one of them is missing, the switches warn once and fall back to
the plain forward: the same results, at the plain speed (`FAST_FORWARD_MISSING` says what).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings

import torch
import torch.nn.functional as F
import transformers
from torch import nn

try:  # the internals the fast forwards need; see the module docstring
    from transformers import BertForSequenceClassification
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward
    from transformers.utils.output_capturing import _active_collector
    FAST_FORWARD_MISSING: str | None = None
except ImportError as err:  # transformers 4.x (AdapterHub's environment) or a future 5.x
    BertForSequenceClassification = None
    FAST_FORWARD_MISSING = f"{type(err).__name__}: {err}"

_SUBCLASSES: dict = {}  # (plain class, flag) -> its training-forward subclass
_LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value",
                "attention.self.dropout", "attention.output", "intermediate", "output")
_warned: list[str] = []
# How many sequence-classifier forwards this thread (or task) is inside: in eval, the fast forwards
# run there only, where nothing but the logits leaves the model.
_LOGITS_CALLS = contextvars.ContextVar("peftkit_logits_calls", default=0)


def _enter_logits(module, args) -> None:
    _LOGITS_CALLS.set(_LOGITS_CALLS.get() + 1)


def _leave_logits(module, args, output) -> None:
    _LOGITS_CALLS.set(max(0, _LOGITS_CALLS.get() - 1))


def _fast(module: nn.Module) -> bool:
    """Whether a fast forward may run for `module` now: in training, or in eval inside a
    classifier forward (see the module docstring)."""
    return module.training or _LOGITS_CALLS.get() > 0


def _mark_logits_calls(bert: nn.Module) -> None:
    """Hook the classifier `bert` so its forwards are marked, while either fast forward is on."""
    want = getattr(bert.bert.encoder, "unpadded", False) or getattr(bert.bert.encoder.layer[-1], "cls_only", False)
    have = [k for k, h in bert._forward_pre_hooks.items() if h is _enter_logits]
    if want and not have:
        bert.register_forward_pre_hook(_enter_logits)
        bert.register_forward_hook(_leave_logits, always_call=True)  # also when the forward raises
    elif have and not want:
        for hooks in (bert._forward_pre_hooks, bert._forward_hooks):
            for k in [k for k, h in hooks.items() if h in (_enter_logits, _leave_logits)]:
                del hooks[k]
                bert._forward_hooks_always_called.pop(k, None)


def _fall_back(why: str) -> bool:
    """Warn once per reason that the fast forward is off, and say so (False)."""
    if why not in _warned:
        _warned.append(why)
        warnings.warn(f"peftkit's fast BERT training forward is off: {why} (transformers "
                      f"{transformers.__version__}; peftkit is tested on the version pinned in "
                      f"pyproject.toml). Training falls back to the plain forward: same results, "
                      f"plain speed.", RuntimeWarning, stacklevel=3)
    return False


def _missing_parts(layer: nn.Module) -> list[str]:
    """The BERT layer attributes the fast forwards call that `layer` lacks."""
    missing = [p for p in _LAYER_PARTS if _get(layer, p) is None]
    sa = _get(layer, "attention.self")
    missing += [a for a in ("scaling", "attention_head_size", "num_attention_heads", "config")
                if sa is not None and not hasattr(sa, a)]
    if not hasattr(layer, "feed_forward_chunk"):
        missing.append("feed_forward_chunk")
    return missing


def _get(module: nn.Module, path: str):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _collector_wants_outputs() -> bool:
    """True while transformers is recording per-layer hidden states or attentions."""
    collected = _active_collector.get()
    return bool(collected) and ("hidden_states" in collected or "attentions" in collected)
  # (plain class, flag) -> its training-forward subclass


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
    flat indices of the real tokens, the padding-free encoder) an unpadded (n, ...) input gets those rows
    of a (batch * tokens, ...) mask. Same numel, same memory order: the same draws."""
    if not layer.training:  # eval: no dropout draws, nothing to patch
        yield
        return
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
    if p > 0 and sa.training:
        full = (q.shape[0], q.shape[1], tokens, tokens)
        probs = probs * F.dropout(probs.new_ones(full), p, training=True)[:, :, :1]
    return torch.matmul(probs, v)  # (B, h, 1, d)


def _cls_only_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
             encoder_attention_mask=None, cache=None, **kwargs):
    tokens = hidden_states.shape[1]
    if (not _fast(self) or tokens < 2 or cache is not None or encoder_hidden_states is not None
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


def switch_class(module: nn.Module, flag: str, suffix: str, forward, enabled: bool) -> bool:
    """Give `module` a subclass of its plain class whose forward is `forward`, marked by the class
    attribute `flag`, or with enabled=False its plain class back; switching twice is one switch.
    The subclass is named plain name + `suffix` and set on this module, so pickle finds it and the
    model still pickles; the state dict is untouched. Returns whether it is on now."""
    base = type(module).__mro__[1] if getattr(module, flag, False) else type(module)
    if enabled and (base, flag) not in _SUBCLASSES:
        cls = type(base.__name__ + suffix, (base,), {"forward": forward, "__module__": __name__, flag: True})
        setattr(sys.modules[__name__], cls.__name__, cls)
        _SUBCLASSES[base, flag] = cls
    module.__class__ = _SUBCLASSES[base, flag] if enabled else base
    return enabled


def _bert_classifier(model: nn.Module, enabled: bool):
    """The BERT sequence classifier inside `model` (plain, or wrapped by peftkit or PEFT), or None:
    for other models, and, with a warning, when enabling needs an internal this transformers lacks."""
    if BertForSequenceClassification is None:
        return None if not enabled else _fall_back(f"an internal is missing ({FAST_FORWARD_MISSING})") or None
    bert = next((m for m in model.modules() if isinstance(m, BertForSequenceClassification)), None)
    if bert is None or not enabled:
        return bert
    missing = sorted({p for layer in bert.bert.encoder.layer for p in _missing_parts(layer)})
    if missing:
        return _fall_back(f"its BERT layers lack {', '.join(missing)}") or None
    return bert


def use_cls_only_last_layer(model: nn.Module, enabled: bool = True) -> bool:
    """Switch the last encoder layer of a BERT sequence classifier (plain, or wrapped by peftkit
    or PEFT) to the CLS-only forward (training; eval logits), or back with enabled=False. Returns whether it is
    on now; False, changing nothing, for other models (and, with a warning, without the internals)."""
    bert = _bert_classifier(model, enabled)
    if bert is None:
        return False
    on = switch_class(bert.bert.encoder.layer[-1], "cls_only", "ClsOnly", _cls_only_forward, enabled)
    _mark_logits_calls(bert)
    return on


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


def _unpadded_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
             encoder_attention_mask=None, cache=None, use_cache=None, **kwargs):
    real = None
    if (_fast(self) and cache is None and encoder_hidden_states is None
            and not getattr(self.config, "is_decoder", False)
            and not any(getattr(layer, "gradient_checkpointing", False) or layer.chunk_size_feed_forward
                        or _user_hooks(layer) for layer in self.layer)
            and not _collector_wants_outputs()):
        real = _real_tokens(attention_mask)
    if real is None or bool(real.all()) or not bool(real[:, 0].all()):
        return super(type(self), self).forward(hidden_states, attention_mask, encoder_hidden_states,
                                               encoder_attention_mask, cache=cache, use_cache=use_cache, **kwargs)
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


def use_unpadded_encoder(model: nn.Module, enabled: bool = True) -> bool:
    """Switch the encoder of a BERT sequence classifier (plain, or wrapped by peftkit or PEFT) to
    the padding-free forward (training; eval logits), or back with enabled=False. Returns whether it is on now;
    False, changing nothing, for other models (and, with a warning, without the internals)."""
    bert = _bert_classifier(model, enabled)
    if bert is None:
        return False
    on = switch_class(bert.bert.encoder, "unpadded", "Unpadded", _unpadded_forward, enabled)
    _mark_logits_calls(bert)
    return on
