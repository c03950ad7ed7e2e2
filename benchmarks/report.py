"""Write benchmarks/README.md from the measured results in benchmarks/results/.

    python benchmarks/report.py            # (re)write benchmarks/README.md
    python benchmarks/report.py --check    # exit 1 if benchmarks/README.md is not what the results give

Every figure in the generated file is read or computed here from a result file: medians per
method, ratios against the full fine-tune, paired ratios with their bootstrap intervals (by
bench_train.paired_ratios and bench_train.pool, so they match what bench_train.py prints), and
the device, threads and library versions that each file recorded. What a file does not record
is written as "not recorded". The hand-written text is in FILES below (what each file
measures, the command that wrote it, where its history says more) and in the headings and notes
around the tables; no measured figure is typed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import numbers
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE / "README.md"
sys.path.insert(0, str(HERE))

import bench_int8  # noqa: E402  (owns the int8 profile's summary table)
import bench_train  # noqa: E402  (owns the method labels and the paired ratios)

CURRENT_FORWARD = ("Training forward: `load_base`'s default, the CLS-only last layer and the padding-free "
                   "encoder, for every method but AdapterHub's (its transformers 4.57 runs the plain model); "
                   "`:padded` rows run the padded batch and `:whole` rows the whole last layer, in the same run.")
OLD_FORWARD = ("Training forward: the plain padded model with the whole last layer. This run predates the "
               "CLS-only last layer and the padding-free encoder; to time that forward today, add "
               "`:padded:whole` to each method name.")
CLS_ONLY_FORWARD = ("Training forward: the CLS-only last layer on the padded batch (this run predates the "
                    "padding-free encoder); to repeat it today, add `:padded` to each method name.")

# What each result file measures and the command that wrote it. "history" is where the commit log
# says more about a file; "device_note" quotes what the README of the time said about the machine
# when the file itself records no CPU model.
FILES = {
    "layers.csv": dict(
        group="current", title="One LoRA layer against nn.Linear, HF PEFT and loralib",
        what="Forward plus backward of one layer at r=8, alpha=16 on 2,048 tokens, every implementation "
             "timed interleaved in one process; each cell is a median over the repeats divided by the "
             "baseline's median from the same run. Training baseline: a frozen `nn.Linear` of the same "
             "shape; inference (`no_grad`, eval mode) baseline: the plain `nn.Linear`.",
        command="python benchmarks/bench_layers.py --repeats 60"),
    "layer_kinds.csv": dict(
        group="current", title="The other layer kinds: GPT-2's Conv1D, Conv2d, Embedding, MultiheadAttention against PEFT",
        what="For each kind and shape, the frozen base layer, peftkit's LoRA layer and HF PEFT's, at r=8, alpha=16, "
             "timed interleaved in one process: forward plus backward (the input requires grad, except an "
             "embedding's token ids) and unmerged inference under `no_grad`. Each cell is a median over the "
             "repeats divided by the frozen layer's median from the same run; the last column divides "
             "peftkit's median by PEFT's.",
        command="python benchmarks/bench_layers.py --kinds all --threads 1 --repeats 15 --warmup 2"),
    "dora.csv": dict(
        group="current", title="DoRA against LoRA, peftkit's against HF PEFT's",
        what="One layer at r=8, alpha=16 on 2,048 tokens: the frozen `nn.Linear`, peftkit's LoRA and DoRA, PEFT's "
             "LoRA and DoRA (`use_dora=True`), timed interleaved in one process; forward plus backward (dropout 0) "
             "and unmerged inference under `no_grad`. Each cell is a median over the repeats divided by the frozen "
             "layer's median from the same run; the last three columns divide medians: DoRA's over LoRA's in each "
             "library, and peftkit's DoRA over PEFT's.",
        command="python benchmarks/bench_layers.py --dora --repeats 30"),
    "federated.csv": dict(
        group="current", title="Federated adaptation: four domains as four clients, four strategies",
        what="MiniLM, the four domains as four non-IID clients (256 training snippets each), every client in every "
             "round, local steps through `fit`, LoRA r=8 on query and value (FedAvg: the full fine-tune), one seed. "
             "Accuracy is the mean over the four domains' test snippets after the last round, with a 95% normal "
             "interval over all those snippets; the aggregation error is the last round's "
             "Frobenius norm, over all LoRA layers, of the server's update minus the exact average of the clients' "
             "updates (`peftkit.studies.federated.aggregation_error`; 0 to rounding for FFA-LoRA and FLoRA); bytes are what every client sent and received over all rounds.",
        command="python benchmarks/bench_federated.py"),
    "train_attn0.csv": dict(
        group="current", title="Training step on MiniLM: the padding-free encoder on and off",
        what="Seconds per training step (forward, backward, AdamW) and peak resident memory, batch 32 of "
             "real movie snippets in random order, each (method, round) in a fresh process, every round in "
             "its own seeded shuffle of the methods. Attention-probability dropout 0; torch's dropout.",
        command="python benchmarks/bench_train.py --rounds 8 --steps 15 --attention-dropout 0 "
                "--methods full,full:padded,peftkit_lora,peftkit_lora:padded,peftkit_adapter,peft_lora",
        forward=CURRENT_FORWARD,
        device_note="the README of commit 91f3a42 says the AVX2-only EPYC"),
    "train_attn0_8methods.csv": dict(
        group="current", title="Training step on MiniLM: all eight methods",
        what="As above, for every method bench_train knows, AdapterHub's `adapters` included (from "
             "`.venv-peers`, `make peers`; its row shows what a user of it gets, not like for like).",
        command="python benchmarks/bench_train.py --rounds 4 --steps 15 --attention-dropout 0 "
                "--out benchmarks/results/train_attn0_8methods.csv",
        forward=CURRENT_FORWARD),
    "train_attn0_lora_10rounds.csv": dict(
        group="current", title="Training step on MiniLM: LoRA against the full fine-tune, 10 rounds",
        what="LoRA alone (peftkit's and PEFT's) against the full fine-tune, more rounds for a tighter interval.",
        command="python benchmarks/bench_train.py --rounds 10 --steps 15 --attention-dropout 0 "
                "--methods full,peftkit_lora,peft_lora --out benchmarks/results/train_attn0_lora_10rounds.csv",
        forward=CURRENT_FORWARD),
    "train_attn0_lora_12rounds.csv": dict(
        group="current", title="Training step on MiniLM: LoRA against the full fine-tune, 12 rounds",
        what="The same as the 10-round run, 12 rounds.",
        command="python benchmarks/bench_train.py --rounds 12 --steps 15 --attention-dropout 0 "
                "--methods full,peftkit_lora,peft_lora --out benchmarks/results/train_attn0_lora_12rounds.csv",
        forward=CURRENT_FORWARD),
    "dropout.csv": dict(
        group="current", title="FastDropout against torch's nn.Dropout",
        what="Forward plus backward of dropout at p = 0.1 on MiniLM's activation shapes at batch 32 "
             "(2,048 tokens x 384 and x 1,536), both timed interleaved in one process; medians.",
        command="python benchmarks/bench_dropout.py",
        device_note="the README of commit 2fd7550 says the AVX2-only EPYC"),
    "serve.csv": dict(
        group="current", title="Serving: hot swaps and memory, 2 threads",
        what="Four MiniLM LoRA adapters (q, v, r=8) behind one `Deployer`: a switch between two of them, "
             "unmerged (a copy into the live modules) and merged (the old update taken out of W, the new "
             "one folded in); a switch that must rebuild the live modules (LoRA to a Pfeiffer adapter); "
             "one `predict` on 32 movie snippets; the memory the four adapters add. Medians over fresh "
             "processes x switches.",
        command="python benchmarks/bench_serve.py"),
    "serve_1thread.csv": dict(
        group="current", title="Serving: hot swaps and memory, 1 thread",
        what="The same at one thread.",
        command="python benchmarks/bench_serve.py --threads 1 --out benchmarks/results/serve_1thread.csv"),
    "serve_mixed.csv": dict(
        group="current", title="Serving: mixed-adapter batches, padding-free inference, the HTTP service",
        what="Four MiniLM LoRA adapters (q, v, r=8), each comparison timed in rounds in one fresh process, "
             "both sides back to back in each round, in a shuffled order: a mixed batch of 32 movie snippets, 8 rows per "
             "adapter, against one adapter for all 32 rows (`Deployer.predict`, texts to probabilities); that "
             "mixed batch against PEFT's `adapter_names` mixed batch of the same adapters on plain transformers; "
             "the forward of peftkit's unmerged LoRA (padding-free encoder, CLS-only last layer) and of peftkit "
             "on the padded model against transformers + PEFT's LoRA on six random batches of 32 snippets; "
             "and `python -m peftkit serve` with 16 concurrent clients sending one text each against "
             "in-process `predict` of the same texts in mixed batches of 16 (texts per second, the "
             "clients on the same machine as the server). One torch thread: the two cores were shared with "
             "other work (the load average below), and at two threads the waits of oversubscribed OpenMP "
             "threads swamped the differences being measured.",
        command="python benchmarks/bench_serve.py --mixed --threads 1"),
    "serve_latency.csv": dict(
        group="current", title="Serving over HTTP: latency at 1, 4 and 16 clients",
        what="One-text `/predict` requests to `python -m peftkit serve` (the four adapters above, a random one "
             "per request, dynamic batching with a 5 ms wait), each client sending its next request when the "
             "last one is answered; written by the same run as `serve_mixed.csv`.",
        command="python benchmarks/bench_serve.py --mixed --threads 1"),
    "compress.json": dict(
        group="current", title="Compression of a MiniLM LoRA (movies)",
        what="The LoRA (q, v, r=8) trained one epoch on all 8,454 movie training snippets, merged, then "
             "compressed: int8 accuracy on every domain's full test split, the latency of one batch of 32 "
             "movie snippets (median of interleaved repeats), size on disk, simulated k-bit rounding, the "
             "three merge/quantize orders at 4 bits, a LoRA trained on a 4-bit base, and pruning.",
        command="python benchmarks/bench_compress.py",
        device_note="issue 22 and the README of the time say AMD EPYC; the int8 kernel of the time was the first "
                    "Int8Linear's, int_mm_v1 in the precision sections below"),
    "gpu_check_h200.json": dict(
        group="current", title="GPU check: the LoRA layer on CUDA",
        what="The LoRA fast path's numerics against the plain formula (fp32), gradcheck in float64, dtype "
             "and device following the base, a short bf16 `fit`, and forward plus backward time against a "
             "frozen Linear and PEFT's LoRA layer at 8,192 tokens.",
        command="python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_h200.json"),
    "gpu_layer_kinds_h200.json": dict(
        group="current", title="GPU check: the LoRA layer kinds on CUDA",
        what="GPT-2's Conv1D, Conv2d, Embedding and MultiheadAttention LoRA layers on an H200: merged "
             "against unmerged in fp32, dtype following a bf16 base and autocast forward plus backward, "
             "the same outputs as PEFT's layer on the same factors, and forward plus backward / unmerged "
             "inference time against the frozen layer and PEFT's (ratios within one run; notebook-only "
             "packages absent there are stubbed, as the file records).",
        command="python benchmarks/gpu_layer_kinds_check.py --out benchmarks/results/gpu_layer_kinds_h200.json"),
    "serve_gpu_h200.json": dict(
        group="current", title="GPU check: the Deployer on CUDA",
        what="A tiny random BERT served on CUDA: answers against the CPU's through every switch order, "
             "merged or not, threads, save/load, and switch times.",
        command="python benchmarks/gpu_serve_check.py --out benchmarks/results/serve_gpu_h200.json"),
    # Measured on older code; the only measurement of their setting, so shown in full.
    "train_bf16_attn0.csv": dict(
        group="older_code", title="Training step under CPU bf16 autocast",
        what="Every method under `torch.autocast(\"cpu\", torch.bfloat16)` (fp32 weights, gradients and "
             "AdamW state), as `TrainConfig(cpu_bf16=True)`. Attention dropout 0, torch's dropout.",
        command="python benchmarks/bench_train.py --bf16 --rounds 3 --steps 15 --attention-dropout 0",
        forward=OLD_FORWARD, history="56cb3ff (written as train_bf16.csv; renamed in 01e06b2)",
        device_note="the README of the time says the EPYC with AVX-512 and AVX512-BF16"),
    "train_attn0_fp32_for_bf16.csv": dict(
        group="older_code", title="Training step in fp32, the reference for the bf16 run",
        what="The fp32 run that the bf16 run was compared with when it was made: the file "
             "`train_attn0.csv` as of commit 9f010e6, restored byte for byte under this name "
             "(`git show 9f010e6:benchmarks/results/train_attn0.csv`).",
        command="python benchmarks/bench_train.py --rounds 4 --steps 15 --attention-dropout 0 "
                "--out benchmarks/results/train_attn0_fp32_for_bf16.csv   # after make peers",
        forward=OLD_FORWARD, history="9f010e6",
        device_note="the README of commit 56cb3ff compares it with the bf16 run as the same machine"),
    "train.csv": dict(
        group="older_code", title="Training step with the model's attention dropout (0.1)",
        what="Every method with MiniLM's own attention-probability dropout, 0.1, which makes PyTorch's CPU "
             "attention keep its probability matrices for backward. Methods in a fixed order each round "
             "(the run predates the seeded shuffle, so the file has no `position` column).",
        command="python benchmarks/bench_train.py --rounds 3 --steps 15",
        forward=OLD_FORWARD, history="0a12d95",
        device_note="the README of the time says the EPYC with AVX-512"),
    "train_attn0_whole_last_layer.csv": dict(
        group="older_code", title="Training step with torch's dropout, the partner of the FastDropout run",
        what="All eight methods with torch's dropout, attention dropout 0, the same day and machine as "
             "the FastDropout run below.",
        command="python benchmarks/bench_train.py --rounds 5 --steps 15 --attention-dropout 0 "
                "--out benchmarks/results/train_attn0_whole_last_layer.csv",
        forward=OLD_FORWARD, history="2fd7550 (written as train_attn0.csv; renamed in 9652f80)",
        device_note="the README of commit 2fd7550 says the AVX2-only EPYC"),
    "train_attn0_fast_dropout.csv": dict(
        group="older_code", title="Training step with FastDropout",
        what="Every model's dropout swapped for peftkit's FastDropout, as `TrainConfig(fast_dropout=True)`.",
        command="python benchmarks/bench_train.py --rounds 5 --steps 15 --attention-dropout 0 --fast-dropout "
                "--methods full,peftkit_lora,peftkit_lora_do,peftkit_adapter,peft_lora",
        forward=OLD_FORWARD, history="2fd7550",
        device_note="the README of commit 2fd7550 says the AVX2-only EPYC"),
    # Superseded: listed briefly.
    "train_attn0_cls_only.csv": dict(
        group="older_code", title="Training step: the CLS-only last layer on and off",
        what="The only run that times the CLS-only last layer against the whole last layer in one run "
             "(the `:whole` rows), on the padded batch. Attention dropout 0, torch's dropout.",
        command="python benchmarks/bench_train.py --rounds 6 --steps 15 --attention-dropout 0 "
                "--methods full,full:whole,peftkit_lora,peftkit_lora:whole,peftkit_adapter,peft_lora",
        forward=CLS_ONLY_FORWARD, history="9652f80 (written as train_attn0.csv; renamed in de0fb3b)",
        device_note="the README of the time says the AVX2-only EPYC"),
    "train_attn0_8methods_cls_only.csv": dict(
        group="superseded", title="All eight methods, CLS-only last layer, padded batch",
        command="python benchmarks/bench_train.py --rounds 4 --steps 15 --attention-dropout 0",
        forward=CLS_ONLY_FORWARD, history="d4cf7fd (as train_attn0_8methods.csv)",
        superseded_by="train_attn0_8methods.csv"),
    "train_attn0_lora_8rounds.csv": dict(
        group="superseded", title="LoRA against the full fine-tune, CLS-only last layer, padded batch",
        command="python benchmarks/bench_train.py --rounds 8 --steps 15 --attention-dropout 0 "
                "--methods full,peftkit_lora,peft_lora",
        forward=CLS_ONLY_FORWARD, history="666a492", superseded_by="train_attn0_lora_10rounds.csv"),
    "train_attn0_whole_last_layer_10rounds.csv": dict(
        group="superseded", title="LoRA and the adapter against the full fine-tune, whole last layer, padded batch",
        command="python benchmarks/bench_train.py --rounds 10 --steps 15 --attention-dropout 0 "
                "--methods full,peftkit_lora,peftkit_adapter,peft_lora",
        forward=OLD_FORWARD, history="666a492", superseded_by="train_attn0_lora_10rounds.csv"),
}

# The runs pooled for the headline LoRA ratio: every current fp32 run with torch's dropout.
POOLED = ["train_attn0.csv", "train_attn0_8methods.csv", "train_attn0_lora_10rounds.csv",
          "train_attn0_lora_12rounds.csv"]


# ----------------------------------------------------------------------------- formatting

def num(x, digits: int = 3) -> str:
    """A cell: integers with thousands separators, floats to `digits` places (0: as an integer),
    booleans as yes/no, NaN and None as empty, anything else as its text."""
    if x is None or (isinstance(x, numbers.Real) and not isinstance(x, numbers.Integral) and math.isnan(x)):
        return ""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, numbers.Integral) or (isinstance(x, numbers.Real) and digits == 0):
        return f"{x:,.0f}"
    if isinstance(x, numbers.Real):
        return f"{x:.{digits}f}"
    return str(x)


def table(header: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """A GitHub markdown table of already formatted cells; columns in `right` align right
    (by default every column but the first)."""
    right = set(range(1, len(header))) if right is None else right

    def cell(v) -> str:
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def frame_table(df: pd.DataFrame, digits: dict | None = None, default: int = 3) -> str:
    """A DataFrame (its index left out) as a markdown table; float columns to `digits[col]`
    places (else `default`); numeric columns align right."""
    digits = digits or {}
    rows = [[num(v, digits.get(c, default)) for c, v in zip(df.columns, rec, strict=True)]
            for rec in df.itertuples(index=False, name=None)]
    numeric = {i for i, c in enumerate(df.columns)
               if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])}
    return table([str(c) for c in df.columns], rows, right=numeric)


def values(df: pd.DataFrame, col: str) -> str:
    """The distinct values of a column, or "not recorded"."""
    if col not in df:
        return "not recorded"
    return ", ".join(str(v) for v in dict.fromkeys(df[col].tolist()))


def measured_with(df: pd.DataFrame, meta: dict) -> str:
    """The device, threads and versions a CSV recorded, one bullet list."""
    cpu = values(df, "cpu")
    if cpu == "not recorded" and meta.get("device_note"):
        cpu += f" in the file ({meta['device_note']})"
    out = [f"- CPU: {cpu}", f"- threads: {values(df, 'threads')}", f"- torch: {values(df, 'torch')}"]
    if "method" in df:
        if "transformers" in df:
            by = df.groupby("transformers", sort=False)["method"].unique()
            parts = [f"{v} ({', '.join(method_order(str(m).split(':')[0] for m in ms))})" if len(by) > 1 else str(v)
                     for v, ms in by.items()]
            out.append("- transformers: " + "; ".join(parts))
        else:
            out.append("- transformers: not recorded")
        for col, name in [("precision", "precision"), ("dropout", "dropout"),
                          ("attention_dropout", "attention dropout"), ("batch_size", "batch size"),
                          ("base", "base")]:
            out.append(f"- {name}: {values(df, col)}")
        peers = [lib for prefix, lib in [("peft_", "peft"), ("adapterhub", "adapters")]
                 if df["method"].astype(str).str.startswith(prefix).any()]
        if peers:
            out.append(f"- {' and '.join(peers)}: version not recorded")
    return "\n".join(out)


def label(name: str) -> str:
    try:
        return bench_train.describe(name)
    except KeyError:
        return name


def method_order(names) -> list[str]:
    known = list(bench_train.METHODS)

    def key(n):
        base, *variants = str(n).split(":")
        return (known.index(base) if base in known else len(known), variants)
    return sorted(dict.fromkeys(names), key=key)


def rounds_note(df: pd.DataFrame, command: str) -> str:
    """Say so when the file holds a different number of rounds than its recorded command asks for."""
    parts = command.split()
    if "round" not in df or "--rounds" not in parts:
        return ""
    asked, held = int(parts[parts.index("--rounds") + 1]), df["round"].nunique()
    return "" if asked == held else (f" The file holds {held} rounds, not the {asked} that this command "
                                     "(as recorded at the time) asks for.")


# ----------------------------------------------------------------------------- sections

def train_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: median s/step and peak RSS, their ratios to the full fine-tune's medians, and
    the paired per-round ratio with its 90% bootstrap interval (bench_train.paired_ratios)."""
    med = df.groupby("method", sort=False).agg(sec=("sec_per_step", "median"), rss=("peak_rss_mib", "median"),
                                               trainable=("trainable", "first"), rounds=("round", "nunique"))
    med = med.reindex(method_order(med.index))
    has_full = "full" in med.index
    paired = bench_train.paired_ratios(df) if has_full else None
    rows = []
    for name, r in med.iterrows():
        row = {"method": label(name), "rounds": int(r.rounds), "s/step": r.sec}
        if has_full:
            row["vs full"] = r.sec / med.loc["full", "sec"]
            if name in paired.index:
                p = paired.loc[name]
                lo, hi = p["ci90"].split("-")
                row["paired vs full [90% interval]"] = f"{p['median']:.3f} [{lo}–{hi}]"
            else:
                row["paired vs full [90% interval]"] = ""
        row["peak RSS (MiB)"] = r.rss
        if has_full:
            row["RSS vs full"] = r.rss / med.loc["full", "rss"]
        row["trainable"] = int(r.trainable)
        rows.append(row)
    return pd.DataFrame(rows)


