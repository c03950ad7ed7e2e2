"""DoRA against LoRA, peftkit's against Hugging Face PEFT's (`use_dora=True`), one layer, one run.

`python benchmarks/bench_layers.py --dora` runs this (or `python benchmarks/bench_dora.py`). Per
shape, five layers on copies of one `nn.Linear` at r=8, alpha=16, every one timed interleaved in
the same process (bench_layers.run_interleaved: a shuffled order each repeat): the frozen Linear
(the baseline), peftkit's LoRALinear and DoRALinear, PEFT's LoRA and DoRA layers. Modes:
``train`` (forward plus backward, dropout 0, the input requiring grad) and ``inference``
(unmerged forward under ``no_grad``). Each cell is a median over the repeats; the ratios divide
medians from the same run. Writes ``benchmarks/results/dora.csv`` and ``dora.md``.

The question it answers (issue 20): what DoRA's step costs over LoRA's. PEFT's users report about
2x; peftkit's DoRA folds the update into one GEMM as its LoRA does (layers/dora.py).
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_layers import (  # noqa: E402
    ALPHA, INFER, R, TRAIN, _cpu_ticks, _infer_step, _One, _randomise_lora, _train_step, cpu_model, other_load,
    parse_shapes, run_interleaved,
)

DEFAULT_OUT = HERE / "results" / "dora.csv"
DEFAULT_SHAPES = "384x384,384x1536,1024x1024"
QUICK_SHAPES = "64x64"
IMPLS = ["frozen_linear", "peftkit_lora", "peftkit_dora", "peft_lora", "peft_dora"]
FIELDS = ["shape", "tokens", "rank", "mode", "impl", "baseline", "median_ms", "ratio_vs_baseline", "repeats",
          "threads", "torch", "peft", "cpu", "other_load"]


def make_layers(base: nn.Linear) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model

    from peftkit.layers.dora import DoRALinear
    from peftkit.layers.lora import LoRALinear

    frozen = copy.deepcopy(base).requires_grad_(False)
    ours_lora = LoRALinear(copy.deepcopy(base), r=R, alpha=ALPHA)
    ours_dora = DoRALinear(copy.deepcopy(base), r=R, alpha=ALPHA)
    _randomise_lora(ours_lora.lora_B, ours_dora.lora_B)
    layers = {"frozen_linear": frozen, "peftkit_lora": ours_lora, "peftkit_dora": ours_dora}
    for name, dora in (("peft_lora", False), ("peft_dora", True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], use_dora=dora)
            layer = get_peft_model(_One(copy.deepcopy(base)), cfg).base_model.model.lin
        _randomise_lora(layer.lora_B["default"].weight)
        layers[name] = layer
    return layers


def bench_shape(n_in: int, n_out: int, tokens: int, repeats: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    layers = make_layers(nn.Linear(n_in, n_out))
    x = torch.randn(tokens, n_in, requires_grad=True)
    gy = torch.randn(tokens, n_out)
    rows = []
    for mode in (TRAIN, INFER):
        for m in layers.values():
            m.train(mode == TRAIN)
        make = (lambda m: _train_step(m, x, gy)) if mode == TRAIN else (lambda m: _infer_step(m, x.detach()))
        med = run_interleaved({k: make(m) for k, m in layers.items()}, repeats, warmup)
        rows += [dict(shape=f"{n_in}x{n_out}", tokens=tokens, rank=R, mode=mode, impl=k, baseline="frozen_linear",
                      median_ms=v * 1e3, ratio_vs_baseline=v / med["frozen_linear"]) for k, v in med.items()]
    return rows


def report(rows: list[dict], env: dict) -> str:
    by = {(r["shape"], r["mode"], r["impl"]): r for r in rows}
    out = [f"torch {env['torch']}, peft {env['peft']}, {env['threads']} threads, {env['cpu']}, {env['tokens']} tokens, "
           f"r={R}, alpha={ALPHA}, median of {env['repeats']} repeats; ratio to the frozen nn.Linear", "",
           "| shape | mode | frozen (ms) | peftkit LoRA | peftkit DoRA | PEFT LoRA | PEFT DoRA | DoRA / LoRA, peftkit | "
           "DoRA / LoRA, PEFT | peftkit DoRA / PEFT DoRA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, mode in dict.fromkeys((r["shape"], r["mode"]) for r in rows):
        g = {i: by[(shape, mode, i)] for i in IMPLS}
        ms = {i: g[i]["median_ms"] for i in IMPLS}
        out.append(f"| {shape} | {mode} | {ms['frozen_linear']:.4g} | " + " | ".join(
            f"{g[i]['ratio_vs_baseline']:.2f}" for i in IMPLS[1:])
            + f" | {ms['peftkit_dora'] / ms['peftkit_lora']:.2f} | {ms['peft_dora'] / ms['peft_lora']:.2f} | "
            f"{ms['peftkit_dora'] / ms['peft_dora']:.2f} |")
    busy = {r["shape"]: r["other_load"] for r in rows if r.get("other_load", 0) > 0.10}
    if busy:
        out += ["", "WARNING: other processes used " + ", ".join(f"{v:.0%} at {k}" for k, v in busy.items())
                + " of the CPUs while this ran: rerun on a quiet machine before trusting those ratios."]
    return "\n".join(out) + "\n"


def write(rows: list[dict], env: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "median_ms": f"{r['median_ms']:.4f}", "ratio_vs_baseline": f"{r['ratio_vs_baseline']:.4f}",
                        "other_load": f"{r['other_load']:.3f}", "repeats": env["repeats"], "threads": env["threads"],
                        "torch": env["torch"], "peft": env["peft"], "cpu": env["cpu"]})
    out.with_suffix(".md").write_text(report(rows, env))


def main(argv=None) -> int:
    import peft

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=parse_shapes, default=None)
    p.add_argument("--repeats", type=int, default=None, help="default 30; --quick: 3")
    p.add_argument("--warmup", type=int, default=None, help="default 3; --quick: 1")
    p.add_argument("--tokens", type=int, default=None, help="default 2048; --quick: 64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    shapes = a.shapes or parse_shapes(QUICK_SHAPES if a.quick else DEFAULT_SHAPES)
    repeats = a.repeats or (3 if a.quick else 30)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    tokens = a.tokens or (64 if a.quick else 2048)
    torch.set_num_threads(a.threads)
    env = dict(torch=torch.__version__, peft=peft.__version__, threads=torch.get_num_threads(), cpu=cpu_model(),
               tokens=tokens, repeats=repeats)
    rows = []
    for n_in, n_out in shapes:
        t0 = _cpu_ticks()
        new = bench_shape(n_in, n_out, tokens, repeats, warmup)
        load = other_load(t0, _cpu_ticks())
        rows += [{**r, "other_load": load} for r in new]
        write(rows, env, a.out)  # after every shape: a stopped run keeps what it measured
        print(f"  done {n_in}x{n_out}", file=sys.stderr, flush=True)
    print(report(rows, env))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
