"""LoRALinear's fused fast path (`_LoRAFunction`) against the plain two-path formula.

    y = x W^T + b + s * (x A^T) B^T

The fast path folds s*B@A into the weight and computes dA, dB from skinny products of its own,
so every output and every gradient is checked against autograd run on the formula above.
"""

import importlib.util
import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from peftkit.layers.lora import LoRALinear, _LoRAFunction

ROOT = Path(__file__).resolve().parents[1]
ATOL = RTOL = 1e-5


def make_layer(n_in, n_out, r=4, alpha=8, dropout=0.0, rslora=False, bias=True,
               dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(n_in, n_out, bias=bias, dtype=dtype), r=r, alpha=alpha,
                       dropout=dropout, rslora=rslora)
    with torch.no_grad():  # B starts at zero; a non-zero B makes every term count
        layer.lora_B.normal_(0.0, 0.1)
    return layer


def reference(layer, x):
    """The formula, on detached float64 copies, so autograd differentiates every term separately
    and the reference's own rounding stays far below the tolerance."""
    def leaf(t):
        return t.detach().double().requires_grad_(True)
    W, b = layer.base.weight.detach().double(), layer.base.bias
    A, B, xr = leaf(layer.lora_A), leaf(layer.lora_B), leaf(x)
    y = xr @ W.t() + layer.scale * (xr @ A.t()) @ B.t()
    if b is not None:
        y = y + b.detach().double()
    return y, xr, A, B


def assert_close(a, b, what):
    # float32 rounding of a sum grows with the size of its terms, so the absolute tolerance is
    # 1e-5 for tensors of order one and scales with the largest entry beyond that.
    atol = ATOL * max(1.0, b.abs().max().item())
    torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=RTOL, msg=lambda m: f"{what}: {m}")


# The fused path is taken from T = in*out/(in+out) tokens on; every shape here has at least that.
SHAPES = [  # (leading shape of x, in, out, r)
    ((9,), 16, 16, 4),
    ((2, 5), 16, 24, 4),
    ((3, 1, 4), 24, 8, 8),
    ((33,), 40, 72, 8),
    ((2, 20), 96, 32, 2),
]


@pytest.mark.parametrize("lead,n_in,n_out,r", SHAPES)
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_matches_formula(lead, n_in, n_out, r, rslora, bias):
    layer = make_layer(n_in, n_out, r=r, alpha=2 * r, rslora=rslora, bias=bias)
    torch.manual_seed(1)
    x = torch.randn(*lead, n_in, requires_grad=True)
    gy = torch.randn(*lead, n_out)

    y = layer(x)
    assert type(y.grad_fn).__name__ == "_LoRAFunctionBackward", "the fused path was not taken"
    y.backward(gy)

    y_ref, x_ref, A_ref, B_ref = reference(layer, x)
    y_ref.backward(gy.double())
    assert y.shape == (*lead, n_out)
    assert y.is_contiguous()
    assert_close(y, y_ref, "y")
    assert_close(x.grad, x_ref.grad, "dx")
    assert_close(layer.lora_A.grad, A_ref.grad, "dA")
    assert_close(layer.lora_B.grad, B_ref.grad, "dB")
    assert x.grad.shape == x.shape and x.grad.is_contiguous()
    assert layer.lora_A.grad.is_contiguous() and layer.lora_B.grad.is_contiguous()
    assert layer.base.weight.grad is None


@pytest.mark.parametrize("needs", ["x", "A", "B", "AB", "xA", "xB"])
def test_fast_path_only_requested_gradients(needs):
    layer = make_layer(12, 20, r=4)
    layer.lora_A.requires_grad_("A" in needs)
    layer.lora_B.requires_grad_("B" in needs)
    torch.manual_seed(2)
    x = torch.randn(3, 5, 12, requires_grad="x" in needs)
    gy = torch.randn(3, 5, 20)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_LoRAFunctionBackward"
    y.backward(gy)
    y_ref, x_ref, A_ref, B_ref = reference(layer, x)
    y_ref.backward(gy.double())
    assert_close(y, y_ref, "y")
    for name, t, ref in [("x", x, x_ref), ("A", layer.lora_A, A_ref), ("B", layer.lora_B, B_ref)]:
        if name in needs:
            assert_close(t.grad, ref.grad, f"d{name}")
        else:
            assert t.grad is None


