"""Time one LoRA layer against a plain nn.Linear and against other LoRA implementations.

Everything runs interleaved in one process: every repeat times each implementation once, in a
freshly shuffled order (seeded), so slow drift in the machine (other jobs, frequency changes)
and "who runs right after whom" cache effects land on every implementation alike. Each
implementation owns its weights, as layers in a real model do, so none finds its weights warm
because a neighbour just used them. Each number is a median over the repeats; each ratio
divides two medians taken in the same run.

Modes (all at r=8, alpha=16, `--tokens` tokens, default 2,048):

* ``train``: forward plus backward, dropout 0. The input requires grad and ``y.backward(gy)``
  gets a fixed random upstream gradient. Baseline: a frozen ``nn.Linear`` (weight and bias
  ``requires_grad=False``). Also timed: a trainable ``nn.Linear``, peftkit's ``LoRALinear``,
  Hugging Face PEFT's ``peft.tuners.lora.Linear`` and ``loralib.Linear``.
* ``train_dropout0.1``: the same, with LoRA dropout 0.1, for peftkit and PEFT (loralib is
  left out: its dropout is the same two-path formula PEFT uses). Ratios are against the frozen
  linear timed in the same run.
* ``inference``: forward under ``torch.no_grad()`` in eval mode. Baseline: the plain linear.
  peftkit unmerged and merged, PEFT unmerged, loralib unmerged (``merge_weights=False``).

* ``--kinds``: the other layer kinds LoRA adapts, each against PEFT's LoRA layer for it, in the
  same interleaved run: GPT-2's ``Conv1D`` (``conv1d_gpt2``), ``nn.Conv2d`` (``conv2d``),
  ``nn.Embedding`` (``embedding``) and ``nn.MultiheadAttention`` (``mha``). ``train`` is forward
  plus backward (the input requires grad, except an embedding's token ids), ``inference`` the
  unmerged forward under ``no_grad``; the baseline is the frozen base layer. Writes
  ``layer_kinds.csv`` and ``layer_kinds.md`` beside ``--out``.

* ``--dora``: DoRA against LoRA, peftkit's against PEFT's ``use_dora=True``, training and unmerged
  inference in the same interleaved run (bench_dora.py; writes ``dora.csv`` and ``dora.md``).

Usage::

    python benchmarks/bench_layers.py                      # all shapes, 50 repeats
    python benchmarks/bench_layers.py --kinds all          # the other layer kinds instead
    python benchmarks/bench_layers.py --shapes 384x384,1024x1024 --repeats 100
    python benchmarks/bench_layers.py --quick              # a few seconds, small shapes

Writes ``benchmarks/results/layers.csv`` (``--out``), one row per shape x mode x implementation,
and a markdown copy of the printed tables next to it (``layers.md``); both are rewritten after
every shape. The ``other_load`` column is the share of the machine's CPU time that other
processes took while that shape ran (from /proc/stat): on a shared machine ratios measured
above ~10% are not to be trusted, and the report says so.
"""

from __future__ import annotations

import argparse
import copy
import csv
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "layers.csv"
DEFAULT_SHAPES = "384x384,384x1536,1536x384,1024x1024,4096x4096"
QUICK_SHAPES = "64x64,64x192"
R, ALPHA = 8, 16

TRAIN = "train"
TRAIN_DROPOUT = "train_dropout0.1"
INFER = "inference"
# Column order of the printed tables, per mode; the first entry is that mode's baseline.
TRAIN_IMPLS = ["frozen_linear", "trainable_linear", "peftkit", "peft", "loralib"]
DROPOUT_IMPLS = ["peftkit", "peft"]
INFER_IMPLS = ["linear", "peftkit_unmerged", "peftkit_merged", "peft_unmerged", "loralib_unmerged"]
CSV_FIELDS = ["shape", "tokens", "rank", "mode", "impl", "baseline", "median_ms",
              "ratio_vs_baseline", "repeats", "threads", "torch", "cpu", "other_load"]