TRAIN_DIGITS = {"s/step": 3, "vs full": 2, "peak RSS (MiB)": 0, "RSS vs full": 2, "rounds": 0, "trainable": 0}


def header(name: str, meta: dict, level: str = "###") -> list[str]:
    out = [f"{level} {meta['title']}", "", f"`benchmarks/results/{name}`" + (
        f" (history: commit {meta['history']})" if meta.get("history") else "") + ".", ""]
    if meta.get("what"):
        out += [meta["what"], ""]
    if meta.get("forward"):
        out += [meta["forward"], ""]
    return out


def command_block(command: str) -> list[str]:
    return ["```bash", command, "```", ""]


def train_section(name: str, meta: dict) -> list[str]:
    df = pd.read_csv(RESULTS / name)
    out = header(name, meta) + command_block(meta["command"])
    note = rounds_note(df, meta["command"])
    if note:
        out += [note.strip(), ""]
    out += [frame_table(train_summary(df), TRAIN_DIGITS), ""]
    variants = variant_table(df)
    if variants:
        out += [("Each variant against the same method in the same run (the variant's step and peak over "
                "the default's; paired: the median of the per-round ratios, with its 90% bootstrap interval):"),
                "", variants, ""]
    out += ["Measured with:", "", measured_with(df, meta), ""]
    return out


