"""Serving: how long a hot swap between two adapters takes, and what four adapters add to memory.

Each round is a fresh Python process (so its resident memory is its own) that
  1. loads the base in a `peftkit.serving.deployer.Deployer`, pages every weight in, and reads its resident set (RSS);
  2. registers four LoRA adapters (q, v, r=8) and makes each live once, then reads RSS again;
  3. times `activate` alternating between two adapters (every call a real switch), unmerged and
     with merged=True (which also subtracts the old update from W and adds the new one);
  4. times a switch that must rebuild the live modules (LoRA <-> Pfeiffer adapter) for contrast;
  5. times `predict` on a batch of 32 real movie snippets, unmerged and merged.

    python benchmarks/bench_serve.py                 # MiniLM, 3 rounds x 500 switches, 2 threads
    python benchmarks/bench_serve.py --adapters runs/adapters/<key1>,...   # your trained adapters
    python benchmarks/bench_serve.py --quick         # a smoke run on the tiny model
    python benchmarks/bench_serve.py --precisions    # predict latency per inference precision instead
With --precisions, each fresh process times `predict` on the batch for a fp32 Deployer, a bf16
Deployer (autocast, where the CPU has AVX512-BF16 or AMX) and a Deployer(precision="auto"), all
with one LoRA live and unmerged, and, beside them, one merged adapter served as a plain model
(tokenize, forward, softmax) in fp32, bf16 weights and int8, interleaved; it writes
benchmarks/results/serve_precision_<cpu family>_<threads>thread.csv.
Without --adapters, four adapters with MiniLM's real shapes and random values are written to a
temporary folder first (by a separate process): timing and memory do not depend on the values.
Writes benchmarks/results/serve.csv and serve.md and prints the table. Figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_adapters(out: Path, base: str) -> list[str]:
    """Four LoRA q,v r=8 adapters and one Pfeiffer adapter with random values, saved under `out`."""
    import torch

    import peftkit as pk
    dirs = []
    for i, method in enumerate([pk.LoRA(r=8, alpha=16)] * 4 + [pk.Adapter(reduction=16)]):
        model, _ = pk.load_base(base, seed=0)
        pk.apply(model, method)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        d = out / (f"lora{i}" if i < 4 else "pfeiffer")
        pk.save_adapter(model, d)
        dirs.append(str(d))
    return dirs


def texts(n: int) -> list[str]:
    try:
        from peftkit import data
        return data.split(data.load_corpus("movies"), seed=0)["test"]["text"].head(n).tolist()
    except Exception:  # no corpus fetched: plain sentences of snippet length
        return [f"this is review number {i}, neither the best nor the worst film of the year" for i in range(n)]


def worker(base: str, loras: list[str], pfeiffer: str | None, repeats: int, threads: int, batch: int) -> dict:
    import gc

    import numpy as np
    import torch

    import peftkit.studies.experiments  # noqa: F401  (imported by register; not adapter memory)
    from peftkit.serving.deployer import Deployer
    from peftkit.runtime import current_rss_mib
    from peftkit.studies.serving_study import swap_times
    torch.set_num_threads(threads)
    batch_texts = texts(batch)
    gc.collect()
    rss_start = current_rss_mib()
    dep = Deployer(base, device="cpu")
    with torch.no_grad():  # weights may still be mapped from the file: page them all in first
        for p in dep.model.parameters():
            p.sum()
    gc.collect()
    rss_base = current_rss_mib()
    base_bytes = sum(p.numel() * p.element_size() for p in dep.model.parameters())
    names = [f"a{i}" for i in range(len(loras))]
    for n, d in zip(names, loras):
        dep.register(n, d)
    for n in names:
        dep.activate(n)  # the live LoRA modules exist from here on
    gc.collect()
    rss_adapters = current_rss_mib()
    held = int(dep.adapters()["bytes"].sum())
    live = sum(p.numel() * p.element_size() for n, p in dep.model.named_parameters() if "lora_" in n)

    out = {"base_rss_mib": rss_base, "import_rss_mib": rss_start, "adapters_rss_mib": rss_adapters - rss_base,
           "adapter_bytes_held": held, "live_adapter_bytes": live, "base_param_bytes": base_bytes,
           "adapters": len(names), "tensors_per_adapter": int(dep.adapters()["tensors"].iloc[0])}
    for mode in ("unmerged", "merged"):
        dep.set_merged(mode == "merged")
        t = swap_times(dep, names[:2], repeats if mode == "unmerged" else max(20, repeats // 5))
        out[f"{mode}_switch_ms"] = 1000 * float(np.median(t))
        out[f"{mode}_switch_p90_ms"] = 1000 * float(np.percentile(t, 90))
    dep.set_merged(False)
    if pfeiffer:
        dep.register("pfeiffer", pfeiffer)
        t = swap_times(dep, [names[0], "pfeiffer"], max(10, repeats // 25))
        out["rebuild_switch_ms"] = 1000 * float(np.median(t))
    # predict latency: interleave the two modes so machine noise hits both alike
    lat = {"unmerged": [], "merged": []}
    dep.predict(batch_texts, adapter=names[0], batch_size=batch)  # warm-up
    for _ in range(max(3, repeats // 50)):
        for mode in lat:
            dep.set_merged(mode == "merged")
            t0 = time.perf_counter()
            dep.predict(batch_texts, adapter=names[0], batch_size=batch)
            lat[mode].append(time.perf_counter() - t0)
    for mode, v in lat.items():
        out[f"{mode}_predict_ms"] = 1000 * statistics.median(v)
    return out


def precision_worker(base: str, lora: str, repeats: int, threads: int, batch: int) -> dict:
    """Median ms of one predict on `batch` texts per precision (see the module docstring)."""
    import numpy as np
    import torch

    import peftkit as pk
    from peftkit import runtime
    from peftkit.serving.deployer import Deployer
    torch.set_num_threads(threads)
    batch_texts, calibration = texts(batch), texts(256)
    has_bf16 = runtime.cpu_has_bf16()
    deps = {"fp32": Deployer(base, device="cpu")}
    if has_bf16:
        deps["bf16"] = Deployer(base, device="cpu", precision="bf16")
    deps["auto"] = Deployer(base, device="cpu", precision="auto", calibration=calibration)
    for d in deps.values():
        d.register("a", lora)
    model, tok = pk.load_base(base, seed=0)
    pk.load_adapter(model, lora)
    singles = {"fp32": pk.optimize_for_inference(model, "fp32", verbose=False)}
    if has_bf16:
        singles["bf16-weights"] = pk.optimize_for_inference(model, "bf16-weights", verbose=False)
    singles["int8"] = pk.optimize_for_inference(model, "int8", verbose=False)

    def served(m):
        def run():
            with torch.inference_mode():
                x = tok(batch_texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
                return torch.softmax(m(**x).logits.float(), -1).numpy()
        return run
    runs = {f"Deployer {k}": (lambda d=d: d.predict(batch_texts, adapter="a", batch_size=batch)) for k, d in deps.items()}
    runs.update({f"merged model {k}": served(m) for k, m in singles.items()})
    for f in runs.values():
        f()
    lat = {k: [] for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            lat[k].append(time.perf_counter() - t0)
    out = {f"{k} ms": 1000 * float(np.median(v)) for k, v in lat.items()}
    out["auto_choice"] = deps["auto"].model.inference_precision.precision
    out["auto_reason"] = deps["auto"].model.inference_precision.reason
    return out


def precision_main(a, loras: list[str], env: dict) -> int:
    import re

    import pandas as pd
    import torch

    from peftkit import runtime
    rows, load = [], [os.getloadavg()[0]]
    for r in range(a.rounds):
        cmd = [sys.executable, __file__, "--precision-worker", loras[0], "--base", a.base, "--repeats",
               str(a.repeats), "--threads", str(a.threads), "--batch-size", str(a.batch_size)]
        with tempfile.TemporaryDirectory() as cache:  # auto times its candidates afresh in every round
            p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PEFTKIT_CACHE_DIR": cache})
        if p.returncode != 0:
            print(p.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        load.append(os.getloadavg()[0])
        print(f"round {r + 1}/{a.rounds}: auto chose {rows[-1]['auto_choice']}", flush=True)
    raw = pd.DataFrame(rows)
    med = raw.median(numeric_only=True)
    ref, merged_ref = med["Deployer fp32 ms"], med["merged model fp32 ms"]
    family, policy = runtime.cpu_family(), os.environ.get("OMP_WAIT_POLICY", "")
    table = [{"what": k[:-3], "predict_ms": v,
              "vs_fp32": (ref if k.startswith("Deployer") else merged_ref) / v} for k, v in med.items()]
    df = pd.DataFrame(table).assign(
        auto_choice=", ".join(dict.fromkeys(raw["auto_choice"])), cpu=runtime.cpu_name(), cpu_family=family,
        cpu_flags=runtime.cpu_summary(), base=a.base, rounds=a.rounds, repeats=a.repeats, threads=a.threads,
        batch_size=a.batch_size, torch=torch.__version__, load_avg_max=max(load), omp_wait_policy=policy or "default")
    out = Path(a.out) if a.out_given else (ROOT / "benchmarks" / "results" /
                                           f"serve_precision_{re.sub(r'[^a-z0-9]+', '-', family.lower()).strip('-')}_{a.threads}thread"
                                           f"{'_' + policy.lower() if policy else ''}.csv")
    if not a.quick or a.out_given:
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
    print(f"\n{runtime.cpu_summary()}; {a.base}, torch {torch.__version__}, {a.threads} threads, medians of "
          f"{a.rounds} fresh processes x {a.repeats} predicts of {a.batch_size} texts; load average up to "
          f"{max(load):.1f} on {os.cpu_count()} cores\n")
    print(df[["what", "predict_ms", "vs_fp32"]].round(3).to_markdown(index=False))
    print(f"\nauto chose: {raw['auto_reason'].iloc[-1]}")
    print(f"wrote {out}" if (not a.quick or a.out_given) else "(quick: nothing written)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="minilm")
    ap.add_argument("--adapters", help="four or more comma-separated adapter folders of the same LoRA shape")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes (default 3)")
    ap.add_argument("--repeats", type=int, default=500,
                    help="switches timed per round (default 500; merged mode a fifth of that)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 round, 50 switches")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.csv"))
    ap.add_argument("--precisions", action="store_true",
                    help="time predict per inference precision instead (default 3 rounds x 20 predicts)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--precision-worker", help=argparse.SUPPRESS)
    ap.add_argument("--make-adapters", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.out_given = any(x == "--out" or x.startswith("--out=") for x in (argv if argv is not None else sys.argv[1:]))
    if a.precisions and not any(x.startswith("--repeats") for x in (argv if argv is not None else sys.argv[1:])):
        a.repeats = 20
    if a.quick:
        a.base, a.rounds, a.repeats = "tiny", 1, (3 if a.precisions else 50)
    if a.precision_worker:
        print(json.dumps(precision_worker(a.base, a.precision_worker, a.repeats, a.threads, a.batch_size)))
        return 0
    if a.make_adapters:  # in its own process, so the measuring processes start clean
        print(json.dumps(make_adapters(Path(a.make_adapters), a.base)))
        return 0
    if a.worker:
        spec = json.loads(a.worker)
        print(json.dumps(worker(a.base, spec["loras"], spec["pfeiffer"], a.repeats, a.threads, a.batch_size)))
        return 0
    import pandas as pd
    import torch

    from peftkit import runtime
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1"}
    print(f"CPU: {runtime.cpu_summary()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if a.adapters:
            loras, pfeiffer = [d.strip() for d in a.adapters.split(",")], None
            if len(loras) < 2:
                ap.error("--adapters needs at least two folders to switch between")
        else:
            p = subprocess.run([sys.executable, __file__, "--make-adapters", tmp, "--base", a.base],
                               capture_output=True, text=True, env=env)
            if p.returncode != 0:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
            made = json.loads(p.stdout.strip().splitlines()[-1])
            loras, pfeiffer = made[:4], made[4]
        if a.precisions:
            return precision_main(a, loras, env)
        rows, load = [], [os.getloadavg()[0]]  # other processes' load: this machine is shared
        for r in range(a.rounds):
            spec = json.dumps({"loras": loras, "pfeiffer": pfeiffer})
            cmd = [sys.executable, __file__, "--worker", spec, "--base", a.base, "--repeats", str(a.repeats),
                   "--threads", str(a.threads), "--batch-size", str(a.batch_size)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
            row = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append({**row, "round": r})
            load.append(os.getloadavg()[0])
            print(f"round {r + 1}/{a.rounds}: switch {row['unmerged_switch_ms']:.3f} ms unmerged, "
                  f"{row['merged_switch_ms']:.3f} ms merged; {len(loras)} adapters add "
                  f"{row['adapters_rss_mib']:.1f} MiB to {row['base_rss_mib']:.0f} MiB", flush=True)
    raw = pd.DataFrame(rows)
    med = raw.median(numeric_only=True)
    base_rss, held = med["base_rss_mib"], med["adapter_bytes_held"] + med["live_adapter_bytes"]
    table = []
    for mode in ("unmerged", "merged"):
        table.append({"mode": mode, "switch_ms_median": med[f"{mode}_switch_ms"],
                      "switch_ms_p90": med[f"{mode}_switch_p90_ms"], "predict_ms_batch": med[f"{mode}_predict_ms"],
                      "rebuild_switch_ms": med.get("rebuild_switch_ms", float("nan")),
                      "adapters": int(med["adapters"]), "tensors_per_adapter": int(med["tensors_per_adapter"]),
                      "adapter_bytes_held": int(med["adapter_bytes_held"]), "live_adapter_bytes": int(med["live_adapter_bytes"]),
                      "base_rss_mib": base_rss, "adapters_rss_mib": med["adapters_rss_mib"],
                      "adapters_pct_of_base_rss": 100 * med["adapters_rss_mib"] / base_rss,
                      "adapters_pct_of_base_params": 100 * held / med["base_param_bytes"],
                      "base": a.base, "rounds": a.rounds, "repeats": a.repeats, "threads": a.threads,
                      "batch_size": a.batch_size, "torch": torch.__version__, "load_avg_max": max(load),
                      "cpu": runtime.cpu_name(), "cpu_flags": runtime.cpu_summary()})
    df = pd.DataFrame(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    head = (f"{runtime.cpu_summary()}; {a.base}, torch {torch.__version__}, {a.threads} threads, {len(loras)} LoRA adapters "
            f"({int(med['tensors_per_adapter'])} tensors each), medians of {a.rounds} fresh processes x "
            f"{a.repeats} switches; 1-minute load average up to {max(load):.1f} on {os.cpu_count()} cores")
    show = df[["mode", "switch_ms_median", "switch_ms_p90", "rebuild_switch_ms", "predict_ms_batch",
               "adapters_rss_mib", "adapters_pct_of_base_rss", "adapters_pct_of_base_params"]]
    md = (f"{head}\n\n{show.round(3).to_markdown(index=False)}\n\n"
          f"base RSS {base_rss:.0f} MiB (process after loading the base); adapter tensors held "
          f"{med['adapter_bytes_held'] / 1024:.0f} KiB + live modules {med['live_adapter_bytes'] / 1024:.0f} KiB; "
          f"predict: one batch of {a.batch_size} movie snippets.\n")
    print("\n" + md)
    if not a.quick:
        Path(a.out).with_suffix(".md").write_text(md)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
