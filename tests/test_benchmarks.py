"""The benchmark scripts run end to end (tiny settings; no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_quick(tmp_path):
    out = tmp_path / "train.csv"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--quick",
                        "--methods", "full,peftkit_lora,peft_lora", "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    df = pd.read_csv(out)
    assert set(df.method) == {"full", "peftkit_lora", "peft_lora"}
    assert (df.sec_per_step > 0).all() and (df.peak_rss_mib > 0).all()
    assert list(df.dropout.unique()) == ["torch nn.Dropout"]  # fit's default, the same for every method
    assert "step_vs_full" in p.stdout


def test_bench_compress_quick(tmp_path):
    out = tmp_path / "compress.md"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compress.py"), "--quick", "--threads", "1",
                        "--out", str(out), "--cache", str(tmp_path / "r.jsonl")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    text = out.read_text()
    for title in ("int8 accuracy per domain", "int8 speed", "size on disk", "simulated k-bit",
                  "merge/quantize order", "QLoRA-style recovery", "pruning"):
        assert f"## {title}" in text, title
    import json
    tables = json.loads(out.with_suffix(".json").read_text())
    assert {r["variant"] for r in tables["size on disk"]} >= {"fp32 merged", "int8 per-token (ours)"}
    assert "faster than fp32" in p.stdout
    assert "CPU: " in p.stdout and "AVX-512" in p.stdout and "AMX" in p.stdout  # the CPU and its flags, named
    for title in ("precision speed (batch 32)", "precision accuracy per domain (%)"):
        assert f"## {title}" in text, title
    prec = json.loads(next(tmp_path.glob("precision_*_1thread_quick.json")).read_text())
    assert {"fp32", "int8", "auto"} <= {r["precision"] for r in prec["speed"]}
    assert prec["env"]["cpu_flags"] and prec["env"]["cpu_family"] and prec["auto"]["reason"]


def test_bench_int8_quick(tmp_path):
    out = tmp_path / "int8.csv"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_int8.py"), "--quick", "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    df = pd.read_csv(out)
    assert {"fp32", "bf16", "int_mm_v1", "int_mm"} <= set(df.kernel) and (df.ms >= 0).all()
    assert {"quantize", "gemm", "dequantize", "layer"} <= set(df.stage)
    assert df.cpu_flags.iloc[0] in p.stdout and "one MiniLM layer's Linears" in p.stdout


def test_bench_serve_precisions_quick(tmp_path):
    out = tmp_path / "serve_precision.csv"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--precisions", "--quick",
                        "--threads", "1", "--out", str(out)], capture_output=True, text=True,
                       env={**__import__("os").environ, "PEFTKIT_CACHE_DIR": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-2000:]
    df = pd.read_csv(out)
    assert {"Deployer fp32", "Deployer auto", "merged model fp32", "merged model int8"} <= set(df.what)
    assert (df.predict_ms > 0).all() and df.cpu_flags.iloc[0] in p.stdout and "auto chose" in p.stdout


def test_bench_dropout_quick(tmp_path):
    out = tmp_path / "dropout.csv"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dropout.py"), "--quick", "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    df = pd.read_csv(out)
    assert set(df.implementation) == {"torch nn.Dropout", "peftkit FastDropout"} and (df.ms > 0).all()
    assert "FastDropout vs torch" in p.stdout


def test_bench_layer_kinds_quick(tmp_path):
    out = tmp_path / "kinds.csv"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_layers.py"), "--kinds", "all", "--quick",
                        "--threads", "1", "--repeats", "2", "--warmup", "0", "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    df = pd.read_csv(out)
    assert set(df.kind) == {"conv1d_gpt2", "conv2d", "embedding", "mha"} and set(df.impl) == {"frozen", "peftkit", "peft"}
    assert set(df["mode"]) == {"train", "inference"} and (df.median_ms > 0).all()
    assert "peftkit / PEFT" in p.stdout


def test_paired_ratios_pair_each_round_with_its_own_reference():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import paired_ratios
    # The machine slows down 2x from round to round; inside a round LoRA is always 0.6x full.
    rows = []
    for r, slow in enumerate([1.0, 2.0, 1.0, 3.0, 1.5]):
        rows += [{"method": "full", "round": r, "sec_per_step": 1.0 * slow},
                 {"method": "lora", "round": r, "sec_per_step": 0.6 * slow}]
    out = paired_ratios(pd.DataFrame(rows))
    assert out.loc["lora", "median"] == pytest.approx(0.6)
    assert out.loc["lora", "ci90"] == "0.600-0.600"
    assert out.loc["full", "median"] == 1.0 and out.loc["lora", "rounds"] == 5
    # Spread across rounds widens the interval around the median.
    rows[1]["sec_per_step"], rows[3]["sec_per_step"] = 1.4, 1.4  # round 0 ratio 0.6 -> 1.4, round 1 -> 0.7
    lo, hi = map(float, paired_ratios(pd.DataFrame(rows)).loc["lora", "ci90"].split("-"))
    assert lo <= 0.6 < hi


def test_pool_keeps_each_files_rounds_paired_and_refuses_unlike_settings(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import main, pool
    # Two files both number their rounds from 0; pooled, the rounds must not pair across files.
    for name, slow, ratio in (("a.csv", 1.0, 0.6), ("b.csv", 3.0, 0.7)):
        rows = [{"method": m, "round": r, "sec_per_step": slow * (r + 1) * (1.0 if m == "full" else ratio),
                 "precision": "fp32"} for r in range(3) for m in ("full", "lora")]
        pd.DataFrame(rows).to_csv(tmp_path / name, index=False)
    out = pool([tmp_path / "a.csv", tmp_path / "b.csv"])
    assert out.loc["lora", "rounds"] == 6
    assert 0.6 <= out.loc["lora", "median"] <= 0.7  # 0.6 three times, 0.7 three times
    lo, hi = map(float, out.loc["lora", "ci90"].split("-"))
    assert lo == pytest.approx(0.6) and hi == pytest.approx(0.7)
    pd.read_csv(tmp_path / "b.csv").assign(precision="bf16 autocast").to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match="precision"):
        pool([tmp_path / "a.csv", tmp_path / "c.csv"])
    with pytest.raises(SystemExit) as e:  # the CLI: a one-line error, exit code 2
        main(["--pool", str(tmp_path / "a.csv"), str(tmp_path / "missing.csv")])
    assert e.value.code == 2


def test_benchmarks_readme_is_generated_from_the_results():
    """benchmarks/README.md is what `python benchmarks/report.py` writes from the CSVs, not typed."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
