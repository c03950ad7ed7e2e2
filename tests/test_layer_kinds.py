"""Each LoRA layer kind on its own: PEFT's factor shapes, identity at init, exact and idempotent
merges, NaN refusal, the fast paths against the plain formula, and for nn.MultiheadAttention a real
gradient, checked against the functional attention with the adapted weights."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit as pk
from peftkit.layers.lora_attention import LoRAMultiheadAttention
from peftkit.layers.lora_conv import LoRAConv
from peftkit.layers.lora_embedding import LoRAEmbedding
from conftest import perturb


def check_merge(layer, run):
    """Merged equals unmerged, a second merge is a no-op, unmerge restores, NaN is refused."""
    with torch.no_grad():
        before = run()
        w0 = [w.clone() for w, _ in layer.deltas()]
        layer.merge()
        merged = [w.clone() for w, _ in layer.deltas()]
        torch.testing.assert_close(run(), before, atol=1e-5, rtol=1e-5)
        layer.merge()
        assert all(torch.equal(w, m) for (w, _), m in zip(layer.deltas(), merged))
        layer.unmerge()
        layer.unmerge()
        for (w, _), w_0 in zip(layer.deltas(), w0):
            torch.testing.assert_close(w, w_0, atol=1e-6, rtol=0)
        torch.testing.assert_close(run(), before, atol=1e-5, rtol=1e-5)
        now = [w.clone() for w, _ in layer.deltas()]
        name = next(n for n, _ in layer.named_parameters() if n.startswith("lora_"))
        layer.get_parameter(name).fill_(float("nan"))
        with pytest.raises(pk.MergeError, match="NaN"):
            layer.merge()
        assert not layer.merged and all(torch.equal(w, w_1) for (w, _), w_1 in zip(layer.deltas(), now))


@pytest.mark.parametrize("conv,shape,kw", [
    (nn.Conv1d, (2, 3, 11), dict(kernel_size=3, padding=1)),
    (nn.Conv2d, (2, 3, 9, 9), dict(kernel_size=3, stride=2, padding=1, dilation=2, padding_mode="reflect")),
    (nn.Conv2d, (2, 3, 6, 6), dict(kernel_size=1)),
    (nn.Conv3d, (1, 3, 4, 5, 5), dict(kernel_size=(1, 3, 3), padding=(0, 1, 1))),
])
def test_conv(conv, shape, kw):
    torch.manual_seed(0)
    base = conv(3, 5, **kw)
    x = torch.randn(*shape)
    layer = LoRAConv(copy.deepcopy(base), r=2, alpha=4)
    k = base.weight.shape[2:]
    assert layer.lora_A.shape == (2, 3, *k) and layer.lora_B.shape == (5, 2, *([1] * len(k)))  # PEFT's
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=0)
    perturb(layer, std=0.3)
    # the plain formula: base + s * conv_B(conv_A(x)), A with the base's stride, padding, dilation
    h = layer.base._conv_forward(x, layer.lora_A, None)
    expected = base(x) + layer.scale * layer._conv(h, layer.lora_B)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # two-path (grad)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # folded, no grad
    layer(x).sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert layer.base.weight.grad is None
    check_merge(layer, lambda: layer(x))


def test_grouped_conv_is_refused():
    with pytest.raises(TypeError, match="grouped"):
        LoRAConv(nn.Conv2d(4, 4, 3, groups=2))
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(pk.TargetError, match="grouped"):
        pk.apply(model, pk.LoRA(targets=("0",)), head=None)
    assert isinstance(model[0], nn.Conv2d)


def test_embedding():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = LoRAEmbedding(copy.deepcopy(base), r=3, alpha=6)
    assert layer.lora_embedding_A.shape == (3, 20) and layer.lora_embedding_B.shape == (6, 3)  # PEFT's
    assert not layer.lora_embedding_A.any()  # A = 0 at init, as PEFT
    ids = torch.tensor([[0, 4, 4, 19], [7, 1, 0, 2]])
    torch.testing.assert_close(layer(ids), base(ids), atol=0, rtol=0)
    perturb(layer, std=0.3)
    expected = base(ids) + layer.scale * layer.lora_embedding_A.t()[ids] @ layer.lora_embedding_B.t()
    torch.testing.assert_close(layer(ids), expected, atol=1e-6, rtol=1e-6)
    layer(ids).sum().backward()
    rows = layer.lora_embedding_A.grad.abs().sum(0)  # only the tokens that occur get a gradient,
    assert rows[4] > 0 and rows[19] > 0 and rows[3] == 0 and rows[0] == 0  # and never padding_idx
    check_merge(layer, lambda: layer(ids))


def test_scaled_embedding_merges_exactly():
    class Scaled(nn.Embedding):  # BART's and Gemma's: the lookup times embed_scale
        embed_scale = 4.0

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    layer = perturb(LoRAEmbedding(Scaled(10, 4), r=2), std=0.3)
    check_merge(layer, lambda: layer(torch.arange(10)))


def test_embedding_problems_are_refused():
    for kw, match in ((dict(max_norm=1.0), "max_norm"), (dict(sparse=True), "sparse")):
        with pytest.raises(TypeError, match=match):
            LoRAEmbedding(nn.Embedding(5, 3, **kw))


def test_conv1d_fan_in_fan_out():
    torch.manual_seed(0)
    base = Conv1D(7, 5)  # GPT-2's layer: weight (in=5, out=7)
    nn.init.normal_(base.weight)
    layer = pk.LoRALinear(copy.deepcopy(base), r=2, alpha=4)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (5, 7) and layer.nf == 7
    assert layer.lora_A.shape == (2, 5) and layer.lora_B.shape == (7, 2)  # PEFT's, whatever the layout
    perturb(layer, std=0.3)
    assert layer.delta_weight().shape == (5, 7)  # in the base weight's layout
    for shape in [(3, 5), (2, 4, 5), (300, 5)]:  # the two-path, and the folded forward of many tokens
        x = torch.randn(*shape)
        expected = base(x) + layer.scale * x @ layer.lora_A.t() @ layer.lora_B.t()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    x = torch.randn(300, 5)
    check_merge(layer, lambda: layer(x))


def reference_attention(mha, lora, q, k, v):
    """nn.MultiheadAttention's own functional form, with W + s B A in both projections."""
    return F.multi_head_attention_forward(
        q, k, v, mha.embed_dim, mha.num_heads,
        mha.in_proj_weight + lora.scale * lora.lora_B @ lora.lora_A, mha.in_proj_bias, None, None, False, 0.0,
        mha.out_proj.weight + lora.scale * lora.lora_out_B @ lora.lora_out_A, mha.out_proj.bias,
        training=False, need_weights=False)[0]