def variant_table(df: pd.DataFrame) -> str:
    """For each method run with a ':padded' or ':whole' variant in the same file: the variant
    against the plain method, as a ratio of medians and as paired per-round ratios."""
    rows = []
    for name in method_order(df["method"].unique()):
        base = str(name).split(":")[0]
        if name == base or base not in set(df["method"]):
            continue
        pair = df[df["method"].isin([base, name])]
        paired = bench_train.paired_ratios(pair, reference=base).loc[name]
        a, b = pair[pair.method == base], pair[pair.method == name]
        lo, hi = paired["ci90"].split("-")
        rows.append([label(name), num(b.sec_per_step.median() / a.sec_per_step.median(), 2),
                     f"{paired['median']:.3f} [{lo}–{hi}]",
                     num(b.peak_rss_mib.median() - a.peak_rss_mib.median(), 0)])
    if not rows:
        return ""
    return table(["variant", "s/step vs default", "paired [90% interval]", "peak change (MiB)"], rows)


def pooled_section() -> list[str]:
    p = bench_train.pool([str(RESULTS / f) for f in POOLED])
    p = p.reindex(method_order(p.index))
    rows = []
    for name, r in p.iterrows():
        lo, hi = r["ci90"].split("-")
        rows.append([label(name), int(r["rounds"]), f"{r['median']:.3f} [{lo}–{hi}]"])
    cmd = "python benchmarks/bench_train.py --pool " + " ".join(f"benchmarks/results/{f}" for f in POOLED)
    return ["### Training step on MiniLM: the current runs pooled", "",
            ("Each method's step over its own round's full fine-tune, over the rounds of every current fp32 "
            "run with torch's dropout taken together (each file's rounds stay paired with that file's own "
            "full fine-tune; `--pool` refuses files measured under different settings)."), ""] + command_block(cmd) + [
            table(["method", "rounds", "paired vs full [90% interval]"], rows), ""]