BUSY_WARN = 0.10  # other processes' share of the CPUs above which the report warns


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, falling back to platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_ticks():
    """(busy ticks of the whole machine, ticks of this process, all ticks), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        idle = v[3] + v[4]  # idle + iowait
        return sum(v[:8]) - idle, int(own[11]) + int(own[12]), sum(v[:8])
    except (OSError, IndexError, ValueError):
        return None


def other_load(t0, t1):
    """Share of the machine's CPU time that other processes used between two _cpu_ticks()."""
    if t0 is None or t1 is None or t1[2] <= t0[2]:
        return float("nan")
    others = (t1[0] - t0[0]) - (t1[1] - t0[1])
    return max(0.0, others / (t1[2] - t0[2]))


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'384x384,384x1536' -> [(384, 384), (384, 1536)] as (in_features, out_features)."""
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            n_in, n_out = (int(v) for v in part.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {part!r} is not IN x OUT, e.g. 384x1536") from None
        if n_in <= 0 or n_out <= 0:
            raise argparse.ArgumentTypeError(f"shape {part!r} needs positive sizes")
        shapes.append((n_in, n_out))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


# ----------------------------------------------------------------------------- layers


class _One(nn.Module):
    """The smallest model PEFT can wrap: one Linear named `lin`."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _frozen(lin: nn.Linear) -> nn.Linear:
    lin = copy.deepcopy(lin)
    lin.requires_grad_(False)
    return lin


def _randomise_lora(*params: torch.Tensor) -> None:
    # Every implementation starts B at zero; a non-zero update keeps the timed arithmetic honest
    # (no chance of a zero shortcut) and the layers comparable.
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.02)


def make_peftkit(base: nn.Linear, dropout: float = 0.0):
    from peftkit.layers.lora import LoRALinear

    layer = LoRALinear(copy.deepcopy(base), r=R, alpha=ALPHA, dropout=dropout)
    _randomise_lora(layer.lora_B)
    return layer


