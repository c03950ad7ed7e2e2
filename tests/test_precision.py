"""The inference precision: "auto" chooses within tolerance and caches per CPU; int8 is batch
invariant; bf16 is skipped where the CPU lacks it; every precision composes with the padding-free
encoder. Timings are never asserted: where a test needs an order, it fixes the timings."""

import json
import pickle

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit import compress as C
from peftkit import runtime
from peftkit.bases.fast_bert import use_unpadded_encoder
from peftkit.compress import int8 as I
from peftkit.compress import precision as P
from peftkit.compress import timing as T
from conftest import fresh, perturb

TEXTS = [f"review {i}: the film was {'wonderful and moving' if i % 2 else 'dull, long and badly acted'}"
         + " indeed" * (i % 5) for i in range(48)]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test writes its own cache: never the user's ~/.cache."""
    monkeypatch.setenv("PEFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny():
    model, tok = pk.load_base("tiny", num_labels=2, seed=0)
    with torch.no_grad():  # a head with some margin, so that rounding does not flip near-ties
        model.classifier.weight.mul_(40)
    return model.eval(), tok


def fixed_times(ms: dict):
    """A stand-in for time_models that returns `ms` (default 10 ms) for every candidate."""
    calls = []

    def fake(models, batches, repeats=5):
        calls.append(list(models))
        return {n: ms.get(n, 10.0) for n in models}
    fake.calls = calls
    return fake


def broken(model):
    """A candidate that is fast and wrong: no encoder layers, and the head's answers reversed."""
    model.bert.encoder.layer = nn.ModuleList()
    with torch.no_grad():
        model.classifier.weight.neg_()
    return model


def test_auto_picks_the_fastest_candidate_within_tolerance(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)  # every candidate in the race
    monkeypatch.setattr(P, "time_models", fixed_times({"fp32": 10.0, "int8": 4.0, "bf16-weights": 5.0,
                                                        "bf16-autocast": 6.0}))
    out = pk.optimize_for_inference(model, "auto", calibration=TEXTS, tokenizer=tok, verbose=False)
    choice = out.inference_precision
    table = choice.table.set_index("precision")
    assert set(table.index) == set(C.CANDIDATES)
    assert table.loc[choice.precision, "agreement with fp32"] >= 0.99
    assert choice.precision == table[table["agreement with fp32"] >= 0.99]["ms per batch"].idxmin()
    assert choice.precision in choice.reason and "agree" in choice.reason
    assert out is not model and type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    fp32 = P.predictions(model, P.calibration_batches(TEXTS, tok))
    assert (P.predictions(out, P.calibration_batches(TEXTS, tok)) == fp32).float().mean() >= 0.99
    assert out(**tok(["a film"], return_tensors="pt")).logits.dtype == torch.float32


def test_auto_refuses_a_broken_candidate_even_when_it_is_fastest(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(P, "time_models", fixed_times({"broken": 0.1}))
    out = pk.optimize_for_inference(model, "auto", calibration=TEXTS, tokenizer=tok, verbose=False,
                                    extra_candidates={"broken": broken})
    choice = out.inference_precision
    table = choice.table.set_index("precision")
    assert choice.precision != "broken"
    assert table.loc["broken", "status"].startswith("refused: agrees on")
    assert table.loc["broken", "agreement with fp32"] < 0.5
    assert "broken refused" in choice.reason
    assert len(out.bert.encoder.layer) == 2


def test_the_agreement_threshold_is_settable(tiny, monkeypatch):
    model, tok = tiny

    def half_broken(m):  # every other calibration batch answered in reverse
        forward, seen = m.forward, []

        def flip(*a, **k):
            out = forward(*a, **k)
            seen.append(1)
            if len(seen) % 2:
                out.logits = -out.logits
            return out
        m.forward = flip
        return m
    monkeypatch.setattr(P, "time_models", fixed_times({"half": 0.1}))
    kw = dict(calibration=TEXTS, tokenizer=tok, verbose=False, extra_candidates={"half": half_broken}, batch_size=8)
    strict = pk.optimize_for_inference(model, "auto", **kw).inference_precision
    assert strict.precision != "half"
    lax = pk.optimize_for_inference(model, "auto", min_agreement=0.2, **kw).inference_precision
    assert lax.precision == "half" and "20%" in lax.reason
    with pytest.raises(ValueError, match="min_agreement"):
        pk.optimize_for_inference(model, "auto", min_agreement=0, **kw)


def test_the_timing_cache_is_keyed_on_the_cpu_and_torch(tiny, monkeypatch, cache_dir):
    model, tok = tiny
    fake = fixed_times({"int8": 1.0})
    monkeypatch.setattr(P, "time_models", fake)
    monkeypatch.setattr(runtime, "cpu_name", lambda: "Test CPU A")

    def run():
        return pk.optimize_for_inference(model, "auto", calibration=TEXTS, tokenizer=tok, verbose=False).inference_precision
    first = run()
    assert first.timing == "measured now" and len(fake.calls) == 1
    assert first.cache_file == str(cache_dir / T.CACHE_FILE) == str(P.cache_path())
    second = run()
    assert second.timing.startswith("from the cache") and len(fake.calls) == 1  # not timed again
    assert second.table.equals(first.table)
    monkeypatch.setattr(runtime, "cpu_name", lambda: "Test CPU B")
    assert run().timing == "measured now" and len(fake.calls) == 2  # another CPU: timed again
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert run().timing == "measured now" and len(fake.calls) == 3  # another torch: timed again
    entries = json.loads((cache_dir / T.CACHE_FILE).read_text())["entries"]
    assert len(entries) == 3
    assert {e["cpu"].split(" (")[0] for e in entries.values()} == {"Test CPU A", "Test CPU B"}
    assert all("cpu=Test CPU" in k and "torch=" in k and "threads=" in k for k in entries)
    assert pk.optimize_for_inference(model, "auto", calibration=TEXTS, tokenizer=tok, verbose=False,
                                     cache=False).inference_precision.timing == "measured now"


def test_a_corrupt_cache_is_replaced_with_a_warning(tiny, monkeypatch, cache_dir):
    model, tok = tiny
    monkeypatch.setattr(P, "time_models", fixed_times({}))
    cache_dir.mkdir(parents=True)
    (cache_dir / T.CACHE_FILE).write_text("{not json")
    with pytest.warns(RuntimeWarning, match="could not read the precision cache"):
        pk.optimize_for_inference(model, "auto", calibration=TEXTS, tokenizer=tok, verbose=False)
    assert json.loads((cache_dir / T.CACHE_FILE).read_text())["version"] == T.CACHE_VERSION


def test_bf16_is_skipped_with_a_clear_message_where_the_cpu_lacks_it(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(runtime, "cpu_name", lambda: "Old CPU")
    monkeypatch.setattr(P, "time_models", fixed_times({}))
    choice = pk.optimize_for_inference(model, "auto", calibration=TEXTS, tokenizer=tok, verbose=False).inference_precision
    table = choice.table.set_index("precision")
    for form in ("bf16-autocast", "bf16-weights"):
        assert table.loc[form, "status"] == ("skipped: this CPU (Old CPU) has neither AVX512-BF16 nor AMX: torch "
                                             "would emulate bf16, which runs slower than fp32")
    assert "bf16-autocast skipped: this CPU (Old CPU) has neither AVX512-BF16 nor AMX" in choice.reason
    assert choice.precision in ("fp32", "int8")
    with pytest.raises(RuntimeError, match=r"precision='bf16': this CPU \(Old CPU\) has neither AVX512-BF16 nor AMX"):
        pk.optimize_for_inference(model, "bf16", calibration=TEXTS, tokenizer=tok, verbose=False)
    with pytest.warns(RuntimeWarning, match="neither AVX512-BF16 nor AMX"):
        forced = pk.optimize_for_inference(model, "bf16-autocast", verbose=False)
    assert forced.inference_precision.precision == "bf16-autocast"


def test_bf16_forms_give_fp32_outputs_keep_names_and_pickle(tiny):
    model, tok = tiny
    x = tok(TEXTS[:6], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**x).logits
        for form in ("bf16-autocast", "bf16-weights"):
            m = P.build(model, form)
            assert type(m).__name__ == type(model).__name__  # the architecture's name, as fingerprints read it
            assert list(m.state_dict()) == list(model.state_dict())
            dtype = torch.bfloat16 if form == "bf16-weights" else torch.float32
            assert next(m.parameters()).dtype == dtype and next(model.parameters()).dtype == torch.float32
            out = m(**x).logits
            assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=0.1, rtol=0.05)
            again = pickle.loads(pickle.dumps(m))
            assert torch.equal(again(**x).logits, out)
            assert type(P.use_bf16(again, None)) is type(model)


def test_explicit_precisions_and_bad_arguments(tiny):
    model, tok = tiny
    q = pk.optimize_for_inference(model, "int8", verbose=False)
    assert any(isinstance(m, C.Int8Linear) for m in q.modules())
    assert "not timed" in q.inference_precision.reason
    q = pk.optimize_for_inference(model, "int8", calibration=TEXTS[:16], tokenizer=tok, verbose=False, repeats=1)
    assert q.inference_precision.precision == "int8" and q.inference_precision.table.shape[0] == 2
    with pytest.raises(ValueError, match="not one of"):
        pk.optimize_for_inference(model, "fp8")
    with pytest.raises(ValueError, match="calibration"):
        pk.optimize_for_inference(model, "auto")
    with pytest.raises(ValueError, match="tokenizer"):
        pk.optimize_for_inference(model, "auto", calibration=TEXTS)
    with pytest.raises(TypeError, match="single string"):
        pk.optimize_for_inference(model, "auto", calibration="one text", tokenizer=tok)
    with pytest.raises(ValueError, match="adapters can no longer be hot-swapped"):
        pk.optimize_for_inference(model, "int8", swappable=True)


# --------------------------------------------------------------------------- int8 batch invariance

@pytest.mark.parametrize("kernel", [k for k in ("onednn", "int_mm") if k != "onednn" or I._probe_onednn()])
def test_int8_linear_rows_are_the_same_alone_or_in_any_batch(kernel):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = C.Int8Linear(lin)
    x = torch.randn(40, 64) * torch.logspace(-2, 2, 40)[:, None]  # rows of very different ranges
    x[3] = 0  # and a row of zeros
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    try:
        C.set_int8_kernel(kernel)
        with torch.no_grad():
            batch, ref = q(x), lin(x)
            alone = torch.cat([q(x[i:i + 1]) for i in range(len(x))])
            shuffled = q(x[perm])
        assert torch.equal(alone, batch) and torch.equal(shuffled, batch[perm])  # bit for bit, in any company
        assert torch.isfinite(batch).all() and torch.equal(batch[3], lin.bias.detach())
        assert ((batch - ref).abs().amax(1) <= 0.03 * ref.abs().amax(1) + 1e-3).all()
    finally:
        C.set_int8_kernel(None)


def test_int8_model_answers_do_not_depend_on_the_batch(tiny):
    model, tok = tiny
    q = C.quantize_int8(model)
    same = tok(["a fine film with a good cast"] * 3 + ["a dull film with a weak cast"], return_tensors="pt")
    ragged = tok(TEXTS[:12], padding=True, return_tensors="pt")
    with torch.no_grad():
        # Every Int8Linear is bit for bit the same (the test above); the float parts between them
        # (attention, norms, the fp32 head) may sum in another order for another batch size.
        together = q(**same).logits
        for i in range(4):
            alone = q(**{k: v[i:i + 1] for k, v in same.items()}).logits
            assert torch.allclose(alone[0], together[i], atol=1e-5)
        padded = q(**ragged).logits
        for i in (0, 5, 11):  # padded beside longer texts
            one = q(**tok([TEXTS[i]], return_tensors="pt")).logits[0]
            assert torch.allclose(one, padded[i], atol=1e-5) and one.argmax() == padded[i].argmax()


def test_int8_kernel_choice():
    assert C.int8_kernel() in C.INT8_KERNELS
    with pytest.raises(ValueError, match="not one of"):
        C.set_int8_kernel("fast")
    C.set_int8_kernel("float")
    try:
        assert C.int8_backend().endswith("float fallback")
    finally:
        C.set_int8_kernel(None)


def test_int8_weights_changed_in_place_are_repacked():
    lin = nn.Linear(32, 16)
    q = C.Int8Linear(lin)
    x = torch.randn(20, 32)
    with torch.no_grad():
        q(x)
        q.weight_int8.zero_()
        assert torch.equal(q(x), lin.bias.detach().expand(20, 16))


# --------------------------------------------------------------------------- composition

@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-weights", "int8"])
def test_each_precision_composes_with_the_padding_free_encoder(tiny, precision):
    model, tok = tiny
    m = P.build(model, precision)
    x = tok(TEXTS[:10], padding=True, return_tensors="pt")
    assert bool((x["attention_mask"] == 0).any())
    rows = []
    query = m.bert.encoder.layer[0].attention.self.query
    hook = query.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape))
    with torch.no_grad():
        padded = m(**x).logits
        assert use_unpadded_encoder(m)
        m.train()  # the packed forward runs in training (serving's eval form is issue 19's); no dropout here
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        m.config.attention_probs_dropout_prob = 0.0
        packed = m(**x).logits
    hook.remove()
    assert len(rows[-1]) == 2 and rows[-1][0] == int(x["attention_mask"].sum())  # the real tokens only
    tol = {"fp32": 1e-5, "int8": 1e-4}.get(precision, 2e-2)
    assert packed.dtype == torch.float32 and torch.allclose(packed, padded, atol=tol)


# --------------------------------------------------------------------------- the Deployer

def test_deployer_precision_keeps_adapters_swappable(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(P, "time_models", fixed_times({"bf16-autocast": 1.0}))
    adapter = fresh("tiny")
    pk.apply(adapter, pk.LoRA(r=4, alpha=8))
    perturb(adapter)
    pk.save_adapter(adapter, tmp_path / "a")
    plain = pk.Deployer("tiny", device="cpu")
    fast = pk.Deployer("tiny", device="cpu", precision="auto", calibration=TEXTS)
    choice = fast.model.inference_precision
    assert choice.precision == "bf16-autocast"
    assert "int8 skipped" in choice.reason and "bf16-weights skipped" in choice.reason
    for dep in (plain, fast):
        dep.register("a", tmp_path / "a")
    a, b = plain.predict(TEXTS, adapter="a"), fast.predict(TEXTS, adapter="a")
    assert (a.label == b.label).mean() >= 0.9 and (a.probability - b.probability).abs().max() < 0.05
    fast.set_merged(True)
    assert (fast.predict(TEXTS, adapter="a").label == b.label).mean() >= 0.9
    with pytest.raises(ValueError, match="hot-swapped"):
        pk.Deployer("tiny", device="cpu", precision="int8")
