"""The benchmark scripts run end to end (tiny settings; no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pandas as pd

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


def test_bench_dropout_quick(tmp_path):
    out = tmp_path / "dropout.csv"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dropout.py"), "--quick", "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    df = pd.read_csv(out)
    assert set(df.implementation) == {"torch nn.Dropout", "peftkit FastDropout"} and (df.ms > 0).all()
    assert "FastDropout vs torch" in p.stdout
