"""Compression measured on MiniLM fine-tuned with LoRA on movies: int8, k-bit, orders, QLoRA, pruning.

The LoRA (q, v, r=8, alpha=16; 1 epoch at lr 1e-3, batch 32: the recipe of
notebook 04, but on all 8,454 training snippets: the README's accuracy table) comes from the result
cache when an earlier run trained it. Then:

* int8: latency of one batch of 32 real movie snippets (median of interleaved repeats) against
  the merged fp32 model, file size, and accuracy on the full test split of every domain;
* simulated 8..2-bit, per tensor and per channel, accuracy on movies;
* the three merge/quantize orders at 4 bits;
* a LoRA trained on a 4-bit base against the float LoRA rounded after training (QLoRA's idea);
* unstructured pruning against FFN shrinking: accuracy and latency;
* the inference precision (`compression_study.precision_study`): fp32, bf16 autocast, bf16 weights
  (where the CPU has bf16), int8 with the first Int8Linear kernel and today's, and what
  `optimize_for_inference(..., "auto")` chooses on 256 movie training texts, all timed in one run
  (batch of 32 real movie snippets), with accuracy on every domain's test split.

    python benchmarks/bench_compress.py                    # about 15 minutes on 2 cores (with training)
    python benchmarks/bench_compress.py --only precision   # the precision section alone
    python benchmarks/bench_compress.py --quick            # the tiny model, seconds: a smoke run

Writes benchmarks/results/compress.md (the tables) and compress.json (the same, machine-readable),
and the precision section also to benchmarks/results/precision_<cpu family>_<threads>thread.json (one
file per CPU family: benchmarks/README.md has a table for each). Every output starts with the CPU
model and its AVX2, AVX-512, VNNI, BF16 and AMX flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_precision(prec: dict, trained: str, args) -> Path:
    """The precision study as precision_<cpu family>_<threads>thread.json (and printed)."""
    import re

    env = {**prec["env"], "trained": trained, "quick": bool(args.quick),
           "command": "python benchmarks/bench_compress.py --only precision"
                      + (f" --threads {args.threads}" if args.threads != 2 else "")}
    choice = prec["choice"]
    slug = re.sub(r"[^a-z0-9]+", "-", env["cpu_family"].lower()).strip("-")
    policy = "" if env["omp_wait_policy"] == "default" else "_" + env["omp_wait_policy"].lower()
    out = args.out.parent / f"precision_{slug}_{env['threads']}thread{policy}{'_quick' if args.quick else ''}.json"
    data = {"env": env, "speed": json.loads(prec["speed"].to_json(orient="records")),
            "accuracy": json.loads(prec["accuracy"].reset_index().to_json(orient="records")),
            "auto": {"precision": choice.precision, "reason": choice.reason, "timing": choice.timing,
                     "candidates": json.loads(choice.table.to_json(orient="records"))}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"CPU: {env['cpu_flags']}; {env['threads']} threads, torch {env['torch']}, {env['clock']}; {trained}")
    print(prec["speed"].round(3).to_markdown(index=False))
    print(prec["accuracy"].to_markdown())
    print(f"auto: {choice.reason}\nwrote {out}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few examples (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30, help="timed repeats per variant (median)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compress.md")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "results.jsonl")
    ap.add_argument("--only", choices=["precision"], help="run one section (its file only)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import pandas as pd
    import torch

    import peftkit as pk
    from peftkit import runtime
    from peftkit.studies import compression_study as E
    from peftkit.studies.experiments import trained_model
    from peftkit.training.loop import TrainConfig

    torch.set_num_threads(args.threads)
    base, n_train, n_eval = ("tiny", 64, 60) if args.quick else ("minilm", None, None)
    repeats = 3 if args.quick else args.repeats
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=32, seed=0, progress=False)
    lora = pk.LoRA(r=8, alpha=16)
    kw = dict(base=base, domain="movies", n_train=n_train, cfg=cfg, cache=args.cache, n_eval=n_eval,
              threads=args.threads)
    kw["fresh_process"] = not args.quick  # quick: no subprocess start-up
    print(f"CPU: {runtime.cpu_summary()}; family: {runtime.cpu_family()}", flush=True)
    model, tok, row = trained_model(lora, **kw)
    trained = (f"base {base}, LoRA r=8 trained on {row['n_train']} movie snippets "
               f"({'cached' if row['cached'] else 'trained now'}), test splits "
               f"{'capped at ' + str(n_eval) if n_eval else 'in full'}")
    prec = E.precision_study(model, tok, n_eval=n_eval, repeats=repeats, progress=False)
    write_precision(prec, trained, args)
    if args.only == "precision":
        return 0
    _, _, qrow = trained_model(lora, base_bits=4, **kw)

    int8 = E.int8_study(model, tok, n_eval=n_eval, repeats=repeats, progress=False)
    bits = E.bits_study(model, tok, n_eval=n_eval, progress=False)
    orders = E.order_study(model, tok, bits=4, n_eval=n_eval, progress=False)
    ptq = float(orders.set_index("order").accuracy["unmerged LoRA on quantized base"])
    qlora = E.qlora_study(row, qrow, ptq)
    pruning = E.pruning_study(model, tok, n_eval=n_eval, repeats=max(3, repeats // 3), progress=False)

    drop = E.accuracy_drop(int8["accuracy"])
    tables = {"int8 accuracy per domain (%)": drop, "int8 speed (batch 32)": int8["speed"],
              "size on disk": int8["size"], "simulated k-bit on movies": bits,
              "merge/quantize order at 4 bits (movies)": orders, "QLoRA-style recovery (movies)": qlora,
              "pruning (movies)": pruning, "precision speed (batch 32)": prec["speed"],
              "precision accuracy per domain (%)": prec["accuracy"]}
    env = (f"CPU {runtime.cpu_summary()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {trained}, "
           f"int8 path: {pk.compress.int8_backend()}")
    md = [f"# Compression ({'quick smoke run' if args.quick else 'measured'})", "", env, ""]
    for title, df in tables.items():
        md += [f"## {title}", "", df.round(4).to_markdown(), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"env": env, **{k: json.loads(v.reset_index().to_json(orient="records")) for k, v in tables.items()}}, indent=1))
    print("\n".join(md))
    speed = int8["speed"].set_index("model")["speedup vs fp32"]
    ours = "int8 per-token (ours)"
    print(f"{ours}: {speed[ours]:.2f}x faster than fp32; largest change on a domain "
          f"{drop[ours + ' drop (pt)'].abs().max():.2f} pt; file {int8['size']['vs fp32'].iloc[-1]:.2f}x")
    pd.set_option("display.width", 160)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
