"""Compression: int8 that really runs int8, simulated k-bit, merge/quantize order, pruning."""

import warnings

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit import compress as C
from peftkit.core.surgery import lora_layers
from conftest import fresh, logits, make_inputs, perturb


def lora_model(seed=0):
    model = fresh("tiny", seed)
    pk.apply(model, pk.LoRA(r=4, alpha=8))
    perturb(model, seed)  # nonzero B, so the LoRA update is real
    return model.eval()


def test_every_function_returns_a_copy_and_leaves_the_input_alone():
    model = lora_model()
    x = make_inputs("tiny")
    with torch.no_grad():
        before = logits(model, x).clone()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for f in (lambda m: C.quantize_int8(m), lambda m: C.simulate_kbit(m, 4),
                  lambda m: C.prune_unstructured(m, 0.5), lambda m: C.prune_rows(m, 0.3),
                  lambda m: C.shrink_ffn(m, 0.5)):
            assert f(model) is not model
        assert lora_layers(model) and not any(m.merged for m in lora_layers(model))
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert torch.equal(logits(model, x), before)


@pytest.mark.parametrize("backend", ["ao", "int_mm"])
def test_int8_merges_lora_and_stays_close(backend):
    model = lora_model()
    x = make_inputs("tiny", batch=8)
    q = C.quantize_int8(model, backend=backend)
    kinds = {type(m).__name__ for m in q.modules()}
    assert not lora_layers(q) and "LoRALinear" not in kinds
    assert ("DynamicQuantizedLinear" if backend == "ao" else "Int8Linear") in kinds or \
        any(C.is_int8_module(m) for m in q.modules())
    assert type(q.classifier) is nn.Linear  # the head stays fp32
    with torch.no_grad():
        ref, out = logits(model, x), logits(q, x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    assert not torch.equal(out, ref)  # it did quantize


def test_int8_fallback_kernel_is_int8():
    lin = nn.Linear(64, 48)
    q = C.Int8Linear(lin)
    assert q.weight_int8.dtype == torch.int8
    x = torch.randn(32, 64)
    with torch.no_grad():
        assert torch.allclose(q(x), lin(x), atol=0.05)
        assert torch.allclose(q(x[:3]), lin(x[:3]), atol=0.05)  # few rows: int8 too (any row count)


def test_int8_embedding_is_per_row_and_looks_up_like_the_table():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16, padding_idx=0)
    with torch.no_grad():
        emb.weight[7] *= 100  # a row 100x larger must not coarsen the others' grid
    q = C.Int8Embedding(emb)
    ids = torch.randint(0, 50, (3, 9))
    out = q(ids)
    assert q.weight_int8.dtype == torch.int8 and out.shape == (3, 9, 16) and out.dtype == torch.float32
    assert torch.equal(out, q.dequantized_weight()[ids])
    err = (q.dequantized_weight() - emb.weight).abs()
    assert (err <= emb.weight.abs().amax(1, keepdim=True) / 254 + 1e-7).all()  # half a step, per row
    with pytest.raises(ValueError, match="max_norm"):
        C.Int8Embedding(nn.Embedding(5, 4, max_norm=1.0))