def compare_runs(a_name: str, b_name: str, a_label: str, b_label: str) -> str:
    """Per method present in both: the medians of each run and b's step and peak over a's."""
    a, b = pd.read_csv(RESULTS / a_name), pd.read_csv(RESULTS / b_name)
    ma = a.groupby("method").agg(sec=("sec_per_step", "median"), rss=("peak_rss_mib", "median"))
    mb = b.groupby("method").agg(sec=("sec_per_step", "median"), rss=("peak_rss_mib", "median"))
    rows = []
    for name in method_order(set(ma.index) & set(mb.index)):
        rows.append([label(name), num(ma.loc[name, "sec"]), num(mb.loc[name, "sec"]),
                     num(mb.loc[name, "sec"] / ma.loc[name, "sec"], 2),
                     num(ma.loc[name, "rss"], 0), num(mb.loc[name, "rss"], 0),
                     num(mb.loc[name, "rss"] - ma.loc[name, "rss"], 0)])
    return table(["method", f"{a_label} s/step", f"{b_label} s/step", f"{b_label} / {a_label}",
                  f"{a_label} peak (MiB)", f"{b_label} peak (MiB)", "peak change (MiB)"], rows)


LAYER_NAMES = {"frozen_linear": "frozen Linear", "trainable_linear": "trainable Linear", "peftkit": "peftkit LoRA",
               "peft": "HF PEFT LoRA", "loralib": "loralib", "linear": "Linear",
               "peftkit_unmerged": "peftkit unmerged", "peftkit_merged": "peftkit merged",
               "peft_unmerged": "HF PEFT unmerged", "loralib_unmerged": "loralib unmerged"}
