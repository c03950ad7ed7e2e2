"""The training loop: learning, resuming bit for bit after SIGKILL, data parallel, NaN guard."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import peftkit as pk
from peftkit import data
from peftkit.data.loaders import make_loaders
from peftkit.training.metrics import evaluate, f1_scores
from peftkit.training.loop import TrainConfig, TrainingDiverged, fit

HERE = Path(__file__).parent
SCRIPT = HERE / "train_script.py"
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def small():
    df = data.load_corpus("movies").sample(400, random_state=1)
    splits = data.split(df, seed=0)
    return splits


def tiny_lora(seed=0):
    model, tok = pk.load_base("tiny", seed=seed)
    return pk.apply(model, pk.LoRA(r=4, alpha=8, targets=("query", "value", "dense"))), tok


def test_loss_decreases_and_only_trainable_change(small):
    model, tok = tiny_lora()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    few = {"train": small["train"].head(64), "val": small["val"]}  # small enough to memorise
    loaders = make_loaders(tok, few, batch_size=16, max_length=64)
    hist = fit(model, loaders["train"], loaders["val"],
               TrainConfig(epochs=12, lr=1e-2, warmup_ratio=0.0, progress=False))
    losses = hist.loss.to_numpy()
    assert losses[-4:].mean() < 0.8 * losses[:4].mean()
    assert {"step", "epoch", "loss", "lr", "elapsed", "val_accuracy", "val_f1_macro"} <= set(hist.columns)
    assert hist.val_accuracy.notna().sum() == 12  # one evaluation per epoch
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_schedule_warms_up_then_decays(small):
    model, tok = tiny_lora()
    loaders = make_loaders(tok, small, batch_size=16, max_length=64)
    hist = fit(model, loaders["train"], None, TrainConfig(epochs=2, lr=1e-3, warmup_ratio=0.2, progress=False))
    lr = hist.lr.to_numpy()
    peak = int(np.argmax(lr))
    assert 0 < peak < len(lr) - 1 and np.all(np.diff(lr[: peak + 1]) > 0) and np.all(np.diff(lr[peak:]) < 0)


def test_grad_accumulation_matches_a_bigger_batch(small):
    a, tok = tiny_lora()
    b, _ = tiny_lora()
    for m in (a, b):
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    cfg = dict(epochs=1, lr=1e-3, progress=False, max_steps=3, grad_clip=None)
    fit(a, make_loaders(tok, small, batch_size=16)["train"], None, TrainConfig(**cfg))
    fit(b, make_loaders(tok, small, batch_size=8)["train"], None, TrainConfig(grad_accumulation=2, **cfg))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_nan_loss_stops_with_step_and_checkpoint(small, tmp_path):
    model, tok = tiny_lora()
    loaders = make_loaders(tok, small, batch_size=16, max_length=64)
    calls = {"n": 0}

    def poison(module, inputs, output):  # the 3rd training forward pass returns NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output
    model.classifier.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"at step 3 .*Last good checkpoint: .*step-00000002") as e:
        fit(model, loaders["train"], None, TrainConfig(epochs=1, progress=False, lr=1e-3,
                                                        checkpoint_dir=str(tmp_path), checkpoint_every=1))
    assert "Lower lr" in str(e.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not applied


@pytest.mark.parametrize("kwargs,match", [
    (dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"), (dict(warmup_ratio=1.5), "warmup_ratio"),
    (dict(grad_accumulation=0), "grad_accumulation"), (dict(device="tpu"), "device"), (dict(monitor="auc"), "monitor"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_nothing_trainable_and_resume_without_dir(small):
    model, tok = pk.load_base("tiny")
    model.requires_grad_(False)
    loaders = make_loaders(tok, small, batch_size=16)
    with pytest.raises(ValueError, match="requires grad"):
        fit(model, loaders["train"], None, TrainConfig(progress=False))
    model, tok = tiny_lora()
    with pytest.raises(ValueError, match="checkpoint_dir"):
        fit(model, loaders["train"], None, TrainConfig(progress=False), resume=True)


def test_evaluate_and_f1():
    y, p = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])
    macro, weighted = f1_scores(y, p, 2)
    assert macro == pytest.approx((0.5 + 2 / 3) / 2) and weighted == pytest.approx((2 * 0.5 + 3 * 2 / 3) / 5)
    model = pk.MLP()
    batches = [{"x": torch.randn(4, 16), "labels": torch.tensor([0, 1, 0, 1])}]
    r = evaluate(model, batches)
    assert r["n"] == 4 and 0 <= r["accuracy"] <= 1 and np.array(r["confusion"]).sum() == 4


def _run(args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True, **kw)


def test_resume_after_sigkill_is_bitwise_equal(tmp_path):
    ref = _run([str(tmp_path / "ref.safetensors"), str(tmp_path / "ck_ref")])
    assert ref.returncode == 0, ref.stderr
    total = int(ref.stdout.split("steps=")[1].split()[0])
    ck = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / "x.safetensors"), str(ck), "--delay", "0.15"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline:
        latest = ck / "latest.json"
        if latest.exists() and json.loads(latest.read_text())["step"] >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads((ck / "latest.json").read_text())["step"]
    assert 5 <= killed_at < total, "the kill must land part-way through the run"
    resumed = _run([str(tmp_path / "res.safetensors"), str(ck), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "res.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_process_data_parallel_equals_single_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun ships with torch"
    args = ["--no-dropout", "--epochs", "1", "--batch", "8"]
    single = _run([str(tmp_path / "one.safetensors"), str(tmp_path / "ck1"), *args])
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(SCRIPT),
                          str(tmp_path / "two.safetensors"), str(tmp_path / "ck2"), *args],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / f"two.rank{r}.safetensors")) for r in (0, 1))
    one = load_file(str(tmp_path / "one.safetensors"))
    for k in one:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], one[k], atol=1e-5, rtol=0)
    assert (tmp_path / "ck2" / "latest.json").exists()


def test_set_attention_dropout():
    from peftkit.layers.dropout import set_attention_dropout
    model, _ = pk.load_base("tiny")
    assert set_attention_dropout(model, 0.0) == 2  # one per layer
    assert all(m.p == 0.0 for n, m in model.named_modules() if n.endswith("attention.self.dropout"))
    assert model.bert.encoder.layer[0].output.dropout.p == 0.1  # hidden dropout untouched
    for bad in (-0.1, 1.0, "0"):
        with pytest.raises(ValueError, match="probability"):
            set_attention_dropout(model, bad)
    with pytest.raises(ValueError, match="no attention-probability dropout"):
        set_attention_dropout(pk.load_base("mlp")[0], 0.0)


def test_attention_dropout_in_the_config_is_applied_and_keyed_only_when_set():
    from peftkit.studies.experiments import config_key, make_spec
    from peftkit.training.loop import TrainConfig, fit
    model, tok = pk.load_base("tiny")
    pk.apply(model, pk.LoRA(r=2, alpha=4))
    x = torch.randint(1000, 2000, (8, 6))
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.randint(0, 2, (8,))}]
    fit(model, batches, None, TrainConfig(attention_dropout=0.0, max_steps=1, progress=False))
    assert model.bert.encoder.layer[1].attention.self.dropout.p == 0.0
    spec = make_spec(pk.LoRA(), "tiny", cfg=TrainConfig())
    assert "attention_dropout" not in spec["train"]  # the default keeps older cache keys
    assert config_key(spec) != config_key(make_spec(pk.LoRA(), "tiny", cfg=TrainConfig(attention_dropout=0.0)))
    with pytest.raises(ValueError, match="attention_dropout"):
        TrainConfig(attention_dropout=1.5)


def test_cpu_bf16_trains_under_autocast_with_fp32_state_and_is_keyed_only_when_set(small):
    """cpu_bf16 runs the forward in bf16 (the Linear outputs are bf16) while parameters,
    gradients and AdamW state stay fp32, and the model still learns."""
    from peftkit.studies.experiments import config_key, make_spec
    model, tok = tiny_lora()
    seen = []
    hook = model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda mod, inp, out: seen.append(out.dtype))
    few = {"train": small["train"].head(64), "val": small["val"]}
    loaders = make_loaders(tok, few, batch_size=16, max_length=64)
    hist = fit(model, loaders["train"], loaders["val"],
               TrainConfig(epochs=12, lr=1e-2, warmup_ratio=0.0, progress=False, device="cpu", cpu_bf16=True))
    hook.remove()
    assert torch.bfloat16 in seen  # training steps ran under autocast ...
    assert seen[-1] == torch.float32  # ... and the last evaluation did not
    assert all(p.dtype == torch.float32 for p in model.parameters())
    losses = hist.loss.to_numpy()
    assert losses[-4:].mean() < 0.8 * losses[:4].mean()
    spec = make_spec(pk.LoRA(), "tiny", cfg=TrainConfig())
    assert "cpu_bf16" not in spec["train"]  # the default keeps older cache keys
    assert config_key(spec) != config_key(make_spec(pk.LoRA(), "tiny", cfg=TrainConfig(cpu_bf16=True)))
    with pytest.raises(ValueError, match="cpu_bf16"):
        TrainConfig(cpu_bf16="yes")


def test_validate_false_skips_the_validation_pass_trains_the_same_and_is_keyed_only_when_set(small):
    """validate=False: no evaluation on the validation loader (no val_* columns), the same weights as a run
    that validates (evaluation draws no random numbers), its own cache key, and no checkpoint record change
    at the default."""
    from peftkit.studies.experiments import config_key, make_spec
    from peftkit.training.loop import run_record
    few = {"train": small["train"].head(48), "val": small["val"].head(16)}
    weights = []
    for validate in (True, False):
        model, tok = tiny_lora()
        loaders = make_loaders(tok, few, batch_size=16, max_length=64)
        hist = fit(model, loaders["train"], loaders["val"], TrainConfig(epochs=2, progress=False, validate=validate))
        assert any(c.startswith("val_") for c in hist) is validate
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    spec = make_spec(pk.LoRA(), "tiny", cfg=TrainConfig())
    assert "validate" not in spec["train"]  # the default keeps older cache keys
    assert config_key(spec) != config_key(make_spec(pk.LoRA(), "tiny", cfg=TrainConfig(validate=False)))
    assert "validate" not in run_record(TrainConfig(), None, 3, None, {}, None)["config"]  # older checkpoints resume
    with pytest.raises(ValueError, match="validate=False evaluates nothing"):
        TrainConfig(validate=False, patience=2)


def test_cpu_bf16_warns_where_the_cpu_would_emulate_it(monkeypatch):
    import peftkit.training.loop as T
    monkeypatch.setattr(T, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="AVX512-BF16"):
        T.autocast_for(torch.device("cpu"), TrainConfig(cpu_bf16=True))
    monkeypatch.setattr(T, "cpu_has_bf16", lambda: True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.autocast_for(torch.device("cpu"), TrainConfig(cpu_bf16=True))