def test_fast_path_noncontiguous_input_and_grad():
    layer = make_layer(16, 24, r=4)
    torch.manual_seed(3)
    x = torch.randn(16, 10).t().requires_grad_(True)      # (10, 16), transposed strides
    gy = torch.randn(24, 10).t()                           # (10, 24), not contiguous
    y = layer(x)
    y.backward(gy)
    y_ref, x_ref, A_ref, B_ref = reference(layer, x)
    y_ref.backward(gy.double())
    assert_close(y, y_ref, "y")
    assert_close(x.grad, x_ref.grad, "dx")
    assert_close(layer.lora_A.grad, A_ref.grad, "dA")
    assert_close(layer.lora_B.grad, B_ref.grad, "dB")


@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 1)])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_few_tokens_take_the_two_path_formula(lead, grad, bias):
    """Below in*out/(in+out) tokens (24 here) folding B@A into W costs more than it saves."""
    layer = make_layer(32, 96, r=4, bias=bias)
    torch.manual_seed(10)
    x = torch.randn(*lead, 32, requires_grad=grad)
    gy = torch.randn(*lead, 96)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    assert type(y.grad_fn).__name__ != "_LoRAFunctionBackward"
    y_ref, x_ref, A_ref, B_ref = reference(layer, x)
    assert_close(y, y_ref, "y")
    if grad:
        y.backward(gy)
        y_ref.backward(gy.double())
        assert_close(x.grad, x_ref.grad, "dx")
        assert_close(layer.lora_A.grad, A_ref.grad, "dA")
        assert_close(layer.lora_B.grad, B_ref.grad, "dB")
    # and 24 tokens, the threshold, fold
    x = torch.randn(24, 32, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "_LoRAFunctionBackward"


def test_gradients_accumulate_over_two_backwards():
    layer = make_layer(8, 12, r=2)
    torch.manual_seed(4)
    x = torch.randn(6, 8, requires_grad=True)
    g1, g2 = torch.randn(6, 12), torch.randn(6, 12)
    layer(x).backward(g1)
    layer(x).backward(g2)
    y_ref, x_ref, A_ref, B_ref = reference(layer, x)
    y_ref.backward((g1 + g2).double())
    assert_close(x.grad, x_ref.grad, "dx")
    assert_close(layer.lora_A.grad, A_ref.grad, "dA")
    assert_close(layer.lora_B.grad, B_ref.grad, "dB")


@pytest.mark.parametrize("lead,rslora", [((5,), False), ((2, 3), True)])
def test_gradcheck_float64(lead, rslora):
    layer = make_layer(6, 5, r=3, alpha=4, rslora=rslora, dtype=torch.float64)
    W, b = layer.base.weight, layer.base.bias
    torch.manual_seed(5)
    x = torch.randn(*lead, 6, dtype=torch.float64, requires_grad=True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)

    def f(x, A, B):
        return _LoRAFunction.apply(x, W, b, A, B, layer.scale)

    assert torch.autograd.gradcheck(f, (x, A, B), eps=1e-6, atol=1e-6)
    # and through the module, which must pick the same path
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,), eps=1e-6, atol=1e-6)


def test_dropout_training_differs_from_eval_and_eval_matches_formula():
    layer = make_layer(32, 16, r=4, dropout=0.5)
    torch.manual_seed(6)
    x = torch.randn(4, 9, 32, requires_grad=True)

    layer.train()
    torch.manual_seed(7)
    y_train = layer(x)
    assert type(y_train.grad_fn).__name__ != "_LoRAFunctionBackward"  # masks don't fold into W
    y_train.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None

    layer.eval()
    y_eval = layer(x)
    y_ref = reference(layer, x)[0]
    assert_close(y_eval, y_ref, "eval y")
    assert not torch.allclose(y_train, y_eval, atol=1e-3), "dropout had no effect in training"

    # dropout only touches the low-rank branch: with B = 0 training equals the base layer
    with torch.no_grad():
        layer.lora_B.zero_()
    layer.train()
    assert_close(layer(x), layer.base(x), "train y with B=0")