LAYER_MODES = {"train": "Training (forward + backward, dropout 0), ratio to a frozen `nn.Linear`",
               "train_dropout0.1": "Training with LoRA dropout 0.1, ratio to a frozen `nn.Linear`",
               "inference": "Inference (`no_grad`), ratio to the plain `nn.Linear`"}


def layers_section(name: str, meta: dict) -> list[str]:
    df = pd.read_csv(RESULTS / name)
    out = header(name, meta) + command_block(meta["command"])
    for mode, title in LAYER_MODES.items():
        d = df[df["mode"] == mode]
        if d.empty:
            continue
        impls = list(dict.fromkeys(d["impl"]))
        base = d["baseline"].iloc[0]
        rows = []
        for shape in dict.fromkeys(d["shape"]):
            s = d[d["shape"] == shape].set_index("impl")
            rows.append([shape, num(float(s.loc[base, "median_ms"]), 1)]
                        + [num(float(s.loc[i, "ratio_vs_baseline"]), 2) for i in impls if i != base])
        out += [f"{title}:", "", table(["shape", f"{LAYER_NAMES.get(base, base)} (ms)"]
                                       + [LAYER_NAMES.get(i, i) for i in impls if i != base], rows), ""]
    out += ["Measured with:", "", measured_with(df, meta), "- peft and loralib: versions not recorded",
            f"- tokens: {values(df, 'tokens')}; rank: {values(df, 'rank')}; repeats: {values(df, 'repeats')}",
            f"- other processes' CPU share: {values(df, 'other_load')}", ""]
    return out


def layer_kinds_section(name: str, meta: dict) -> list[str]:
    df = pd.read_csv(RESULTS / name)
    rows = []
    for (kind, shape, mode), d in df.groupby(["kind", "shape", "mode"], sort=False):
        s = d.set_index("impl")
        rows.append([kind, shape, mode, num(float(s.loc["frozen", "median_ms"]), 3),
                     num(float(s.loc["peftkit", "ratio_vs_baseline"]), 2), num(float(s.loc["peft", "ratio_vs_baseline"]), 2),
                     num(float(s.loc["peftkit", "median_ms"]) / float(s.loc["peft", "median_ms"]), 2)])
    return header(name, meta) + command_block(meta["command"]) + [
        table(["kind", "shape", "mode", "frozen (ms)", "peftkit", "PEFT", "peftkit / PEFT"], rows, right={3, 4, 5, 6}), "",
        "Shapes: Conv1D (in)x(out) over the tokens; Conv2d in x out x kernel x side x batch; Embedding "
        "vocabulary x width over the tokens; MultiheadAttention width x heads x sequence x batch.", "",
        "Measured with:", "", measured_with(df, meta), f"- peft: {values(df, 'peft')}",
        f"- repeats: {values(df, 'repeats')}; other processes' CPU share: {values(df, 'other_load')}", ""]


def dora_section(name: str, meta: dict) -> list[str]:
    df = pd.read_csv(RESULTS / name)
    rows = []
    for (shape, mode), d in df.groupby(["shape", "mode"], sort=False):
        s = d.set_index("impl")
        ms = s["median_ms"].astype(float)
        rows.append([shape, mode, num(float(ms["frozen_linear"]), 3)]
                    + [num(float(s.loc[i, "ratio_vs_baseline"]), 2) for i in ("peftkit_lora", "peftkit_dora", "peft_lora", "peft_dora")]
                    + [num(float(ms["peftkit_dora"] / ms["peftkit_lora"]), 2), num(float(ms["peft_dora"] / ms["peft_lora"]), 2),
                       num(float(ms["peftkit_dora"] / ms["peft_dora"]), 2)])
    return header(name, meta) + command_block(meta["command"]) + [
        table(["shape", "mode", "frozen (ms)", "peftkit LoRA", "peftkit DoRA", "PEFT LoRA", "PEFT DoRA",
               "DoRA / LoRA, peftkit", "DoRA / LoRA, PEFT", "peftkit DoRA / PEFT DoRA"], rows, right=set(range(2, 10))), "",
        "Measured with:", "", measured_with(df, meta), f"- peft: {values(df, 'peft')}",
        f"- tokens: {values(df, 'tokens')}; repeats: {values(df, 'repeats')}; other processes' CPU share: "
        f"{values(df, 'other_load')}", ""]


def federated_section(name: str, meta: dict) -> list[str]:
    df = pd.read_csv(RESULTS / name)
    info = json.loads((RESULTS / "federated.json").read_text())
    n_eval = info["settings"]["n_eval"]
    rows = []
    for strategy, d in df.groupby("strategy", sort=False):
        first, last = d[d["round"] == d["round"].min()], d[d["round"] == d["round"].max()]
        acc, n = float(last["accuracy"].mean()), n_eval * len(last)
        half = 1.96 * (acc * (1 - acc) / n) ** 0.5
        err = last["aggregation_error"].dropna()
        rows.append([strategy, int(d["round"].max()), num(float(first["accuracy"].mean()), 3), num(acc, 3),
                     f"[{num(acc - half, 3)}, {num(acc + half, 3)}]", num(float(err.iloc[0]), 2) if len(err) else "",
                     f"{(d['bytes_up'].sum() + d['bytes_down'].sum()) / 1e6:,.1f}"])
    env = info.get("env", {})
    return header(name, meta) + command_block(meta["command"]) + [
        table(["strategy", "rounds", "accuracy before", "accuracy after", "95% interval", "aggregation error",
               "MB on the wire"], rows, right=set(range(1, 7))), "",
        "Measured with:", "", f"- CPU: {env.get('cpu', 'not recorded')}; threads: {env.get('threads', 'not recorded')}; "
        f"torch {env.get('torch', 'not recorded')}, transformers {env.get('transformers', 'not recorded')}",
        f"- settings: {', '.join(f'{k} {v}' for k, v in info['settings'].items())}",
        f"- {info['note']}" if info.get("note") else "", ""]


def dropout_section(name: str, meta: dict) -> list[str]:
    df = pd.read_csv(RESULTS / name)
    d = df[["shape", "implementation", "ms", "vs_torch"]].rename(columns={"vs_torch": "vs torch"})
    return header(name, meta) + command_block(meta["command"]) + [
        frame_table(d, {"ms": 2, "vs torch": 2}), "", "Measured with:", "", measured_with(df, meta),
        f"- repeats: {values(df, 'repeats')}", ""]


SERVE_COLS = {"mode": "mode", "switch_ms_median": "switch (ms)", "switch_ms_p90": "switch p90 (ms)",
              "rebuild_switch_ms": "rebuilding switch (ms)", "predict_ms_batch": "predict, 32 texts (ms)",
              "adapters_rss_mib": "4 adapters' RSS (MiB)", "base_rss_mib": "base RSS (MiB)",
              "adapters_pct_of_base_rss": "adapters, % of base RSS"}