def test_save_int8_round_trips_exactly_and_refuses_another_base(tmp_path):
    q = C.quantize_int8(lora_model())
    path = C.save_int8(q, tmp_path / "m.safetensors")
    x = make_inputs("tiny")
    again = C.load_int8(fresh("tiny"), path)
    with torch.no_grad():
        assert torch.equal(logits(again, x), logits(q, x))
    raw = path.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")  # safetensors: length, JSON header, then the data
    assert len(raw) - header == C.model_size(q)
    with pytest.raises(pk.AdapterFileError, match="another base"):
        C.load_int8(C.shrink_ffn(fresh("tiny"), 0.5), path)
    with pytest.raises(ValueError, match="no int8 layer"):
        C.save_int8(fresh("tiny"), tmp_path / "x.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(pk.AdapterFileError):
        C.load_int8(fresh("tiny"), tmp_path / "bad.safetensors")


def test_model_size_by_dtype():
    model = fresh("tiny")
    n = sum(t.numel() for t in model.state_dict().values())
    assert C.model_size(model, "fp32") == 4 * n and C.model_size(model, "bf16") == 2 * n
    lins, embs = C.linear_layers(model), C.embedding_layers(model)
    assert set(embs) == {f"bert.embeddings.{k}_embeddings" for k in ("word", "position", "token_type")}
    linear_only = 4 * n - sum(3 * m.weight.numel() - 4 * m.out_features for m in lins.values())
    expected = linear_only - sum(3 * m.weight.numel() - 4 * m.num_embeddings for m in embs.values())
    assert C.model_size(model, "int8") == expected
    assert C.model_size(C.quantize_int8(model)) == expected  # the real int8 model, counted from its tensors
    assert C.model_size(model, "int8", embeddings=False) == linear_only
    assert C.model_size(C.quantize_int8(model, embeddings=False)) == linear_only
    with pytest.raises(ValueError, match="not one of"):
        C.model_size(model, "int4")


def test_fake_quantize_grid_and_errors():
    w = torch.randn(16, 32)
    for bits in range(2, 9):
        codes, scale = C.quantize_codes(w, bits)
        qmax = 2 ** (bits - 1) - 1
        assert codes.abs().max() == qmax and len(torch.unique(codes)) <= 2 * qmax + 1
        assert torch.allclose(C.fake_quantize(w, bits), codes.float() * scale)
    assert torch.allclose(C.fake_quantize(w, 8), w, atol=w.abs().max() / 127)
    for bad in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="from 2 to 8"):
            C.fake_quantize(w, bad)


def test_per_channel_beats_per_tensor_at_low_bits():
    # Rows of very different scale, as real weight matrices have: one scale for all wastes the grid.
    torch.manual_seed(0)
    model = fresh("tiny")
    with torch.no_grad():
        for m in C.linear_layers(model).values():
            m.weight.mul_(torch.logspace(-1, 1, m.out_features)[:, None])
    sweep = C.error_sweep(model, bits=[2, 3, 4]).pivot(index="bits", columns="scheme", values="mse")
    assert (sweep["per-channel"] < sweep["per-tensor"]).all()
    assert (sweep["per-channel"].loc[[3, 4]] < 0.5 * sweep["per-tensor"].loc[[3, 4]]).all()
    per_layer = C.quantization_error(model, 4)
    assert per_layer.layer.iloc[-1] == "TOTAL" and (per_layer.mse >= 0).all()


def test_merge_into_quantized_is_dequantize_add_requantize():
    w, d = torch.randn(8, 16), 0.01 * torch.randn(8, 16)
    codes, scale = C.quantize_codes(w, 4)
    c2, s2 = C.merge_into_quantized(codes, scale, d, 4)
    assert torch.equal(c2, C.quantize_codes(codes.float() * scale + d, 4)[0])
    with pytest.raises(ValueError, match="shape"):
        C.merge_into_quantized(codes, scale, d[:, :3], 4)


def test_merge_order_errors_rank_the_orders():
    model = lora_model()
    df = C.merge_order_errors(model, bits=4).groupby("order").rel_err.mean()
    assert df["unmerged LoRA on quantized base"] <= df["quantize then merge"] + 1e-9
    with pytest.raises(ValueError, match="LoRA"):
        C.merge_order_errors(fresh("tiny"))


