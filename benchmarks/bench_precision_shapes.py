"""fp32, bf16 and int8 on a MiniLM-shaped model with random weights: the speed ratios on any machine.

bench_compress.py measures the fine-tuned MiniLM, which needs the model package and the corpus.
This script needs neither: it builds a BertForSequenceClassification of all-MiniLM-L6-v2's shape
(6 layers, hidden 384, 12 heads, feed-forward 1536, vocabulary 30,522) with random weights, and
feeds it one batch with the padding layout of 32 real movie snippets (the lengths are stored
below), so the timings are what MiniLM's would be: a matmul does not look at its numbers.
Every precision is timed interleaved in one process, medians over `--repeats`; thread CPU time
at one thread, else wall time. Accuracy is not measured here (the weights are random).

    python benchmarks/bench_precision_shapes.py                 # 2 threads
    python benchmarks/bench_precision_shapes.py --threads 1

Writes benchmarks/results/precision_shapes_<cpu family>_<threads>thread.csv and prints the table,
headed by the CPU model and its AVX2, AVX-512, VNNI, BF16 and AMX flags.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Token counts of the 32 movie test snippets that notebook 05 and bench_compress time (their
# padded batch is 32 x 48), so the padding is MiniLM's own.
LENGTHS = [22, 9, 38, 20, 35, 11, 48, 30, 27, 28, 27, 41, 38, 30, 25, 24, 32, 33, 15, 36, 7, 32, 16, 23, 22, 28, 26,
           19, 13, 45, 34, 20]


def import_peftkit_parts():
    """peftkit's runtime and compress without the package's front door (which loads the notebook,
    plotting and study layers): enough on a machine that has torch and transformers only."""
    if "peftkit" not in sys.modules:
        pkg = types.ModuleType("peftkit")
        pkg.__path__ = [str(ROOT / "peftkit")]
        sys.modules["peftkit"] = pkg
    from peftkit import runtime
    from peftkit.compress import int8, precision
    return runtime, int8, precision


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    import pandas as pd
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    runtime, I, P = import_peftkit_parts()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    n = max(LENGTHS)
    ids = torch.randint(1000, 30000, (len(LENGTHS), n))
    mask = (torch.arange(n)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    has_bf16, why = P.bf16_support("cpu")
    models = {"fp32": P.build(model, "fp32")}
    if has_bf16:
        models["bf16-autocast"] = P.build(model, "bf16-autocast")
        models["bf16-weights"] = P.build(model, "bf16-weights")
    q = P.build(model, "int8")

    class Pinned(torch.nn.Module):
        def __init__(self, m, kernel):
            super().__init__()
            self.m, self.kernel = m, kernel

        def forward(self, **kw):
            with I.using_int8_kernel(self.kernel):
                return self.m(**kw)
    if torch.__dict__.get("_int_mm") is not None:
        models["int8 v1"] = Pinned(q, "int_mm_v1")
    models["int8"] = q
    load = [os.getloadavg()[0]]
    ms = P.time_models(models, [batch], repeats=a.repeats)
    load.append(os.getloadavg()[0])
    family = runtime.cpu_family()
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    df = pd.DataFrame([{"precision": k, "ms_per_batch": v, "speedup_vs_fp32": ms["fp32"] / v} for k, v in ms.items()])
    if not has_bf16:
        df = pd.concat([df, pd.DataFrame([{"precision": "bf16", "note": f"skipped: {why}"}])], ignore_index=True)
    df = df.assign(cpu=runtime.cpu_name(), cpu_family=family, cpu_flags=runtime.cpu_summary(), threads=a.threads,
                   torch=torch.__version__, clock=P.clock()[1], repeats=a.repeats, int8_kernel=I.int8_backend(),
                   tokens=int(mask.sum()), padded_tokens=int(mask.numel()), omp_wait_policy=policy or "default",
                   load_avg_max=max(load), cpus=os.cpu_count())
    slug = re.sub(r"[^a-z0-9]+", "-", family.lower()).strip("-")
    out = a.out or ROOT / "benchmarks" / "results" / (f"precision_shapes_{slug}_{a.threads}thread"
                                                       f"{'_' + policy.lower() if policy else ''}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(f"{runtime.cpu_summary()}; {a.threads} threads, torch {torch.__version__}, {P.clock()[1]}, medians of "
          f"{a.repeats}; MiniLM-shaped random model, batch 32 x {n} ({int(mask.sum())} real tokens); load average up "
          f"to {max(load):.1f} on {os.cpu_count()} cores; int8 kernel: {I.int8_backend()}\n")
    print(df[[c for c in ("precision", "ms_per_batch", "speedup_vs_fp32", "note") if c in df]].to_string(index=False))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