def notes_from_md(path: Path) -> list[str]:
    """Paragraphs in parentheses that a benchmark's .md copy carries (notes added by hand at the time)."""
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip().startswith("(")]


def serve_section(name: str, meta: dict) -> list[str]:
    df = pd.read_csv(RESULTS / name)
    d = df[list(SERVE_COLS)].rename(columns=SERVE_COLS)
    out = header(name, meta) + command_block(meta["command"]) + [
        frame_table(d, {"base RSS (MiB)": 0, "adapters, % of base RSS": 2, "predict, 32 texts (ms)": 1,
                        "rebuilding switch (ms)": 2, "4 adapters' RSS (MiB)": 2}), ""]
    out += notes_from_md(path=(RESULTS / name).with_suffix(".md"))
    out += ["", "Measured with:", "", measured_with(df, meta),
            (f"- rounds x switches: {values(df, 'rounds')} x {values(df, 'repeats')}; batch size: "
            f"{values(df, 'batch_size')}; base: {values(df, 'base')}"),
            "- highest 1-minute load average during the run: "
            + (f"{df['load_avg_max'].max():.2f}" if "load_avg_max" in df else "not recorded"), ""]
    return out


def serve_env(df: pd.DataFrame) -> list[str]:
    """What a serve_mixed / serve_latency run recorded about its machine and libraries."""
    return ["Measured with:", "", f"- CPU: {values(df, 'cpu')}", f"- threads: {values(df, 'threads')}",
            f"- torch: {values(df, 'torch')}; transformers: {values(df, 'transformers')}; peft: {values(df, 'peft')}",
            f"- base: {values(df, 'base')}; repeats per side: {values(df, 'repeats')}; date: {values(df, 'date')}",
            "- highest 1-minute load average during the run: "
            + (f"{df['load_avg_max'].max():.2f}" if "load_avg_max" in df else "not recorded"), ""]


def serve_mixed_section(name: str, meta: dict) -> list[str]:
    df = pd.read_csv(RESULTS / name)
    rows = []
    for r in df.itertuples():
        target = "" if pd.isna(r.target) else str(r.target).replace("<=", "≤ ").replace(">=", "≥ ")
        met = "" if not target else ("yes" if str(r.meets_target) == "True" else "no")
        rows.append([r.comparison, r.ours, r.baseline, f"{num(r.ours_value, 1)} {r.unit}",
                     f"{num(r.baseline_value, 1)} {r.unit}", num(r.ratio, 3), num(r.ratio_of_medians, 3),
                     num(int(r.rounds), 0), target, met,
                     "" if pd.isna(r.check_max_abs_diff) else f"{r.check_max_abs_diff:.1e}"])
    out = header(name, meta) + command_block(meta["command"])
    out += [("peftkit and baseline: medians over the rounds; ratio: the median of the per-round ratios (each round "
            "times both sides back to back); check: the largest difference between the two sides' answers."), ""]
    out += [table(["comparison", "peftkit side", "baseline", "peftkit", "baseline", "ratio", "ratio of medians",
                   "rounds", "target", "met", "check"], rows, right={3, 4, 5, 6, 7}), ""]
    out += [f"- {r.comparison}: {r.detail}" for r in df.itertuples() if isinstance(r.detail, str) and r.detail]
    return out + [""] + serve_env(df)


def serve_latency_section(name: str, meta: dict) -> list[str]:
    df = pd.read_csv(RESULTS / name)
    d = df[["clients", "requests", "p50_ms", "p99_ms", "mean_ms", "texts_per_s"]].rename(columns={
        "p50_ms": "p50 (ms)", "p99_ms": "p99 (ms)", "mean_ms": "mean (ms)", "texts_per_s": "texts/s"})
    return header(name, meta) + command_block(meta["command"]) + [
        frame_table(d, {"p50 (ms)": 1, "p99 (ms)": 1, "mean (ms)": 1, "texts/s": 1}), "",
        "p99 over this few requests is close to their maximum; rerun with more clients' requests for a firmer tail.",
        ""] + serve_env(df)


COMPRESS_DIGITS = {"file bytes": 0, "params": 0, "bits": 0, "ms per batch": 1, "vs first": 3, "vs fp32": 3,
                   "speedup vs fp32": 2, "speedup vs dense": 2, "amount": 1, "sparsity": 2}


def compress_section(name: str, meta: dict) -> list[str]:
    d = json.loads((RESULTS / name).read_text())
    out = header(name, meta) + command_block(meta["command"])
    for key, rows in d.items():
        if not isinstance(rows, list):
            continue
        f = pd.DataFrame(rows).drop(columns=["index"], errors="ignore")
        out += [f"{key}:", "", frame_table(f, COMPRESS_DIGITS, default=2 if "(%)" in key else 4), ""]
    env = d.get("env", "not recorded")
    cpu = "" if "CPU " in env else f" CPU model: not recorded in the file ({meta['device_note']})."
    out += ["Measured with (as the file records it): " + env + "." + cpu, ""]
    return out


# ----------------------------------------------------------------------------- inference precision

PRECISION_PREFIXES = ("precision_", "int8_profile_", "serve_precision_")  # precision_shapes_ starts like the first


def precision_files() -> list[Path]:
    return sorted(p for p in RESULTS.iterdir() if p.name.startswith(PRECISION_PREFIXES) and p.suffix in (".csv", ".json"))


def _family(path: Path) -> tuple[str, str]:
    """(CPU family, CPU with flags) as the file records them."""
    if path.suffix == ".json":
        env = json.loads(path.read_text())["env"]
        return env["cpu_family"], env["cpu_flags"]
    df = pd.read_csv(path)
    return str(df["cpu_family"].iloc[0]), str(df["cpu_flags"].iloc[0])


def _run_label(threads, policy) -> str:
    """ "2 threads" or "2 threads, OMP_WAIT_POLICY=PASSIVE"."""
    label = f"{threads} thread{'s' if int(threads) != 1 else ''}"
    return label + (f", OMP_WAIT_POLICY={policy}" if policy not in (None, "default", "not recorded") else "")


def _env_prefix(policy) -> str:
    return f"OMP_WAIT_POLICY={policy} " if policy not in (None, "default", "not recorded") else ""


