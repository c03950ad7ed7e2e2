"""Training-step time and peak memory on the real MiniLM: peftkit's methods against a full
fine-tune and against Hugging Face PEFT's LoRA.

Every (method, round) is a fresh Python process, so each peak resident set (ru_maxrss) belongs
to that method alone; rounds interleave the methods, so machine noise hits them all alike, each
in its own seeded shuffle of the order, so no method always runs right after the same
neighbour (a process that just freed 1.4 GB can leave the next one paying for it).
Each process trains on the same real movie-snippet batches (batch 32) with AdamW and reports
the median seconds per step (forward, backward, optimizer step).

    python benchmarks/bench_train.py                 # 3 rounds x 20 timed steps, 2 threads
    python benchmarks/bench_train.py --quick         # a smoke run on the tiny model
    python benchmarks/bench_train.py --bf16          # every method under CPU bf16 autocast
    python benchmarks/bench_train.py --fast-dropout  # every method with peftkit's FastDropout
    python benchmarks/bench_train.py --pool a.csv b.csv  # paired ratios over several runs' rounds
Every model comes from `load_base`, so every method (PEFT's LoRA too) runs the CLS-only last
layer and the padding-free encoder in training (`peftkit.bases.fast_bert`, `peftkit.bases.fast_bert`); name a
method with ':whole' (`--methods full,full:whole`) to time it with the whole last layer, with
':padded' to time it on the padded batch, or both ('full:padded:whole', the plain transformers
model), in the same run. AdapterHub's transformers 4.57 always runs the padded, whole layer. Every method gets the same dropout: torch's, as `fit` trains by default, or with --fast-dropout
peftkit.layers.dropout.FastDropout, as TrainConfig(fast_dropout=True). Writes benchmarks/results/train.csv, its name
marked by the options (train_attn0.csv, train_bf16_attn0.csv, train_attn0_fast_dropout.csv,
...), and prints a ratio table against the full
fine-tune.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (what it is, how it is built)
METHODS = {
    "full": "full fine-tune (every parameter, AdamW)",
    "head_only": "peftkit HeadOnly",
    "peftkit_lora": "peftkit LoRA q,v r=8 alpha=16 dropout 0",
    "peftkit_lora_do": "peftkit LoRA q,v r=8 alpha=16 dropout 0.1",
    "peftkit_adapter": "peftkit Adapter pfeiffer reduction 16",
    "peft_lora": "HF PEFT LoRA q,v r=8 alpha=16 dropout 0",
    "peft_lora_do": "HF PEFT LoRA q,v r=8 alpha=16 dropout 0.1",
    "adapterhub_seq_bn": "AdapterHub adapters seq_bn (reduction 16), in .venv-peers",
}
# AdapterHub `adapters` pins transformers ~=4.57, so it runs from its own environment
# (`make peers` builds it); its worker imports peftkit from this checkout for the data only.
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"


VARIANTS = {"whole": "whole last layer", "padded": "padded batch"}


def describe(name: str) -> str:
    method, *variants = name.split(":")
    return ", ".join([METHODS[method]] + [VARIANTS[v] for v in variants])


def build(name: str, base: str):
    """The model for `name`; a ":whole" suffix (e.g. "full:whole") turns off load_base's CLS-only
    last layer and ":padded" its padding-free encoder, so one run can time the same method with
    and without them."""
    import peftkit as pk
    name, *variants = name.split(":")
    model, tok = pk.load_base(base, num_labels=2, seed=0, cls_only="whole" not in variants,
                              unpad="padded" not in variants)
    if name.startswith("peft_"):
        import peft
        cfg = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"],
                              lora_dropout=0.1 if name.endswith("_do") else 0.0)
        model = peft.get_peft_model(model, cfg)
    elif name == "full":
        pk.apply(model, pk.FullFineTune())
    elif name == "head_only":
        pk.apply(model, pk.HeadOnly())
    elif name.startswith("peftkit_lora"):
        pk.apply(model, pk.LoRA(r=8, alpha=16, dropout=0.1 if name.endswith("_do") else 0.0))
    elif name == "peftkit_adapter":
        pk.apply(model, pk.Adapter(reduction=16, placement="pfeiffer"))
    elif name == "adapterhub_seq_bn":
        import adapters
        adapters.init(model)
        model.add_adapter("movies", config=adapters.SeqBnConfig(reduction_factor=16))
        model.train_adapter("movies")  # freezes the encoder; the adapter and the task head train
    return model, tok


def _step(model, opt, b, bf16: bool) -> None:
    """One training step: forward (under CPU bf16 autocast when asked), backward, AdamW."""
    import contextlib

    import torch
    import torch.nn.functional as F
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    F.cross_entropy(out.logits.float(), b["labels"]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def worker(name: str, base: str, steps: int, warmup: int, threads: int, batch_size: int,
           attention_dropout: float | None = None, bf16: bool = False, fast_dropout: bool = False) -> dict:
    """One measurement in this process: returns median step seconds and peak RSS."""
    import resource

    import torch

    from peftkit import data
    from peftkit.data.loaders import make_loaders
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tok = build(name, base)
    if attention_dropout is not None:
        from peftkit.bases.models import set_attention_dropout
        set_attention_dropout(model, attention_dropout)
    if fast_dropout:
        from peftkit.layers.dropout import use_fast_dropout
        use_fast_dropout(model)
    splits = data.split(data.load_corpus("movies"), seed=0)
    loader = make_loaders(tok, {"train": splits["train"]}, batch_size=batch_size, seed=0)["train"]
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) == steps + warmup:
            break
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        _step(model, opt, b, bf16)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    import transformers
    return {"method": name, "sec_per_step": statistics.median(times), "transformers": transformers.__version__,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mib": rss_loaded, "trainable": sum(p.numel() for p in params),
            "tokens_per_step": statistics.mean(int(b["attention_mask"].sum()) for b in batches)}


def alternate(names: list, base: str, steps: int, warmup: int, threads: int, batch_size: int,
              attention_dropout: float | None = None, bf16: bool = False, fast_dropout: bool = False) -> dict:
    """All `names` in this one process, stepping in turn on the same batches (the order flips every
    batch): no process-to-process noise, but no per-method peak memory either. Median s/step."""
    import torch

    from peftkit import data
    from peftkit.data.loaders import make_loaders
    from peftkit.layers.dropout import use_fast_dropout
    from peftkit.bases.models import set_attention_dropout
    torch.set_num_threads(threads)
    models = {}
    for name in names:
        torch.manual_seed(0)
        model, tok = build(name, base)
        if attention_dropout is not None:
            set_attention_dropout(model, attention_dropout)
        if fast_dropout:
            use_fast_dropout(model)
        params = [p for p in model.parameters() if p.requires_grad]
        models[name] = (model.train(), torch.optim.AdamW(params, lr=1e-5))
    splits = data.split(data.load_corpus("movies"), seed=0)
    loader = make_loaders(tok, {"train": splits["train"]}, batch_size=batch_size, seed=0)["train"]
    times = {name: [] for name in names}
    for i, b in zip(range(steps + warmup), loader):
        for name in (names if i % 2 == 0 else names[::-1]):
            model, opt = models[name]
            t0 = time.perf_counter()
            _step(model, opt, b, bf16)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def paired_ratios(df, reference: str = "full", n_boot: int = 2000, seed: int = 0):
    """Each method's step over the reference's step in the same round, then the median of those
    per-round ratios and a 90% bootstrap interval for it (rounds resampled with replacement).

    A round's methods run back to back, so the machine's slow drifts (another tenant, a busy
    hour) mostly cancel inside a round; what is left is the round-to-round spread, and the
    interval says how far the median can be trusted. Returns a DataFrame indexed by method."""
    import numpy as np
    import pandas as pd
    ref = df[df.method == reference].set_index("round").sec_per_step
    rng = np.random.default_rng(seed)
    rows = {}
    for name, g in df.groupby("method", sort=False):
        r = (g.set_index("round").sec_per_step / ref).dropna().to_numpy()
        if len(r) == 0:
            continue
        boot = np.median(rng.choice(r, size=(n_boot, len(r)), replace=True), axis=1)
        lo, hi = np.quantile(boot, [0.05, 0.95])
        rows[name] = {"median": float(np.median(r)), "ci90": f"{lo:.3f}-{hi:.3f}", "rounds": len(r)}
    return pd.DataFrame.from_dict(rows, orient="index")


def pool(paths: list) -> "pd.DataFrame":
    """Paired ratios over the rounds of several result files taken together: each file's rounds
    stay paired with that file's own full fine-tune. Only methods with the same settings can be
    pooled, so files whose precision, dropout, attention dropout, batch or base differ are refused."""
    import pandas as pd
    frames = []
    for i, path in enumerate(paths):
        df = pd.read_csv(path)
        df["round"] = [(i, r) for r in df["round"]]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    settings = ["precision", "dropout", "attention_dropout", "batch_size", "base", "threads"]
    differing = [c for c in settings if c in df and df[c].astype(str).nunique() > 1]
    if differing:
        raise ValueError(f"these files were measured under different {differing}; pool only like with like.")
    return paired_ratios(df)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    available = [n for n in METHODS if not n.startswith("adapterhub") or PEERS_PY.exists()]
    ap.add_argument("--methods", default=",".join(available),
                    help=f"comma-separated from {list(METHODS)}, each optionally with ':whole' to run the "
                    "whole last layer instead of load_base's CLS-only one and/or ':padded' to run the padded "
                    "batch instead of the padding-free encoder (default: all whose environment exists)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per process (default 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--base", default="minilm")
    ap.add_argument("--attention-dropout", type=float, default=None,
                    help="set the attention-probability dropout of every method (default: the model's, 0.1)")
    ap.add_argument("--bf16", action="store_true",
                    help="every method under CPU bf16 autocast (fp32 weights and AdamW state), as TrainConfig(cpu_bf16=True)")
    ap.add_argument("--fast-dropout", action="store_true",
                    help="peftkit's FastDropout for every method, as TrainConfig(fast_dropout=True)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 round, 3 steps")
    ap.add_argument("--out", default=None, help="CSV to write (default benchmarks/results/train[_bf16][_attnP][_fast_dropout].csv "
                    "by the options; a quick run writes to the temp folder)")
    ap.add_argument("--alternate", action="store_true",
                    help="step the methods in turn inside one process instead (times only; not adapterhub)")
    ap.add_argument("--pool", nargs="+", metavar="CSV",
                    help="measure nothing: print each method's paired ratio to the full fine-tune over the "
                    "rounds of these result files together")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.pool:
        try:
            out = pool(a.pool)
        except (OSError, ValueError) as e:
            ap.error(str(e))
        print(f"paired ratios to the full fine-tune over {len(a.pool)} files:\n")
        print(out.round(3).to_markdown())
        return 0
    if a.quick:
        a.base, a.rounds, a.steps, a.warmup = "tiny", 1, 3, 1
    if a.out is None:  # a smoke run never overwrites the recorded results
        import tempfile
        folder = Path(tempfile.gettempdir()) if a.quick else ROOT / "benchmarks" / "results"
        name = "train" + "_bf16" * a.bf16 + (f"_attn{a.attention_dropout:g}" if a.attention_dropout is not None else "")
        a.out = str(folder / (name + "_fast_dropout" * a.fast_dropout + ".csv"))
    if a.worker:
        print(json.dumps(worker(a.worker, a.base, a.steps, a.warmup, a.threads, a.batch_size, a.attention_dropout,
                                       a.bf16, a.fast_dropout)))
        return 0
    names = [n.strip() for n in a.methods.split(",")]
    unknown = {n for n in names if n.split(":")[0] not in METHODS or not set(n.split(":")[1:]) <= set(VARIANTS)}
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    if a.alternate:
        names = [n for n in names if not n.startswith("adapterhub")]  # it needs its own interpreter
        med = alternate(names, a.base, a.steps, a.warmup, a.threads, a.batch_size, a.attention_dropout, a.bf16,
                        a.fast_dropout)
        for name, sec in med.items():
            print(f"{name:16s} {sec:.3f} s/step  ({sec / med[names[0]]:.3f}x {names[0]})")
        return 0
    if any(n.startswith("adapterhub") for n in names) and not PEERS_PY.exists():
        ap.error(f"{PEERS_PY} is missing: run `make peers` to build the AdapterHub environment, "
                 "or leave adapterhub_seq_bn out of --methods")
    import pandas as pd
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1"}
    rows = []
    import random
    for r in range(a.rounds):
        order = list(names)
        random.Random(r).shuffle(order)
        for position, name in enumerate(order):
            python = str(PEERS_PY) if name.startswith("adapterhub") else sys.executable
            cmd = [python, __file__, "--worker", name, "--base", a.base, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--threads", str(a.threads), "--batch-size", str(a.batch_size)]
            if a.attention_dropout is not None:
                cmd += ["--attention-dropout", str(a.attention_dropout)]
            if a.bf16:
                cmd += ["--bf16"]
            if a.fast_dropout:
                cmd += ["--fast-dropout"]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
            row = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append({**row, "round": r, "position": position})
            print(f"round {r + 1}/{a.rounds} {name:16s} {row['sec_per_step']:.3f} s/step  "
                  f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)
    df = pd.DataFrame(rows)
    import torch
    df["threads"], df["torch"], df["base"], df["batch_size"] = a.threads, torch.__version__, a.base, a.batch_size
    df["attention_dropout"] = "model default (0.1)" if a.attention_dropout is None else a.attention_dropout
    df["precision"] = "bf16 autocast" if a.bf16 else "fp32"
    df["dropout"] = "peftkit FastDropout" if a.fast_dropout else "torch nn.Dropout"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    med = df.groupby("method").agg(sec_per_step=("sec_per_step", "median"), peak_rss_mib=("peak_rss_mib", "median"),
                                   trainable=("trainable", "first")).reindex(names)
    if "full" in med.index:
        med["step_vs_full"] = med.sec_per_step / med.loc["full", "sec_per_step"]
        med["memory_vs_full"] = med.peak_rss_mib / med.loc["full", "peak_rss_mib"]
        paired = paired_ratios(df)
        med["paired_median"] = paired["median"].reindex(med.index)
        med["paired_ci90"] = paired["ci90"].reindex(med.index)
    med["what"] = [describe(n) for n in med.index]
    print(f"\nMiniLM training step ({'bf16 autocast' if a.bf16 else 'fp32'}, {df['dropout'].iloc[0]}), batch {a.batch_size}, {a.threads} threads, medians of {a.rounds} "
          f"interleaved processes x {a.steps} steps (torch {torch.__version__}):\n")
    print(med.round(3).to_markdown())
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
