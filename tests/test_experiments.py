"""Experiments, the result cache and the command line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit as pk
from peftkit.studies.experiments import compare, config_key, make_spec, read_cache, run
from peftkit.training.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = TrainConfig(epochs=1, lr=1e-3, batch_size=16, progress=False)


def test_run_returns_a_full_row(tmp_path):
    row = run(pk.LoRA(r=2, alpha=4), base="tiny", domain="tweets", n_train=64, cfg=CFG, out=str(tmp_path))
    for key in ("accuracy", "f1_macro", "trainable", "total", "trainable_pct", "sec_per_step", "peak_mem_mib",
                "adapter_bytes", "train_seconds", "acc_movies", "f1_amazon", "acc_nyt", "f1_tweets"):
        assert key in row, key
    assert row["trainable"] == 2 * 2 * 2 * (32 + 32) + 32 * 2 + 2  # 2 layers x (q, v) x r(in+out) + head
    assert row["env"]["torch"] and row["env"]["threads"] >= 1 and row["env"]["device"] == "cpu"
    assert row["acc_tweets"] == row["accuracy"] and row["n_train"] == 64
    assert (tmp_path / "adapter.safetensors").exists() and json.loads((tmp_path / "metrics.json").read_text())["key"] == row["key"]


def test_compare_caches_rows_and_keys_on_the_whole_config(tmp_path):
    cache = tmp_path / "results.jsonl"
    methods = [pk.HeadOnly(), pk.LoRA(r=2, alpha=4)]
    first = compare(methods, base="tiny", domain="tweets", n_train=48, cfg=CFG, cache=cache, eval_domains=False, progress=False)
    assert list(first.cached) == [False, False] and len(read_cache(cache)) == 2
    assert first.peak_mem_mib.gt(0).all()  # each measured in its own process
    again = compare(methods, base="tiny", domain="tweets", n_train=48, cfg=CFG, cache=cache, eval_domains=False, progress=False)
    assert list(again.cached) == [True, True]
    assert again.accuracy.tolist() == first.accuracy.tolist()
    # every trained adapter is kept beside the cache and loads back onto a fresh base
    lora_dir = Path(first.adapter_dir.iloc[1])
    assert lora_dir.parent == tmp_path / "adapters" and lora_dir.name == first.key.iloc[1]
    model, _ = pk.load_base("tiny", seed=0)
    pk.load_adapter(model, lora_dir)
    import shutil
    shutil.rmtree(lora_dir)  # an adapter folder that is gone is retrained only when one is needed
    assert list(compare(methods, base="tiny", domain="tweets", n_train=48, cfg=CFG, cache=cache,
                        eval_domains=False, progress=False).cached) == [True, True]
    need = compare(methods, base="tiny", domain="tweets", n_train=48, cfg=CFG, cache=cache, eval_domains=False,
                   progress=False, need_adapters=True)
    assert list(need.cached) == [True, False] and (lora_dir / "adapter.json").exists()
    a = config_key(make_spec(pk.LoRA(), "tiny", "tweets", 48, CFG))
    assert a == config_key(make_spec(pk.LoRA(), "tiny", "tweets", 48, TrainConfig(epochs=1, lr=1e-3, batch_size=16, progress=True)))
    assert a != config_key(make_spec(pk.LoRA(), "tiny", "tweets", 48, TrainConfig(epochs=1, lr=2e-3, batch_size=16)))
    assert a != config_key(make_spec(pk.LoRA(r=4), "tiny", "tweets", 48, CFG))


def test_results_frame_gives_the_last_validation_accuracy_for_old_and_new_rows():
    from peftkit.studies.experiments import results_frame
    old = {"label": "lora r=8", "accuracy": 0.7, "history": {"step": [1, 2, 3], "val_accuracy": [None, 0.6, 0.65]}}
    new = {"label": "full", "accuracy": 0.8, "val_accuracy": 0.75, "history": {"step": [1], "val_accuracy": [0.1]}}
    never = {"label": "head only", "accuracy": 0.5, "history": {"step": [1]}}
    df = results_frame([old, new, never])
    assert df.val_accuracy.iloc[0] == 0.65 and df.val_accuracy.iloc[1] == 0.75 and math.isnan(df.val_accuracy.iloc[2])
    assert list(df.columns[:3]) == ["label", "accuracy", "val_accuracy"]


def test_cache_survives_a_torn_line(tmp_path):
    cache = tmp_path / "results.jsonl"
    cache.write_text('{"key": "a", "accuracy": 1}\n{"key": "b", "accur')
    assert list(read_cache(cache)) == ["a"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_train_writes_adapter_and_metrics(tmp_path):
    p = _cli("train", "--base", "tiny", "--method", "adapter", "--n-train", "48", "--epochs", "1",
             "--no-progress", "--no-cross-domain", "--cpu-bf16", "--out", str(tmp_path / "x"))
    assert p.returncode == 0, p.stderr
    metrics = json.loads((tmp_path / "x" / "metrics.json").read_text())
    assert metrics["method"] == "adapter" and metrics["spec"]["train"]["cpu_bf16"] is True
    assert metrics["env"]["precision"] == "bf16 autocast"
    restored = pk.load_adapter(pk.load_base("tiny")[0], tmp_path / "x")
    assert isinstance(restored.peftkit.method, pk.Adapter)


@pytest.mark.parametrize("args,match", [
    (["train", "--out", "x", "--epochs", "0"], "epochs"),
    (["train", "--out", "x", "--method", "prefix"], "unknown method"),
    (["train", "--out", "x", "--r", "abc"], "invalid int"),
    (["train", "--out", "x", "--r", "0"], "positive integer"),
    (["train", "--out", "x", "--domain", "reddit"], "unknown domain"),
    (["train", "--out", "x", "--targets", "qurey", "--base", "tiny"], "did you mean 'query'"),
    (["train"], "--out"),
    (["compare", "--methods", "lora,nope"], "unknown method"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_bad_arguments_give_one_line_and_exit_2(args, match):
    p = _cli(*args)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert match.lower() in lines[0].lower()


@pytest.mark.parametrize("cmd", ["train", "compare", "data", "demo"])
def test_cli_help(cmd):
    p = _cli(cmd, "--help")
    assert p.returncode == 0 and "usage" in p.stdout


def test_trained_model_reuses_the_cached_adapter_and_evaluates_by_domain(tmp_path):
    from peftkit.studies.experiments import trained_model
    from peftkit.training.metrics import evaluate_domains
    cache = tmp_path / "results.jsonl"
    kw = dict(base="tiny", domain="tweets", n_train=48, cfg=CFG, cache=cache, n_eval=40, fresh_process=False)
    model, tok, row = trained_model(pk.LoRA(r=2, alpha=4), **kw)
    again, _, row2 = trained_model(pk.LoRA(r=2, alpha=4), **kw)
    assert not row["cached"] and row2["cached"]
    table = evaluate_domains(model, tok, n_eval=40)
    assert list(table.domain) == ["movies", "amazon", "nyt", "tweets"] and (table.n == 40).all()
    assert table.set_index("domain").accuracy["tweets"] == pytest.approx(row["acc_tweets"])
    assert evaluate_domains(again, tok, ["tweets"], n_eval=40).accuracy[0] == pytest.approx(row["acc_tweets"])
    with pytest.raises(ValueError, match="cache"):
        trained_model(pk.LoRA(r=2, alpha=4), **{**kw, "cache": None})


def test_base_bits_trains_on_a_rounded_base_and_keys_apart(tmp_path):
    from peftkit.studies.experiments import trained_model
    kw = dict(base="tiny", domain="tweets", n_train=32, cfg=CFG, cache=tmp_path / "r.jsonl", n_eval=20, fresh_process=False)
    model, _, row = trained_model(pk.LoRA(r=2, alpha=4), base_bits=4, **kw)
    assert row["spec"]["base_bits"] == 4
    assert "base_bits" not in make_spec(pk.LoRA(), "tiny")  # old cache keys stay valid
    w = model.bert.encoder.layer[0].attention.self.query.base.weight
    assert len(torch.unique(w[0])) <= 15