def test_merge_lora_into_an_int8_base():
    model = lora_model()
    base_q = C.quantize_int8(fresh("tiny"))  # the quantized base, shipped before the LoRA existed
    merged = C.merge_int8_lora(base_q, model)
    x = make_inputs("tiny", batch=8)
    with torch.no_grad():
        ref = logits(model, x)
        assert (logits(merged, x) - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    pk.merge(model)
    with pytest.raises(ValueError, match="already merged"):
        C.merge_int8_lora(C.quantize_int8(fresh("tiny")), model)
    with pytest.raises(ValueError, match="no int8 layer"):
        C.merge_int8_lora(fresh("tiny"), lora_model())


def test_quantize_base_then_lora_trains_only_the_lora():
    base = C.quantize_base(fresh("tiny"), bits=4)
    w = base.bert.encoder.layer[0].attention.self.query.weight
    assert len(torch.unique(w[0])) <= 15  # 4-bit grid per row
    pk.apply(base, pk.LoRA(r=4, alpha=8))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="plain base"):
        C.quantize_base(lora_model())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_pruning_hits_the_amount_and_make_permanent_keeps_outputs(scope):
    model = C.prune_unstructured(lora_model(), 0.4, scope=scope)
    rep = C.sparsity_report(model)
    body = rep[rep.layer.ne("TOTAL") & rep.layer.ne("classifier")]
    assert abs(body.zeros.sum() / body.params.sum() - 0.4) < 0.01
    if scope == "layer":
        assert (body.sparsity - 0.4).abs().max() < 0.02
    assert rep.pruning_mask.iloc[-1]
    x = make_inputs("tiny")
    with torch.no_grad():
        before = logits(model, x)
        C.make_permanent(model)
        assert torch.equal(logits(model, x), before)
    assert not C.sparsity_report(model).pruning_mask.any()


def test_row_pruning_zeroes_whole_rows():
    model = C.make_permanent(C.prune_rows(fresh("tiny"), 0.25))
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    zero_rows = (w == 0).all(dim=1).sum().item()
    assert zero_rows == round(0.25 * w.shape[0])


