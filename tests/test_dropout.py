"""FastDropout: the same distribution and gradient as dropout, a bool mask, reproducible masks,
and a drop-in swap that changes nothing in eval mode."""

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.layers.dropout import FastDropout, _threshold, fast_dropout, use_fast_dropout
from peftkit.training.loop import TrainConfig, fit


def test_drop_rate_and_expectation_match_p():
    torch.manual_seed(0)
    for p in (0.1, 0.5, 0.9):
        y = fast_dropout(torch.ones(1_000_000), p)
        kept = (y != 0).float()
        k, scale = round(p * 65536), 65536 / (65536 - round(p * 65536))
        assert abs(kept.mean().item() - (1 - p)) < 3e-3
        assert torch.all(y[y != 0] == scale)  # every kept element carries the same scale ...
        assert scale == pytest.approx(1 / (1 - k / 65536))  # ... the exact inverse keep rate
        assert abs(y.mean().item() - 1.0) < 6e-3  # so the expectation is preserved
        # each 16-bit lane of a random word is fair (a lane that is always kept would show here)
        lanes = kept.view(-1, 4).mean(0)
        assert torch.all((lanes - (1 - p)).abs() < 6e-3), lanes


def test_threshold_quantises_p_to_a_65536th():
    assert _threshold(0.0) == (-32768, 1.0)
    thr, scale = _threshold(0.1)
    assert thr == -32768 + 6554 and scale == pytest.approx(65536 / (65536 - 6554))
    assert _threshold(0.9999999)[0] == 32767  # p just under 1 still keeps one lane value


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = (torch.rand(64, 48) + 0.5).requires_grad_()  # no zeros, so y != 0 marks the kept elements
    g = torch.randn(64, 48)
    y = fast_dropout(x, 0.3)
    y.backward(g)
    keep = y != 0
    scale = 65536 / (65536 - round(0.3 * 65536))
    assert torch.allclose(y, torch.where(keep, x * scale, 0.0).detach())
    assert torch.allclose(x.grad, torch.where(keep, g * scale, 0.0))
    assert torch.autograd.gradcheck(lambda t: (torch.manual_seed(2), fast_dropout(t, 0.3))[1],
                                    torch.rand(6, 5, dtype=torch.float64, requires_grad=True))


def test_the_saved_mask_is_one_byte_an_element():
    saved = []
    x = torch.randn(32, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fast_dropout(x, 0.1).sum().backward()
    assert [t.dtype for t in saved] == [torch.bool] and saved[0].shape == x.shape


def test_masks_are_reproducible_and_do_not_depend_on_threads():
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            outs.append(fast_dropout(torch.ones(10_001), 0.2))  # an odd size: the last word is partly used
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], fast_dropout(torch.ones(10_001), 0.2))  # the stream moves on


def test_eval_p_zero_and_dtypes():
    x = torch.randn(8, 8)
    d = FastDropout(0.5).eval()
    assert torch.equal(d(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    y = FastDropout(0.5).train()(x.bfloat16())
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fast_dropout(x, 1.0)
    assert isinstance(d, nn.Dropout)  # code that looks for nn.Dropout (set_attention_dropout) still finds it


def test_swap_keeps_the_model_and_its_predictions():
    model, _ = pk.load_base("tiny", seed=0)
    model.eval()
    ids = torch.randint(1000, 3000, (3, 10))
    before = model(input_ids=ids).logits
    keys = list(model.state_dict())
    n_plain = sum(type(m) is nn.Dropout for m in model.modules())
    assert n_plain > 0
    assert use_fast_dropout(model) == n_plain
    assert use_fast_dropout(model) == 0  # idempotent
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert list(model.state_dict()) == keys
    assert all(not m.training for m in model.modules())  # the swap kept eval mode
    assert torch.equal(model(input_ids=ids).logits, before)


def test_fit_uses_it_when_asked_and_keys_it_only_then():
    from peftkit.studies.experiments import config_key, make_spec
    x = torch.randint(1000, 2000, (8, 6))
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.randint(0, 2, (8,))}]
    for flag in (True, False):
        model, _ = pk.load_base("tiny")
        pk.apply(model, pk.LoRA(r=2, alpha=4, dropout=0.1))
        fit(model, batches, None, TrainConfig(max_steps=1, progress=False, fast_dropout=flag))
        kinds = {type(m) for m in model.modules() if isinstance(m, nn.Dropout)}
        assert kinds == ({FastDropout} if flag else {nn.Dropout})
    default = make_spec(pk.LoRA(), "tiny", cfg=TrainConfig())
    fast = make_spec(pk.LoRA(), "tiny", cfg=TrainConfig(fast_dropout=True))
    assert "fast_dropout" not in default["train"] and fast["train"]["fast_dropout"] is True
    assert config_key(default) != config_key(fast)  # another random stream, another run; older keys stay valid
    with pytest.raises(ValueError, match="fast_dropout"):
        TrainConfig(fast_dropout="yes")
