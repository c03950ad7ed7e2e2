"""A small training run used by the resume and data-parallel tests (run as a subprocess).

usage: train_script.py OUT_WEIGHTS CHECKPOINT_DIR [--resume] [--delay S] [--dropout P] [--no-dropout]
"""

import argparse
import time

import torch
from safetensors.torch import save_file

import peftkit as pk
from peftkit import data
from peftkit.data.loaders import make_loaders
from peftkit.training.loop import TrainConfig, fit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("ckpt")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--no-dropout", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    df = data.load_corpus("movies").sample(160, random_state=0)
    splits = data.split(df, seed=0)
    model, tok = pk.load_base("tiny", seed=0)
    if a.no_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    pk.apply(model, pk.Hybrid(lora=pk.LoRA(r=4, alpha=8, dropout=0.0 if a.no_dropout else 0.1),
                              adapter=pk.Adapter(size=8)))
    loaders = make_loaders(tok, splits, batch_size=a.batch, max_length=64)
    if a.delay:  # slow each batch down so a test can kill the run part-way
        collate = loaders["train"].collate_fn

        def slow(items):
            time.sleep(a.delay)
            return collate(items)
        loaders["train"].collate_fn = slow
    cfg = TrainConfig(epochs=a.epochs, lr=1e-3, batch_size=a.batch, checkpoint_dir=a.ckpt, checkpoint_every=2,
                      progress=False, eval_every=5, grad_accumulation=1)
    hist = fit(model, loaders["train"], loaders["val"], cfg, resume=a.resume)
    rank = int(__import__("os").environ.get("RANK", "0"))
    weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, a.out.replace(".safetensors", f".rank{rank}.safetensors") if "WORLD_SIZE" in __import__("os").environ else a.out)
    print(f"done steps={int(hist.step.iloc[-1])} rows={len(hist)}")


if __name__ == "__main__":
    main()
