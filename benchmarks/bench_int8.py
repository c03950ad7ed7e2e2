"""Where Int8Linear's time goes: quantize, int8 GEMM and dequantize, for each kernel, on MiniLM's shapes.

For each Linear shape of a MiniLM layer (query/key/value/output 384->384, feed-forward 384->1536
and 1536->384) at `--tokens` rows (default: the tokens of one padded batch of 32 movie snippets),
every stage is timed on its own, interleaved with the others, medians over `--repeats`:

* ``fp32``: ``F.linear``; ``bf16``: ``F.linear`` on bf16 weights, with the casts in and out;
* ``int_mm_v1``, the first Int8Linear: quantize (|x|, amax, divide, round, clamp, cast), torch._int_mm,
  dequantize (int32 -> float, times token scales, times weight scales, plus bias);
* ``int_mm``, today's fallback: quantize (amax and amin, multiply, round in place, cast), torch._int_mm,
  dequantize (int32 times token scales in one pass, then bias plus weight scales in place);
* ``onednn``, today's default: the same quantize plus a sign-bit flip to uint8, oneDNN's int8 GEMM
  with the weight scales and the float conversion fused in, one in-place pass for token scale and bias;

and the whole layer (``Int8Linear.forward`` on that kernel, or the float layer). The clock is this
thread's CPU time at one thread (immune to other processes on a shared machine), else wall time.

    python benchmarks/bench_int8.py                  # 2 threads, wall time
    python benchmarks/bench_int8.py --threads 1      # thread CPU time
    python benchmarks/bench_int8.py --quick          # a smoke run

Writes benchmarks/results/int8_profile_<cpu family>_<threads>thread[_<OMP_WAIT_POLICY>].csv (one row
per shape, kernel and stage) and prints the table, headed by the CPU model and its flags.

On a machine whose cores other processes also use, OpenMP's default of spinning while it waits
lets an idle thread take the CPU its partner needs, and a parallel region can then cost a whole
time slice: fp32 runs one region per Linear, int8 about eight (each elementwise pass is one).
``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts) makes waiting threads sleep instead; the
file name records it.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = [(384, 384, 4), (384, 1536, 1), (1536, 384, 1)]  # (in, out, how many per MiniLM layer)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def real_tokens() -> int:
    """Rows one padded batch of the 32 movie test snippets that bench_compress times gives an
    encoder Linear: 32 x its longest (bench_precision_shapes.LENGTHS holds their lengths)."""
    from bench_precision_shapes import LENGTHS
    return len(LENGTHS) * max(LENGTHS)


def stages(k: int, n: int, tokens: int):
    """{kernel: {stage: function}} for one shape, inputs prepared beforehand."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from peftkit.compress import int8 as I

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=g)
    lin = nn.Linear(k, n).eval()
    q = I.Int8Linear(lin)
    wq, ws, b = q.weight_int8, q.weight_scale, q.bias
    wb, bb = lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
    xb = x.bfloat16()
    # v1's intermediates
    xs = I.row_scale(x, 127)
    xq1 = torch.round(x / xs).clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(xq1, wq.t())
    # today's intermediates
    absmax = I.token_absmax(x)
    codes = I.quantize_tokens(x, absmax)
    ucodes = codes.view(torch.uint8) ^ 128
    _, packed, zeros = q._onednn_weight()
    z = torch.ops.onednn.qlinear_pointwise(ucodes, 1.0, 128, packed, ws, zeros, None, 1.0, 0, torch.float32,
                                           "none", [], "") if I._probe_onednn() else None

    def layer(kernel):
        def run():
            with I.using_int8_kernel(kernel):
                return q(x)
        return run

    out = {
        "fp32": {"gemm": lambda: F.linear(x, lin.weight, lin.bias), "layer": lambda: lin(x)},
        "bf16": {"quantize": lambda: x.bfloat16(), "gemm": lambda: F.linear(xb, wb, bb),
                 "dequantize": lambda: F.linear(xb, wb, bb).float(),
                 "layer": lambda: F.linear(x.bfloat16(), wb, bb).float()},
        "int_mm_v1": {"quantize": lambda: torch.round(x / I.row_scale(x, 127)).clamp(-127, 127).to(torch.int8),
                      "gemm": lambda: torch._int_mm(xq1, wq.t()),
                      "dequantize": lambda: acc.float() * xs * ws + b, "layer": layer("int_mm_v1")},
        "int_mm": {"quantize": lambda: I.quantize_tokens(x, I.token_absmax(x)),
                   "gemm": lambda: torch._int_mm(codes, wq.t()),
                   "dequantize": lambda: torch.addcmul(b, acc * (absmax / 127), ws), "layer": layer("int_mm")},
    }
    if z is not None:
        out["onednn"] = {
            "quantize": lambda: I.quantize_tokens(x, I.token_absmax(x)).view(torch.uint8).bitwise_xor_(128),
            "gemm": lambda: torch.ops.onednn.qlinear_pointwise(ucodes, 1.0, 128, packed, ws, zeros, None, 1.0, 0,
                                                               torch.float32, "none", [], ""),
            "dequantize": lambda: torch.addcmul(b, z, absmax / 127), "layer": layer("onednn")}
    # the bf16 "dequantize" above is the GEMM plus the cast back: keep only the cast's share
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=None, help="rows per call (default: one real batch of 32)")
    ap.add_argument("--quick", action="store_true", help="5 repeats, 256 rows")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pandas as pd
    import torch

    from bench_precision_shapes import import_peftkit_parts  # torch and transformers suffice
    runtime, I, P = import_peftkit_parts()
    clock = P.clock

    torch.set_num_threads(a.threads)
    repeats = 5 if a.quick else a.repeats
    tokens = 256 if a.quick else (a.tokens or real_tokens())
    tick, clock_name = clock()
    family = runtime.cpu_family()
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    out = a.out or ROOT / "benchmarks" / "results" / (f"int8_profile_{slug(family)}_{a.threads}thread"
                                                       f"{'_' + policy.lower() if policy else ''}.csv")
    load = [os.getloadavg()[0]]
    rows = []
    rng = random.Random(0)
    with torch.inference_mode():
        for k, n, per_layer in SHAPES:
            fns = stages(k, n, tokens)
            flat = [(kern, st, f) for kern, d in fns.items() for st, f in d.items()]
            for _, _, f in flat:
                f(), f()
            times = {(kern, st): [] for kern, st, _ in flat}
            for _ in range(repeats):
                rng.shuffle(flat)
                for kern, st, f in flat:
                    t0 = tick()
                    f()
                    times[kern, st].append(tick() - t0)
            med = {key: 1000 * statistics.median(v) for key, v in times.items()}
            bf16_gemm = med["bf16", "gemm"]
            for (kern, st), ms in med.items():
                if (kern, st) == ("bf16", "dequantize"):
                    ms = max(ms - bf16_gemm, 0.0)  # the cast back to fp32 alone
                rows.append({"shape": f"{k}x{n}", "per_layer": per_layer, "kernel": kern, "stage": st, "ms": ms})
            load.append(os.getloadavg()[0])
            print(f"{k}x{n}: done", flush=True)
    df = pd.DataFrame(rows)
    env = {"cpu": runtime.cpu_name(), "cpu_family": family, "cpu_flags": runtime.cpu_summary(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "clock": clock_name, "tokens": tokens,
           "repeats": repeats, "int8_kernel_default": I.int8_kernel(), "load_avg_max": max(load),
           "cpus": os.cpu_count(), "omp_wait_policy": policy or "default"}
    for key, v in env.items():
        df[key] = v
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(f"\n{env['cpu_flags']}; {env['threads']} threads, torch {env['torch']}, {tokens} rows, {clock_name}, "
          f"medians of {repeats}; OMP_WAIT_POLICY {policy or 'default'}; load average up to {max(load):.1f} on "
          f"{os.cpu_count()} cores\n")
    print(summary(df).to_markdown(index=False, floatfmt=".3f"))
    print(f"\nwrote {out}")
    return 0


def summary(df):
    """One row per shape and kernel: ms per stage, the layer, and the layer's speed-up over fp32;
    then the Linears of one whole MiniLM layer."""
    import pandas as pd
    wide = df.pivot_table(index=["shape", "kernel"], columns="stage", values="ms", sort=False).reset_index()
    fp32 = wide[wide.kernel == "fp32"].set_index("shape")["layer"]
    wide["vs fp32"] = wide["shape"].map(fp32) / wide["layer"]
    per = df.drop_duplicates("shape").set_index("shape")["per_layer"]
    total = wide.assign(w=wide["shape"].map(per)).assign(ms=lambda d: d["layer"] * d["w"]).groupby(
        "kernel", sort=False)["ms"].sum()
    rows = [{"shape": "one MiniLM layer's Linears", "kernel": k, "layer": v, "vs fp32": total["fp32"] / v}
            for k, v in total.items()]
    cols = ["shape", "kernel", "quantize", "gemm", "dequantize", "layer", "vs fp32"]
    return pd.concat([wide, pd.DataFrame(rows)], ignore_index=True).reindex(columns=cols)


if __name__ == "__main__":
    raise SystemExit(main())