def test_shrink_ffn_removes_the_weakest_neurons():
    model = fresh("tiny")
    inner = model.bert.encoder.layer[0].intermediate.dense
    n = inner.out_features
    with torch.no_grad():  # make neuron 0 dead: it must be among the first removed
        inner.weight[0].zero_()
    small = C.shrink_ffn(model, 0.5)
    new = small.bert.encoder.layer[0].intermediate.dense
    assert new.out_features == n // 2 and small.bert.encoder.layer[0].output.dense.in_features == n // 2
    assert not torch.equal(new.weight[0], inner.weight[0])
    assert small.config.intermediate_size == n // 2
    with torch.no_grad():
        out = logits(small, make_inputs("tiny"))
    assert out.shape == (4, 2) and torch.isfinite(out).all()
    with torch.no_grad():  # removing only dead neurons changes nothing
        ref_model = fresh("tiny")
        ffn = ref_model.bert.encoder.layer[0]
        k = ffn.intermediate.dense.out_features
        ffn.intermediate.dense.weight[: k // 4].zero_()
        ffn.intermediate.dense.bias[: k // 4].fill_(-100.0)  # gelu(-100) = 0
        for layer in ref_model.bert.encoder.layer[1:]:
            layer.intermediate.dense.weight[: k // 4].zero_()
            layer.intermediate.dense.bias[: k // 4].fill_(-100.0)
        x = make_inputs("tiny")
        assert torch.allclose(logits(C.shrink_ffn(ref_model, 0.25), x), logits(ref_model, x), atol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, "half", True])
def test_bad_amounts_are_refused(bad):
    with pytest.raises(ValueError, match="fraction to prune"):
        C.prune_unstructured(fresh("tiny"), bad)


def test_shrink_ffn_on_an_unknown_architecture_says_what_to_use():
    with pytest.raises(ValueError, match="prune_rows"):
        C.shrink_ffn(fresh("mlp"), 0.5)


@pytest.mark.parametrize("backend", ["int_mm", "ao"])
def test_no_deprecation_noise_from_int8(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.quantize_int8(fresh("tiny"), backend=backend)


def test_default_int8_answers_do_not_depend_on_the_batch():
    # Activations are quantized per token and the int8 GEMM is exact, so one text's logits are the
    # same alone or beside others, up to float reordering (torch.ao's per-batch scale is not).
    model = lora_model()
    q = C.quantize_int8(model)
    assert C.int8_backend().startswith("peftkit Int8Linear")
    ids = torch.randint(1000, 5000, (24, 12), generator=torch.Generator().manual_seed(3))
    ids[5:, :] *= 1  # others in the batch
    with torch.no_grad():
        ids[7] = torch.randint(20000, 30000, (12,))  # an unusual neighbour
        together = logits(q, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        alone = torch.cat([logits(q, {"input_ids": ids[i:i + 1].repeat(17, 1),
                                      "attention_mask": torch.ones(17, 12, dtype=torch.long)})[:1] for i in range(3)])
    assert torch.allclose(together[:3], alone, atol=1e-5)


def test_the_three_orders_on_a_model():
    model = lora_model()
    x = make_inputs("tiny", batch=8)
    with torch.no_grad():
        ref = logits(model, x)
        outs = {o: logits(C.quantized_with_lora(model, 8, o), x) for o in C.ORDERS}
    for o, out in outs.items():
        assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3, o
    assert not lora_layers(C.quantized_with_lora(model, 4, "quantize then merge"))
    assert lora_layers(C.quantized_with_lora(model, 4, "unmerged LoRA on quantized base"))
    w = C.quantized_with_lora(model, 3, "quantize then merge").bert.encoder.layer[0].attention.self.query.weight
    assert len(torch.unique(w[0])) <= 7  # on the 3-bit grid after the merge
    with pytest.raises(ValueError, match="not one of"):
        C.quantized_with_lora(model, 4, "sideways")


def test_int8_per_tensor_is_available_for_comparison():
    q = C.quantize_int8(fresh("tiny"), per_channel=False, backend="ao")
    assert any(C.is_int8_module(m) for m in q.modules())
    with pytest.raises(ValueError, match="per channel only"):
        C.quantize_int8(fresh("tiny"), per_channel=False, backend="int_mm")


def _calibration(n=3):
    return [make_inputs("tiny", seed=s, batch=8) for s in range(n)]


def test_smoothing_changes_nothing_in_float_and_moves_the_range():
    model = lora_model()
    x = make_inputs("tiny", seed=9)
    sm = C.smooth(model, _calibration())
    wrapped = [m for m in sm.modules() if isinstance(m, C.Smoothed)]
    assert len(wrapped) == len(C.linear_layers(C.merged_plain(model, False)))
    with torch.no_grad():
        assert torch.allclose(logits(sm, x), logits(model, x), atol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        C.smooth(model, _calibration(), alpha=1.5)
    with pytest.raises(ValueError, match="no batches"):
        C.smooth(model, [])


def test_int8_with_calibration_round_trips_through_a_file(tmp_path):
    model = lora_model()
    q = C.quantize_int8(model, calibration=_calibration(), backend="ao")
    assert any(isinstance(m, C.Smoothed) for m in q.modules()) and any(C.is_int8_module(m) for m in q.modules())
    x = make_inputs("tiny", batch=8)
    with torch.no_grad():
        ref = logits(model, x)
        assert (logits(q, x) - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
        path = C.save_int8(q, tmp_path / "s.safetensors")
        assert torch.equal(logits(C.load_int8(fresh("tiny"), path), x), logits(q, x))


def test_the_pruning_study_prunes_the_encoder_and_leaves_the_pooler_and_head():
    """Global magnitude pruning over every Linear wiped MiniLM's small-magnitude pooler first: a model that answers
    one class. The study prunes the encoder's Linears only; the pooler and the head keep every weight."""
    from peftkit.studies.compression_study import encoder_only
    model = lora_model()
    with torch.no_grad():
        for p in model.bert.pooler.parameters():
            p.mul_(0.01)  # as in MiniLM: the pooler's weights are the smallest in the model
    assert C.sparsity_report(C.prune_unstructured(model, 0.6)).set_index("layer").loc["bert.pooler.dense", "sparsity"] == 1
    keep = encoder_only(model)
    assert keep == ["classifier", "bert.pooler"]
    rep = C.sparsity_report(C.prune_unstructured(model, 0.6, skip=keep)).set_index("layer")
    assert rep.loc["bert.pooler.dense", "sparsity"] == 0
    assert "classifier" not in rep.index or rep.loc["classifier", "sparsity"] == 0
    body = rep[~rep.index.isin(["TOTAL", "bert.pooler.dense", "classifier"])]
    assert abs(body.zeros.sum() / body.params.sum() - 0.6) < 0.01
