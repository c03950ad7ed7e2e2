"""Time peftkit's FastDropout against torch's nn.Dropout: forward plus backward, p = 0.1.

The two are timed interleaved in one process, in a freshly shuffled order each repeat (seeded),
on the activation shapes of MiniLM at batch 32: (tokens, 384) after attention and the feed-forward
block, (tokens, 1536) inside it. Each number is a median over the repeats; each ratio divides two
medians from the same run.

    python benchmarks/bench_dropout.py               # 2 threads, 100 repeats
    python benchmarks/bench_dropout.py --quick       # a smoke run

Writes benchmarks/results/dropout.csv (--out) and prints the table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(shapes, repeats: int, p: float = 0.1, seed: int = 0) -> list[dict]:
    from peftkit.layers.dropout import FastDropout
    rng = random.Random(seed)
    rows = []
    for shape in shapes:
        x = torch.randn(*shape, requires_grad=True)
        g = torch.randn(*shape)
        impls = {"torch nn.Dropout": nn.Dropout(p).train(), "peftkit FastDropout": FastDropout(p).train()}
        times = {name: [] for name in impls}
        for i in range(repeats + 3):
            order = list(impls)
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                impls[name](x).backward(g)
                if i >= 3:
                    times[name].append(time.perf_counter() - t0)
                x.grad = None
        base = statistics.median(times["torch nn.Dropout"])
        for name, t in times.items():
            med = statistics.median(t)
            rows.append({"shape": "x".join(map(str, shape)), "implementation": name, "ms": 1000 * med,
                         "vs_torch": med / base, "repeats": repeats, "threads": torch.get_num_threads(),
                         "torch": torch.__version__})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="rows of each activation (default 2,048: batch 32 x 64)")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small shapes, 5 repeats, output to the temp folder")
    ap.add_argument("--out", default=None, help="CSV to write (default benchmarks/results/dropout.csv)")
    a = ap.parse_args(argv)
    if a.tokens < 1 or a.repeats < 1 or a.threads < 1:
        ap.error("--tokens, --repeats and --threads must be positive")
    import pandas as pd
    torch.set_num_threads(a.threads)
    tokens = 64 if a.quick else a.tokens
    shapes = [(tokens, 384), (tokens, 1536)]
    rows = measure(shapes, 5 if a.quick else a.repeats)
    if a.out is None:
        import tempfile
        a.out = str((Path(tempfile.gettempdir()) if a.quick else ROOT / "benchmarks" / "results") / "dropout.csv")
    df = pd.DataFrame(rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    table = df.pivot(index="shape", columns="implementation", values="ms")
    table["FastDropout vs torch"] = table["peftkit FastDropout"] / table["torch nn.Dropout"]
    print(f"dropout p=0.1, forward + backward, ms (median of {rows[0]['repeats']}, {a.threads} threads):\n")
    print(table.round(3).to_markdown())
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