def precision_model_section(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    env = d["env"]
    speed = pd.DataFrame(d["speed"])
    acc = pd.DataFrame(d["accuracy"])
    auto = d["auto"]
    policy = env.get("omp_wait_policy")
    return [f"**Whole model, {_run_label(env['threads'], policy)}** (`{path.name}`)", "",
            ("MiniLM with the movies LoRA (q, v, r=8) merged: one batch of 32 movie test snippets per call, every "
             f"precision timed interleaved in one run, medians of {env['repeats']} ({env['clock']}); accuracy on "
             f"each domain's test split; \"auto\" is `optimize_for_inference(model, \"auto\")` on 256 movie "
             f"training texts, timed afresh in the same run. {env['trained']}."), ""] + command_block(_env_prefix(policy) + env["command"]) + [
            frame_table(speed, {"ms per batch": 1, "speed-up vs fp32": 2, "worst drop on a domain (pt)": 2}), "",
            "Accuracy per domain (%), and each precision's drop against fp32 (points):", "",
            frame_table(acc, default=2), "", f"auto: {auto['reason']}", "",
            f"Measured with: {env['cpu_flags']}; {_run_label(env['threads'], None)}; torch {env['torch']}; OMP_WAIT_POLICY "
            f"{env.get('omp_wait_policy', 'not recorded')}; int8 kernel: {env['int8_kernel']}.", ""]


def int8_profile_section(path: Path) -> list[str]:
    df = pd.read_csv(path)
    r = df.iloc[0]
    policy = r.get("omp_wait_policy")
    return [f"**Where Int8Linear's time goes, {_run_label(r['threads'], policy)}** (`{path.name}`)",
            "",
            (f"Each stage of each kernel on MiniLM's Linear shapes at {r['tokens']} rows (one padded batch of 32 "
             f"snippets), timed on its own, interleaved, medians of {r['repeats']} ({r['clock']}); \"layer\" is "
             "the whole layer's forward, \"vs fp32\" its speed-up over `nn.Linear`. `int_mm_v1` is the first "
             "Int8Linear, `onednn` today's default, `int_mm` today's fallback."), ""] + command_block(
            _env_prefix(policy) + "python benchmarks/bench_int8.py" + (f" --threads {r['threads']}" if r["threads"] != 2 else "")) + [
            frame_table(bench_int8.summary(df), {"quantize": 2, "gemm": 2, "dequantize": 2, "layer": 2, "vs fp32": 2}),
            "", (f"Measured with: {r['cpu_flags']}; {_run_label(r['threads'], None)}; torch {r['torch']}; OMP_WAIT_POLICY "
                 f"{r.get('omp_wait_policy', 'not recorded')}; highest 1-minute load average {r['load_avg_max']:.1f} on "
                 f"{r['cpus']} cores."), ""]


def serve_precision_section(path: Path) -> list[str]:
    df = pd.read_csv(path)
    r = df.iloc[0]
    d = df[["what", "predict_ms", "vs_fp32"]].rename(columns={"predict_ms": "predict, 32 texts (ms)",
                                                            "vs_fp32": "speed-up vs its fp32"})
    policy = r.get("omp_wait_policy")
    return [f"**Serving, {_run_label(r['threads'], policy)}** (`{path.name}`)", "",
            ("`predict` on 32 movie snippets, one LoRA live: Deployers in fp32, bf16 (autocast) and "
             "precision=\"auto\" (adapters stay hot-swappable, so int8 is not a candidate there), and one merged "
             "adapter served as a plain model in fp32, bf16 weights and int8; medians over fresh processes x "
             f"predicts ({r['rounds']} x {r['repeats']}), wall time. auto chose: {r['auto_choice']}."), ""] + command_block(
            _env_prefix(policy) + "python benchmarks/bench_serve.py --precisions"
            + (f" --threads {r['threads']}" if r["threads"] != 2 else "")) + [
            frame_table(d, {"predict, 32 texts (ms)": 1, "speed-up vs its fp32": 2}), "",
            (f"Measured with: {r['cpu_flags']}; {_run_label(r['threads'], None)}; torch {r['torch']}; base {r['base']}; "
             f"OMP_WAIT_POLICY {r.get('omp_wait_policy', 'not recorded')}; highest 1-minute load average "
             f"{r['load_avg_max']:.1f}."), ""]


def precision_section() -> list[str]:
    """One subsection per CPU family, each with the whole-model, int8-profile and serving tables."""
    files = precision_files()
    if not files:
        return []
    by_family: dict = {}
    for f in files:
        family, flags = _family(f)
        by_family.setdefault(family, {"flags": flags, "files": []})["files"].append(f)
    out = ["### Inference precision, by CPU family", "",
           ("fp32, bf16 and int8 on each kind of CPU the project has measured on, with `optimize_for_inference`'s "
            "\"auto\" choice. Which precision wins depends on the CPU: bf16 needs AVX512-BF16 or AMX, and AMX "
            "multiplies bf16 and int8 many times faster than AVX-512. Ratios are within one run; times from a "
            "shared machine are noisy, which is why the figures at one thread use this thread's CPU time."), ""]
    builders = {"precision_shapes_": shapes_section, "precision_": precision_model_section,
                "int8_profile_": int8_profile_section, "serve_precision_": serve_precision_section}
    order = ["precision_", "precision_shapes_", "int8_profile_", "serve_precision_"]
    for family, info in by_family.items():
        out += [f"#### {family}", "", f"CPU: {info['flags']}.", ""]
        for f in sorted(info["files"], key=lambda f: (order.index(_kind(f.name)), f.name)):
            out += builders[_kind(f.name)](f)
    return out


def _kind(name: str) -> str:
    return next(k for k in ("precision_shapes_", "serve_precision_", "int8_profile_", "precision_") if name.startswith(k))


def shapes_section(path: Path) -> list[str]:
    df = pd.read_csv(path)
    r = df.iloc[0]
    cols = {"precision": "precision", "ms_per_batch": "ms per batch", "speedup_vs_fp32": "speed-up vs fp32"}
    if "note" in df:
        cols["note"] = "note"
    d = df[list(cols)].rename(columns=cols)
    policy = r.get("omp_wait_policy")
    return [f"**MiniLM-shaped model with random weights, {_run_label(r['threads'], policy)}** "
            f"(`{path.name}`)", "",
            (f"The same precisions on a model of MiniLM's shape with random weights (no model package or corpus "
             f"needed, so it runs on any machine), one batch with the padding of the 32 movie snippets "
             f"({r['tokens']} real tokens in 32 x {r['padded_tokens'] // 32}), interleaved, medians of {r['repeats']} "
             f"({r['clock']}). Speed only: the weights are random."), ""] + command_block(
            _env_prefix(policy) + "python benchmarks/bench_precision_shapes.py"
            + (f" --threads {r['threads']}" if r["threads"] != 2 else "")) + [
            frame_table(d, {"ms per batch": 1, "speed-up vs fp32": 2}), "",
            (f"Measured with: {r['cpu_flags']}; {_run_label(r['threads'], None)}; torch {r['torch']}; OMP_WAIT_POLICY "
             f"{r['omp_wait_policy']}; int8 kernel: {r['int8_kernel']}; highest 1-minute load average "
             f"{r['load_avg_max']:.1f} on {r['cpus']} cores."), ""]


def gpu_section(name: str, meta: dict) -> list[str]:
    d = json.loads((RESULTS / name).read_text())
    rows = []
    for k, v in d.items():
        if k in ("device", "torch"):
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        elif isinstance(v, list):
            v = ", ".join(str(x) for x in v) if v else "none"
        elif isinstance(v, float):
            v = f"{v:.3g}"
        rows.append([k, v])
    return header(name, meta) + command_block(meta["command"]) + [
        table(["check", "result"], rows, right=set()), "",
        (f"Measured with: {d.get('device', 'device not recorded')}, torch {d.get('torch', 'not recorded')}; "
        "threads not recorded."), ""]


def superseded_section() -> list[str]:
    """One row per superseded file, with peftkit LoRA's paired ratio computed from it, and the
    command that wrote each."""
    rows, commands = [], []
    for name, meta in FILES.items():
        if meta["group"] != "superseded":
            continue
        df = pd.read_csv(RESULTS / name)
        s = train_summary(df).set_index("method")
        lora = label("peftkit_lora")
        ratio = s.loc[lora, "paired vs full [90% interval]"] if lora in s.index else ""
        rows.append([f"`{name}`", meta["title"], meta["history"], df["round"].nunique(), ratio,
                     f"`{meta['superseded_by']}`"])
        commands.append(f"- `{name}`: `{meta['command']}`")
    return [table(["file", "what", "commit", "rounds", "peftkit LoRA, paired vs full [90% interval]",
                   "superseded by"], rows, right={3}), "",
            ("The commands that wrote them (on the code of the time; to time those forwards today, add "
            "`:padded` to each method name for the CLS-only runs and `:padded:whole` for the whole-layer one):"),
            ""] + commands + [""]


# ----------------------------------------------------------------------------- the page

INTRO = """# Benchmarks: what was measured

Generated by `python benchmarks/report.py` from the files in `benchmarks/results/`; do not edit by
hand (`python benchmarks/report.py --check` fails when this page and the results disagree). Each
section says what a file measures, the command that wrote it, its figures, and the device, threads
and library versions it recorded. Where a file did not record one, this page says "not recorded".

How to read the figures. The machines are shared and noisy, so every figure is a median, and every
comparison divides two figures taken in the same run; rerun the command for your own machine.
"s/step" is the median seconds of a training step (forward, backward, AdamW); "vs full" divides
medians; "paired vs full" is the median over rounds of each round's ratio to that round's full
fine-tune, with a 90% bootstrap interval over rounds. Sessions have landed on two AMD EPYC models,
one with AVX-512 (AVX512-BF16 included) and one with AVX2 only; the files record neither, so where
the README of the time named the machine, the CPU line quotes it. Ratios travel between the two
better than times do. The inference-precision files (issue 22 on) record the CPU model and its
AVX2, AVX-512, VNNI, BF16 and AMX flags, and are grouped by CPU family.
"""


def render() -> str:
    known = set(FILES) | {"federated.json", "dora.md", "compress.md", "layers.md", "layer_kinds.md", "serve.md", "serve_1thread.md"} | {p.name for p in precision_files()}
    unknown = sorted(p.name for p in RESULTS.iterdir() if p.suffix in (".csv", ".json") and p.name not in known)
    if unknown:
        raise SystemExit(f"report.py does not know {unknown}: add each to FILES with what it measures and "
                         "the command that wrote it.")
    out = [INTRO, "## Current code", ""]
    builders = {"layers.csv": layers_section, "layer_kinds.csv": layer_kinds_section, "dora.csv": dora_section, "federated.csv": federated_section,
                "dropout.csv": dropout_section,
                "serve.csv": serve_section,
                "serve_1thread.csv": serve_section, "serve_mixed.csv": serve_mixed_section,
                "serve_latency.csv": serve_latency_section, "compress.json": compress_section,
                "gpu_check_h200.json": gpu_section, "serve_gpu_h200.json": gpu_section,
                "gpu_layer_kinds_h200.json": gpu_section}
    for name, meta in FILES.items():
        if meta["group"] != "current":
            continue
        out += builders.get(name, train_section)(name, meta)
        if name == "train_attn0_lora_12rounds.csv":
            out += pooled_section()
        if name == "compress.json":
            out += precision_section()
    out += ["## Measured on older code, not rerun since", "",
            ("These runs predate the padding-free encoder, and all but the first the CLS-only last layer too "
            "(each section's \"Training forward\" line says which). Both shorten every method's step, so "
            "these times are higher than the current code's. Each run is still the only measurement of its "
            "setting."), ""]
    out += train_section("train_attn0_cls_only.csv", FILES["train_attn0_cls_only.csv"])
    for name in ["train_bf16_attn0.csv", "train_attn0_fp32_for_bf16.csv"]:
        out += train_section(name, FILES[name])
    out += ["### bf16 against fp32, same machine", "",
            "Per method: the fp32 reference run's median step and peak memory against the bf16 run's.", "",
            compare_runs("train_attn0_fp32_for_bf16.csv", "train_bf16_attn0.csv", "fp32", "bf16"), ""]
    out += train_section("train.csv", FILES["train.csv"])
    for name in ["train_attn0_whole_last_layer.csv", "train_attn0_fast_dropout.csv"]:
        out += train_section(name, FILES[name])
    out += ["### FastDropout against torch's dropout, same machine", "",
            "Per method: the torch-dropout run's median step and peak memory against the FastDropout run's.", "",
            compare_runs("train_attn0_whole_last_layer.csv", "train_attn0_fast_dropout.csv", "torch", "Fast"), ""]
    out += ["## Older runs", "",
            "Superseded by the runs above; kept because their files are cited in the history.", ""]
    out += superseded_section()
    out[1:1] = contents(out) + [""]
    return "\n".join(out).rstrip() + "\n"


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def contents(lines: list[str]) -> list[str]:
    out = ["Contents:", ""]
    for line in lines:
        for marks, indent in (("## ", ""), ("### ", "  ")):
            if line.startswith(marks):
                title = line[len(marks):]
                out.append(f"{indent}- [{title}](#{slug(title)})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if benchmarks/README.md differs from what the results give")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        old = a.out.read_text() if a.out.exists() else ""
        if old == text:
            print(f"{a.out} is up to date")
            return 0
        diff = difflib.unified_diff(old.splitlines(), text.splitlines(), "on disk", "from the results",
                                    lineterm="", n=1)
        print(f"{a.out} is out of date with benchmarks/results/; run `python benchmarks/report.py`:", file=sys.stderr)
        print("\n".join(list(diff)[:40]), file=sys.stderr)
        return 1
    a.out.write_text(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