def make_peft(base: nn.Linear, dropout: float = 0.0):
    """A `peft.tuners.lora.Linear`, built the ordinary way through `get_peft_model`."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["lin"])
    model = get_peft_model(_One(copy.deepcopy(base)), cfg)
    layer = model.base_model.model.lin
    _randomise_lora(layer.lora_B["default"].weight)
    return layer


def make_loralib(base: nn.Linear, merge_weights: bool = True):
    import loralib

    layer = loralib.Linear(base.in_features, base.out_features, r=R, lora_alpha=ALPHA,
                           merge_weights=merge_weights)
    with torch.no_grad():
        layer.weight.copy_(base.weight)
        layer.bias.copy_(base.bias)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    _randomise_lora(layer.lora_B)
    return layer


# ----------------------------------------------------------------------------- timing


def _train_step(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> float:
        t0 = time.perf_counter()
        layer(x).backward(gy)
        t1 = time.perf_counter()
        x.grad = None
        for p in params:
            p.grad = None
        return t1 - t0

    return step


def _infer_step(layer: nn.Module, x: torch.Tensor):
    def step() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            layer(x)
            return time.perf_counter() - t0

    return step


def run_interleaved(steps: dict, repeats: int, warmup: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per step. Each repeat runs every step once, in a shuffled order.

    A fixed rotation would keep each step's predecessor the same in every repeat, and the step
    that always follows the biggest cache-evicter would pay for it every time."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    rng = random.Random(seed)
    times = {name: [] for name in names}
    for _ in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            times[name].append(steps[name]())
    return {name: statistics.median(v) for name, v in times.items()}


def bench_shape(n_in: int, n_out: int, tokens: int, repeats: int, warmup: int,
                modes: set[str]) -> list[dict]:
    """Rows (shape, mode, impl, median_ms, baseline, ratio) for one layer shape."""
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out)
    shape = f"{n_in}x{n_out}"
    rows = []

    def add_rows(mode, medians, baseline):
        for impl, sec in medians.items():
            rows.append(dict(shape=shape, mode=mode, impl=impl, baseline=baseline,
                             median_ms=sec * 1e3, ratio_vs_baseline=sec / medians[baseline]))

    if TRAIN in modes or TRAIN_DROPOUT in modes:
        x = torch.randn(tokens, n_in, requires_grad=True)
        gy = torch.randn(tokens, n_out)
        layers = {"frozen_linear": _frozen(base)}
        if TRAIN in modes:
            layers["trainable_linear"] = copy.deepcopy(base).requires_grad_(True)
            layers["peftkit"] = make_peftkit(base)
            layers["peft"] = make_peft(base)
            layers["loralib"] = make_loralib(base)
        if TRAIN_DROPOUT in modes:
            layers["peftkit_dropout"] = make_peftkit(base, dropout=0.1)
            layers["peft_dropout"] = make_peft(base, dropout=0.1)
        for layer in layers.values():
            layer.train()
        med = run_interleaved({k: _train_step(m, x, gy) for k, m in layers.items()}, repeats, warmup)
        if TRAIN in modes:
            add_rows(TRAIN, {k: v for k, v in med.items() if not k.endswith("_dropout")}, "frozen_linear")
        if TRAIN_DROPOUT in modes:
            drop = {"frozen_linear": med["frozen_linear"]}
            drop.update({k[: -len("_dropout")]: v for k, v in med.items() if k.endswith("_dropout")})
            add_rows(TRAIN_DROPOUT, drop, "frozen_linear")
        del layers, x, gy

    if INFER in modes:
        x = torch.randn(tokens, n_in)
        merged = make_peftkit(base)
        merged.merge()
        layers = {
            "linear": _frozen(base),
            "peftkit_unmerged": make_peftkit(base),
            "peftkit_merged": merged,
            "peft_unmerged": make_peft(base),
            "loralib_unmerged": make_loralib(base, merge_weights=False),
        }
        for layer in layers.values():
            layer.eval()
        med = run_interleaved({k: _infer_step(m, x) for k, m in layers.items()}, repeats, warmup)
        add_rows(INFER, med, "linear")
    return rows


# ----------------------------------------------------------------------------- other layer kinds

# name -> (shapes, quick shapes); a shape is a tuple the kind's builder reads.
KINDS = {
    # GPT-2 small's c_attn and c_proj: (in, out), over --tokens tokens
    "conv1d_gpt2": ([(768, 2304), (768, 768)], [(64, 192)]),
    # (in channels, out channels, kernel, image side, batch)
    "conv2d": ([(64, 64, 3, 32, 8), (256, 256, 3, 14, 8), (3, 64, 7, 64, 4)], [(8, 8, 3, 8, 2)]),
    # (vocabulary, width), over --tokens token ids
    "embedding": ([(30522, 384), (50257, 768)], [(1000, 64)]),
    # (width, heads, sequence, batch)
    "mha": ([(384, 6, 128, 16), (768, 12, 128, 8)], [(32, 2, 16, 2)]),
}
KIND_IMPLS = ["frozen", "peftkit", "peft"]


def _kind_layers(kind: str, shape: tuple, tokens: int):
    """(base layer, a function that calls a layer on the input, the input, its upstream gradient)."""
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(0)
    if kind == "conv1d_gpt2":
        n_in, n_out = shape
        base = Conv1D(n_out, n_in)
        nn.init.normal_(base.weight, std=0.02)
        x = torch.randn(tokens, n_in, generator=g)
        return base, lambda layer, x: layer(x), x, torch.randn(tokens, n_out, generator=g)
    if kind == "conv2d":
        c_in, c_out, k, side, batch = shape
        base = nn.Conv2d(c_in, c_out, k, padding=k // 2)
        x = torch.randn(batch, c_in, side, side, generator=g)
        return base, lambda layer, x: layer(x), x, torch.randn(batch, c_out, side, side, generator=g)
    if kind == "embedding":
        num, dim = shape
        base = nn.Embedding(num, dim)
        ids = torch.randint(0, num, (tokens,), generator=g)
        return base, lambda layer, x: layer(x), ids, torch.randn(tokens, dim, generator=g)
    if kind == "mha":
        e, heads, seq, batch = shape
        base = nn.MultiheadAttention(e, heads, batch_first=True)
        x = torch.randn(batch, seq, e, generator=g)
        return base, lambda layer, x: layer(x, x, x, need_weights=False)[0], x, torch.randn(batch, seq, e, generator=g)
    raise ValueError(f"unknown layer kind {kind!r}; choose from {sorted(KINDS)}")


def make_peftkit_kind(base: nn.Module):
    from peftkit.core.kinds import lora_layer

    layer = lora_layer(copy.deepcopy(base), R, ALPHA, 0.0, False)
    _randomise_lora(*[p for n, p in layer.named_parameters() if "lora_" in n and ("B" in n.rsplit("_", 1)[-1])])
    return layer


def make_peft_kind(base: nn.Module):
    import warnings

    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT announces that it sets fan_in_fan_out for Conv1D
        cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], fan_in_fan_out=type(base).__name__ == "Conv1D")
        layer = get_peft_model(_One(copy.deepcopy(base)), cfg).base_model.model.lin
    for n, p in layer.named_parameters():
        if "lora_B" in n or "lora_embedding_B" in n:
            _randomise_lora(p)
    return layer


def bench_kind(kind: str, shape: tuple, tokens: int, repeats: int, warmup: int, modes: set[str]) -> list[dict]:
    """Rows for one layer kind at one shape: frozen base, peftkit and PEFT, per mode."""
    torch.manual_seed(0)
    base, call, x, gy = _kind_layers(kind, shape, tokens)
    layers = {"frozen": copy.deepcopy(base).requires_grad_(False), "peftkit": make_peftkit_kind(base),
              "peft": make_peft_kind(base)}
    label = "x".join(str(v) for v in shape)
    rows = []

    def add(mode, medians):
        for impl, sec in medians.items():
            rows.append(dict(kind=kind, shape=label, mode=mode, impl=impl, baseline="frozen",
                             median_ms=sec * 1e3, ratio_vs_baseline=sec / medians["frozen"]))

    if TRAIN in modes:
        if x.is_floating_point():
            x.requires_grad_(True)

        def step_of(layer):
            params = [p for p in layer.parameters() if p.requires_grad]

            def step():
                t0 = time.perf_counter()
                y = call(layer, x)
                if y.requires_grad:  # the frozen embedding has nothing to differentiate
                    y.backward(gy)
                t1 = time.perf_counter()
                x.grad = None
                for p in params:
                    p.grad = None
                return t1 - t0
            return step

        for layer in layers.values():
            layer.train()
        add(TRAIN, run_interleaved({k: step_of(m) for k, m in layers.items()}, repeats, warmup))
        x = x.detach()
    if INFER in modes:
        def infer_of(layer):
            def step():
                with torch.no_grad():
                    t0 = time.perf_counter()
                    call(layer, x)
                    return time.perf_counter() - t0
            return step

        for layer in layers.values():
            layer.eval()
        add(INFER, run_interleaved({k: infer_of(m) for k, m in layers.items()}, repeats, warmup))
    return rows


def kinds_report(rows: list[dict], env: dict) -> str:
    out = [f"torch {env['torch']}, {env['threads']} threads, {env['cpu']}, {env['tokens']} tokens where a "
           f"shape has no batch of its own, r={R}, alpha={ALPHA}, median of {env['repeats']} repeats; ratio "
           "to the frozen base layer", "",
           "| kind | shape | mode | frozen (ms) | peftkit | PEFT | peftkit / PEFT |", "|---|---|---|---|---|---|---|"]
    by = {(r["kind"], r["shape"], r["mode"], r["impl"]): r for r in rows}
    for kind, shape, mode in dict.fromkeys((r["kind"], r["shape"], r["mode"]) for r in rows):
        f, ours, theirs = (by[(kind, shape, mode, i)] for i in KIND_IMPLS)
        out.append(f"| {kind} | {shape} | {mode} | {f['median_ms']:.4g} | {ours['ratio_vs_baseline']:.3f} | "
                   f"{theirs['ratio_vs_baseline']:.3f} | {ours['median_ms'] / theirs['median_ms']:.3f} |")
    loaded = {f"{r['kind']} {r['shape']}": r["other_load"] for r in rows if r.get("other_load", 0) > BUSY_WARN}
    if loaded:
        out += ["", "WARNING: other processes used " + ", ".join(f"{v:.0%} at {k}" for k, v in loaded.items())
                + " of the CPUs while this ran: rerun on a quiet machine before trusting those ratios."]
    return "\n".join(out) + "\n"


def run_kinds(kinds: list[str], quick: bool, tokens: int, repeats: int, warmup: int, modes: set[str],
              out: Path, env: dict) -> str:
    import peft

    fields = ["kind", "shape", "mode", "impl", "baseline", "median_ms", "ratio_vs_baseline", "repeats",
              "threads", "torch", "peft", "cpu", "other_load"]
    rows = []
    for kind in kinds:
        shapes, quick_shapes = KINDS[kind]
        for shape in quick_shapes if quick else shapes:
            t0 = _cpu_ticks()
            new = bench_kind(kind, shape, tokens, repeats, warmup, modes)
            load = other_load(t0, _cpu_ticks())
            rows += [{**r, "other_load": load} for r in new]
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                for r in rows:
                    w.writerow({**r, "median_ms": f"{r['median_ms']:.4f}", "ratio_vs_baseline": f"{r['ratio_vs_baseline']:.4f}",
                                "other_load": f"{r['other_load']:.3f}", "repeats": repeats, "threads": env["threads"],
                                "torch": env["torch"], "peft": peft.__version__, "cpu": env["cpu"]})
            out.with_suffix(".md").write_text(kinds_report(rows, env))
            print(f"  done {kind} {shape}", file=sys.stderr, flush=True)
    return kinds_report(rows, env)


# ----------------------------------------------------------------------------- output


def markdown_table(rows: list[dict], mode: str, impls: list[str], extra=None) -> str:
    """Rows = shapes, columns = implementations, cells = ratio to the mode's baseline."""
    extra = extra or []  # (mode, impl, column title) from another mode, same baseline
    by = {(r["shape"], r["mode"], r["impl"]): r for r in rows}
    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["mode"] == mode))
    if not shapes:
        return ""
    baseline = impls[0]
    cols = [(mode, i, i) for i in impls[1:]] + list(extra)
    head = ["shape", f"{baseline} (ms)"] + [title for _, _, title in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape in shapes:
        cells = [shape, f"{by[(shape, mode, baseline)]['median_ms']:.4g}"]
        for m, impl, _ in cols:
            r = by.get((shape, m, impl))
            cells.append(f"{r['ratio_vs_baseline']:.3f}" if r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: list[dict], env: dict) -> str:
    out = [f"torch {env['torch']}, {env['threads']} threads, {env['cpu']}, "
           f"{env['tokens']} tokens, r={R}, alpha={ALPHA}, median of {env['repeats']} repeats",
           ""]
    train = markdown_table(rows, TRAIN, TRAIN_IMPLS,
                           extra=[(TRAIN_DROPOUT, i, f"{i} dropout0.1") for i in DROPOUT_IMPLS])
    if not train:  # only the dropout mode was asked for
        train = markdown_table(rows, TRAIN_DROPOUT, ["frozen_linear"] + DROPOUT_IMPLS)
    if train:
        out += ["Training, forward + backward, ratio to a frozen nn.Linear:", "", train, ""]
    infer = markdown_table(rows, INFER, INFER_IMPLS)
    if infer:
        out += ["Inference (no_grad), ratio to the plain nn.Linear:", "", infer, ""]
    busy = {r["shape"]: r.get("other_load", float("nan")) for r in rows}
    loaded = {k: v for k, v in busy.items() if v > BUSY_WARN}
    if loaded:
        out += ["WARNING: other processes used " + ", ".join(f"{v:.0%} at {k}" for k, v in loaded.items())
                + " of the CPUs while this ran. With threads competing for cores, every extra"
                " parallel op waits for a descheduled thread, so multi-op layers look much slower"
                " than they are: rerun on a quiet machine before trusting those ratios.", ""]
    return "\n".join(out)


def write_csv(rows: list[dict], env: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "median_ms": f"{r['median_ms']:.4f}",
                        "other_load": f"{r.get('other_load', float('nan')):.3f}",
                        "ratio_vs_baseline": f"{r['ratio_vs_baseline']:.4f}",
                        "tokens": env["tokens"], "rank": R, "repeats": env["repeats"],
                        "threads": env["threads"], "torch": env["torch"], "cpu": env["cpu"]})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help=f"comma-separated INxOUT (default {DEFAULT_SHAPES}; --quick: {QUICK_SHAPES})")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation (default 50; --quick: 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3; --quick: 1)")
    p.add_argument("--tokens", type=int, default=None, help="rows of the input (default 2048; --quick: 128)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--modes", default=f"{TRAIN},{TRAIN_DROPOUT},{INFER}",
                   help="comma-separated subset of: train, train_dropout0.1, inference")
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes, few repeats (seconds)")
    p.add_argument("--kinds", default=None,
                   help=f"time these other layer kinds against PEFT instead of Linear: 'all' or a comma-separated "
                        f"subset of {','.join(KINDS)} (modes train and inference)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"CSV path (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--dora", action="store_true", help="DoRA against LoRA and PEFT's DoRA instead (bench_dora.py)")
    return p


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--dora" in argv:  # DoRA's own run: bench_dora.py, which takes the same shape/repeat options
        import bench_dora
        return bench_dora.main([a for a in argv if a != "--dora"])
    args = build_parser().parse_args(argv)
    quick = args.quick
    shapes = args.shapes or parse_shapes(QUICK_SHAPES if quick else DEFAULT_SHAPES)
    repeats = args.repeats if args.repeats is not None else (5 if quick else 50)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    tokens = args.tokens if args.tokens is not None else (128 if quick else 2048)
    modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    kinds = list(KINDS) if args.kinds == "all" else [k.strip() for k in (args.kinds or "").split(",") if k.strip()]
    if set(kinds) - set(KINDS):
        build_parser().error(f"unknown layer kinds {sorted(set(kinds) - set(KINDS))}; choose from {list(KINDS)} or all")
    unknown = modes - {TRAIN, TRAIN_DROPOUT, INFER}
    if unknown or repeats < 1 or tokens < 1 or args.threads < 1:
        build_parser().error(f"bad arguments: modes {sorted(unknown) or 'ok'}, repeats={repeats}, "
                             f"tokens={tokens}, threads={args.threads}")

    if str(ROOT) not in sys.path:  # so `python benchmarks/bench_layers.py` finds peftkit
        sys.path.insert(0, str(ROOT))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        env = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu_model(),
                   tokens=tokens, repeats=repeats)
        if kinds:
            out = args.out.with_name("layer_kinds.csv") if args.out == DEFAULT_OUT else args.out
            print(run_kinds(kinds, quick, tokens, repeats, warmup, modes - {TRAIN_DROPOUT}, out, env))
            print(f"wrote {out}")
            return 0
        rows = []
        for n_in, n_out in shapes:
            t0 = _cpu_ticks()
            new = bench_shape(n_in, n_out, tokens, repeats, warmup, modes)
            load = other_load(t0, _cpu_ticks())
            for r in new:
                r["other_load"] = load
            rows += new
            # Rewritten after every shape, so a long run that is stopped keeps what it measured.
            write_csv(rows, env, args.out)
            args.out.with_suffix(".md").write_text(report(rows, env))
            print(f"  done {n_in}x{n_out}", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(old_threads)

    text = report(rows, env)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