def test_multihead_attention_has_a_real_gradient():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)  # sequence first: what F.multi_head_attention_forward takes
    layer = perturb(LoRAMultiheadAttention(copy.deepcopy(mha), r=2, alpha=4), std=0.3)
    assert (layer.lora_A.shape, layer.lora_B.shape) == ((2, 8), (24, 2))  # PEFT's in_proj pair
    assert (layer.lora_out_A.shape, layer.lora_out_B.shape) == ((2, 8), (8, 2))  # and its out_proj's
    q, k = torch.randn(5, 3, 8), torch.randn(4, 3, 8)
    ours = layer(q, k, k, need_weights=False)[0]
    theirs = reference_attention(mha, layer, q, k, k)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    factors = [layer.lora_A, layer.lora_B, layer.lora_out_A, layer.lora_out_B]
    g_ours = torch.autograd.grad(ours.square().sum(), factors)
    g_ref = torch.autograd.grad(theirs.square().sum(), factors)
    for a, b in zip(g_ours, g_ref):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # and they train: SGD on the factors alone lowers a loss, and moves all four
    target = torch.randn_like(ours)
    start = [f.detach().clone() for f in factors]
    opt = torch.optim.SGD(factors, lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (layer(q, k, k, need_weights=False)[0] - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(not torch.equal(f, s) for f, s in zip(factors, start))
    check_merge(layer, lambda: layer(q, k, k, need_weights=False)[0])


def test_transformer_encoder_layer_fused_path_sees_the_update():
    """nn.TransformerEncoderLayer's fused inference path reads self_attn.in_proj_weight itself;
    the wrapper keeps it off, so eval without grad gives the adapted output."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    adapted = copy.deepcopy(enc)
    pk.apply(adapted, pk.LoRA(r=2, targets=("self_attn",)), head=None)
    perturb(adapted, std=0.3)
    x = torch.randn(3, 5, 8)
    reference = copy.deepcopy(adapted)
    with torch.no_grad():
        pk.merge(reference)
        assert torch.backends.mha.get_fastpath_enabled()
        ours, merged = adapted(x), reference(x)
        torch.testing.assert_close(ours, merged, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours, enc(x), atol=1e-3)
    assert adapted.self_attn.batch_first and adapted.self_attn.embed_dim == 8  # read through the wrapper


def test_out_proj_of_multihead_attention_is_refused_with_the_fix():
    model = nn.Sequential()
    model.attn = nn.MultiheadAttention(8, 2)
    with pytest.raises(pk.TargetError, match="never calls it; target 'attn' itself"):
        pk.apply(model, pk.LoRA(targets=("out_proj",)), head=None)
    with pytest.raises(pk.TargetError, match="dropout"):
        pk.apply(model, pk.LoRA(targets=("attn",), dropout=0.1), head=None)
    assert type(model.attn) is nn.MultiheadAttention and type(model.attn.out_proj) is not pk.LoRALinear


def test_adapter_exposes_the_wrapped_layer():
    lin = nn.Linear(6, 4)
    ad = pk.AdapterLinear(lin, pk.BottleneckAdapter(4, size=2))
    assert ad.weight is lin.weight and ad.bias is lin.bias
    assert (ad.in_features, ad.out_features) == (6, 4)
    conv1d = Conv1D(4, 6)
    ad = pk.AdapterLinear(conv1d, pk.BottleneckAdapter(4, size=2))
    assert ad.weight is conv1d.weight and ad.nf == 4 and ad.out_features == 4
    with pytest.raises(AttributeError, match="no_such"):
        ad.no_such
    copy.deepcopy(ad)  # the attribute fallback must not recurse while copying