@pytest.mark.parametrize("bias", [True, False])
def test_dropout_training_gradients_match_formula_with_the_same_mask(bias):
    layer = make_layer(24, 40, r=4, dropout=0.3, bias=bias).train()
    torch.manual_seed(11)
    x = torch.randn(2, 30, 24, requires_grad=True)
    gy = torch.randn(2, 30, 40)
    torch.manual_seed(12)
    y = layer(x)
    y.backward(gy)
    torch.manual_seed(12)  # the same mask again
    mask_x = nn.functional.dropout(x.detach().double(), 0.3, training=True)
    y_ref, x_ref, A_ref, B_ref = reference(layer, x)
    xd = x_ref * (mask_x != 0) / 0.7
    y_ref = x_ref @ layer.base.weight.double().t() + layer.scale * (xd @ A_ref.t()) @ B_ref.t()
    if bias:
        y_ref = y_ref + layer.base.bias.double()
    y_ref.backward(gy.double())
    assert_close(y, y_ref, "y")
    assert_close(x.grad, x_ref.grad, "dx")
    assert_close(layer.lora_A.grad, A_ref.grad, "dA")
    assert_close(layer.lora_B.grad, B_ref.grad, "dB")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "x_frozen_params_frozen"])
def test_inference_path_matches_formula(mode):
    layer = make_layer(20, 28, r=4).eval()
    torch.manual_seed(8)
    x = torch.randn(2, 7, 20)
    y_ref = reference(layer, x)[0].detach()
    if mode == "no_grad":
        with torch.no_grad():
            y = layer(x)
    elif mode == "inference_mode":
        with torch.inference_mode():
            y = layer(x)
    else:
        layer.requires_grad_(False)
        y = layer(x)
    assert y.grad_fn is None
    assert_close(y, y_ref, "y")


def test_merged_matches_unmerged():
    layer = make_layer(20, 12, r=4).eval()
    torch.manual_seed(9)
    x = torch.randn(5, 20)
    with torch.no_grad():
        y0 = layer(x)
        layer.merge()
        y1 = layer(x)
        layer.unmerge()
        y2 = layer(x)
    assert layer.merged is False
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y2, y0, atol=1e-5, rtol=1e-5)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_layers", ROOT / "benchmarks" / "bench_layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_layers_quick(tmp_path, capsys):
    bench = _load_bench()  # importing must not run anything
    assert capsys.readouterr().out == ""
    threads = torch.get_num_threads()
    out = tmp_path / "layers.csv"
    assert bench.main(["--quick", "--repeats", "2", "--shapes", "32x48", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # main puts the thread count back

    rows = list(csv.DictReader(out.open()))
    seen = {(r["mode"], r["impl"]) for r in rows}
    expected = ({(bench.TRAIN, i) for i in bench.TRAIN_IMPLS}
                | {(bench.TRAIN_DROPOUT, i) for i in ["frozen_linear"] + bench.DROPOUT_IMPLS}
                | {(bench.INFER, i) for i in bench.INFER_IMPLS})
    assert seen == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert r["shape"] == "32x48"
        assert float(r["median_ms"]) > 0 and float(r["ratio_vs_baseline"]) > 0
        assert r["repeats"] == "2" and int(r["threads"]) >= 1 and r["torch"] == torch.__version__
        assert r["cpu"] and r["other_load"]  # the environment is recorded with the numbers
        if r["impl"] == r["baseline"]:
            assert float(r["ratio_vs_baseline"]) == 1.0
    printed = capsys.readouterr().out
    assert "| shape |" in printed and "peftkit" in printed
    assert out.with_suffix(".md").exists()
