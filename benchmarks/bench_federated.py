"""Federated adaptation on MiniLM: the four strategies over the four domain clients, in process.

For each strategy (FedIT, FFA-LoRA and FLoRA with LoRA r=8 on query and value; FedAvg of a full
fine-tune), `simulate_federated` runs `--rounds` rounds of `--local-steps` steps per client on
`--n-train` training snippets per domain, and evaluates the global model on `--n-eval` test
snippets per domain after every round. Writes benchmarks/results/federated.csv (one row per
strategy, round and client) and federated.json (the settings, seconds per strategy and the
environment, CPU named), and prints the per-round table.

    python benchmarks/bench_federated.py                       # 3 rounds x 10 steps, 256 / 200 snippets
    python benchmarks/bench_federated.py --base tiny --rounds 1 --local-steps 2 --n-train 32 --n-eval 32 --out /tmp/f
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from peftkit.runtime import environment
from peftkit.studies.federated import STRATEGIES
from peftkit.studies.federated_sim import per_round, simulate_federated

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default="minilm", help="tiny: a smoke run of the script itself")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frames, seconds = [], {}
    for s in STRATEGIES:
        t0 = time.perf_counter()
        df = simulate_federated(s, rounds=args.rounds, local_steps=args.local_steps, n_train=args.n_train,
                                n_eval=args.n_eval, seed=args.seed, base=args.base, progress=False)
        seconds[s] = round(time.perf_counter() - t0, 1)
        df.attrs = {}
        frames.append(df)
    df = pd.concat(frames)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "federated.csv", index=False)
    env = {**environment("cpu"), "threads": args.threads, "cpu": platform.processor() or platform.machine()}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "federated.json").write_text(json.dumps({"settings": settings, "seconds": seconds, "env": env}, indent=2))
    print(per_round(df).to_string(index=False))
    print(json.dumps(seconds))


if __name__ == "__main__":
    main()
