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

    python benchmarks/bench_serve.py --mixed         # mixed batches, padding-free inference, HTTP
measures, in one fresh process (and one server process), each comparison interleaved so machine
noise hits both sides alike, as medians and their ratio:
  1. a mixed batch of 32 movie snippets over 4 LoRA adapters against one adapter for all 32 rows
     (`Deployer.predict`, texts to probabilities);
  2. that mixed batch against Hugging Face PEFT's `adapter_names` mixed batch of the same adapters
     (exported with export_peft) on the plain transformers model, texts to probabilities too;
  3. the forward of peftkit's unmerged LoRA (padding-free encoder, CLS-only last layer) against
     plain transformers + PEFT's LoRA on the same six random batches of 32 snippets (and peftkit on
     the padded model, for scale);
  4. `python -m peftkit serve` on the 4 adapters: texts per second with 16 concurrent clients sending
     one text each (a random adapter each), against in-process `predict` of the same texts in
     mixed batches of 16; and the latency (p50, p99) of one-text requests at 1, 4 and 16 clients.
It writes benchmarks/results/serve_mixed.csv (the ratios) and serve_latency.csv; --quick runs
it on the tiny model with the service in a thread.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
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


# ----------------------------------------------------------------------------- --mixed

def cpu_line() -> str:
    """The CPU as the benchmarks name it: model, cores, and the vector units that matter here."""
    from peftkit.runtime import cpu_name
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    units = ", ".join(f"{u}: {'yes' if f in flags else 'no'}" for u, f in
                      (("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_tile")))
    return f"{cpu_name()}, {os.cpu_count()} cores ({units})"


def interleaved(fns: dict, repeats: int, seed: int = 0) -> dict:
    """Seconds of each call, `repeats` rounds, every round in its own shuffled order."""
    import random
    rng, out = random.Random(seed), {k: [] for k in fns}
    for _ in range(repeats):
        for k in rng.sample(list(fns), len(fns)):
            t0 = time.perf_counter()
            fns[k]()
            out[k].append(time.perf_counter() - t0)
    return out


def start_service(dep_dir: Path, threads: int, server: str):
    """(url, stop) of the HTTP service on the deployment in `dep_dir`: a `python -m peftkit serve`
    process, or (server="thread") a thread of this process."""
    if server == "thread":
        from peftkit.serving.deployer import Deployer
        from peftkit.serving.server import BackgroundServer
        bg = BackgroundServer(Deployer.load(dep_dir, device="cpu"), dep_dir)
        return bg.url, bg.stop
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "peftkit", "serve", "--deployment", str(dep_dir), "--port", "0",
                             "--threads", str(threads), "--max-texts", "64", "--batch-wait-ms", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("the service did not start")

    def stop():
        proc.terminate()
        proc.wait(60)
    return json.loads(line)["url"], stop


def http_clients(url: str, work: list[list[tuple]], barrier_timeout: float = 120) -> tuple[float, list[float]]:
    """Each client (a thread with its own keep-alive connection) sends its (text, adapter) requests one
    after another; all start together. Returns (wall seconds, every request's latency)."""
    import threading

    import httpx
    lat, lock = [], threading.Lock()
    start = threading.Barrier(len(work) + 1)

    def client(items):
        with httpx.Client(base_url=url, timeout=120) as c:
            c.get("/health")  # connect before the clock starts
            start.wait(barrier_timeout)
            for text, name in items:
                t0 = time.perf_counter()
                r = c.post("/predict", json={"texts": [text], "adapter": name})
                took = time.perf_counter() - t0
                r.raise_for_status()
                with lock:
                    lat.append(took)
    threads = [threading.Thread(target=client, args=(w,)) for w in work]
    for t in threads:
        t.start()
    start.wait(barrier_timeout)
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat


def mixed_suite(base: str = "minilm", threads: int = 2, quick: bool = False, out_dir: Path = RESULTS,
                server: str = "process") -> tuple:
    """The --mixed measurements (see the module docstring). Returns (ratios, latency) frames."""
    import numpy as np
    import pandas as pd
    import peft
    import torch
    import transformers

    import peftkit as pk
    from peftkit.files.peft_format import export_peft
    from peftkit.serving.deployer import Deployer
    torch.set_num_threads(threads)
    repeats = 3 if quick else 5
    rng = np.random.default_rng(0)
    load = [os.getloadavg()[0]]
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_mixed_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # adapters and a deployment: gone when the run ends
    loras = make_adapters(tmp / "adapters", base)[:4]
    names = [f"a{i}" for i in range(4)]
    pool = texts(64 if quick else 192)
    batch = pool[:32]
    mix = [str(n) for n in rng.permutation(names * 8)]
    rows = []

    def row(comparison, ours, baseline, t_ours, t_base, unit, target, check=None, detail=""):
        """t_ours, t_base: the per-round figures, round r of each measured back to back. The ratio is
        the median of the per-round ratios (robust to the machine's load drifting between rounds)."""
        ours_v, base_v = statistics.median(t_ours), statistics.median(t_base)
        ratio = statistics.median([a / b for a, b in zip(t_ours, t_base)])
        met = (ratio <= float(target[2:])) if target.startswith("<=") else (ratio >= float(target[2:])) if target else None
        rows.append({"comparison": comparison, "ours": ours, "baseline": baseline, "ours_value": ours_v,
                     "baseline_value": base_v, "unit": unit, "ratio": ratio, "ratio_of_medians": ours_v / base_v,
                     "rounds": len(t_ours), "target": target, "meets_target": met, "check_max_abs_diff": check,
                     "detail": detail})
        print(f"{comparison}: {ours_v:.4g} vs {base_v:.4g} {unit} -> paired {ratio:.3f}, of medians "
              f"{ours_v / base_v:.3f} (target {target or '-'})", flush=True)

    def ms(times):
        return [1000 * x for x in times]

    # 1. a mixed batch of four adapters against one adapter for all 32 rows
    dep = Deployer(base, device="cpu")
    for n, d in zip(names, loras):
        dep.register(n, d)
    one = lambda: dep.predict(batch, adapter="a0", batch_size=32)  # noqa: E731
    mixed = lambda: dep.predict(batch, adapters=mix, batch_size=32)  # noqa: E731
    got = mixed()
    alone = np.concatenate([dep.predict([t], adapter=n)["probability"].to_numpy() for t, n in zip(batch, mix)])
    t = interleaved({"one": one, "mixed": mixed}, repeats)
    load.append(os.getloadavg()[0])
    row("mixed batch of 4 LoRA adapters vs one adapter, 32 rows", "peftkit predict, 4 adapters x 8 rows",
        "peftkit predict, one adapter", ms(t["mixed"]), ms(t["one"]), "ms", "<=1.15",
        float(np.abs(got["probability"].to_numpy() - alone).max()), "texts to probabilities; each row checked against its adapter alone")

    # 2. against PEFT's adapter_names mixed batch of the same four adapters
    for i, d in enumerate(loras):
        m, _ = pk.load_base(base)
        pk.load_adapter(m, d)
        export_peft(m, tmp / f"peft{i}")
    plain, tok = pk.load_base(base, cls_only=False, unpad=False)  # plain transformers
    pm = peft.PeftModel.from_pretrained(plain, str(tmp / "peft0"), adapter_name="a0")
    for i in range(1, 4):
        pm.load_adapter(str(tmp / f"peft{i}"), adapter_name=f"a{i}")
    pm.eval()

    def peft_mixed():
        enc = tok(batch, padding=True, truncation=True, max_length=dep.max_length, return_tensors="pt")
        with torch.inference_mode():
            return torch.softmax(pm(**enc, adapter_names=mix).logits, -1).max(-1).values.numpy()
    diff = float(np.abs(peft_mixed() - got["probability"].to_numpy()).max())
    t = interleaved({"ours": mixed, "peft": peft_mixed}, repeats, seed=1)
    load.append(os.getloadavg()[0])
    row("peftkit mixed batch vs PEFT adapter_names mixed batch", "peftkit predict, 4 adapters x 8 rows",
        f"PEFT {peft.__version__} adapter_names on transformers", ms(t["ours"]), ms(t["peft"]), "ms", "<=0.8", diff,
        "the same 4 adapters (export_peft) and 32 texts; texts to probabilities")

    # 3. padding-free inference against plain transformers + PEFT, random batches of 32
    shuffled = [pool[i] for i in rng.permutation(len(pool))]
    batches = [dict(tok(shuffled[i:i + 32], padding=True, truncation=True, max_length=dep.max_length,
                        return_tensors="pt")) for i in range(0, len(shuffled), 32)]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    ours, _ = pk.load_base(base)
    pk.load_adapter(ours, loras[0])
    ours_padded, _ = pk.load_base(base, cls_only=False, unpad=False)
    pk.load_adapter(ours_padded, loras[0])
    pe = peft.PeftModel.from_pretrained(pk.load_base(base, cls_only=False, unpad=False)[0], str(tmp / "peft0"))
    models = {"ours": ours.eval(), "ours_padded": ours_padded.eval(), "peft": pe.eval()}

    def forward(m):
        with torch.inference_mode():
            return [m(**b).logits for b in batches]
    diff = max(float((a - b).abs().max()) for a, b in zip(forward(models["ours"]), forward(models["peft"])))
    t = interleaved({k: (lambda m=m: forward(m)) for k, m in models.items()}, repeats, seed=2)
    load.append(os.getloadavg()[0])
    pad_note = f"{len(batches)} random batches of 32, {100 * (1 - real / padded):.0f}% of their tokens padding; forward only, unmerged LoRA"
    row("padding-free inference vs transformers + PEFT, random batches", "peftkit LoRA (padding-free, CLS-only)",
        "transformers + PEFT LoRA", ms(t["ours"]), ms(t["peft"]), "ms", "<=0.6", diff, pad_note + "; check: largest logit difference")
    row("padded peftkit inference vs transformers + PEFT, random batches", "peftkit LoRA (padded, whole last layer)",
        "transformers + PEFT LoRA", ms(t["ours_padded"]), ms(t["peft"]), "ms", "", None, pad_note)
    del models, ours, ours_padded, pe

    # 4. the HTTP service: throughput at 16 clients against in-process batches of 16, and latency
    dep.save(tmp / "deployment")
    url, stop = start_service(tmp / "deployment", threads, server)
    lat_rows = []
    try:
        per_client = 2 if quick else 12
        picks = [str(n) for n in rng.choice(names, size=16 * per_client)]
        items = list(zip([pool[i % len(pool)] for i in range(16 * per_client)], picks))
        work = [items[k::16] for k in range(16)]
        http_clients(url, [w[:1] for w in work])  # warm-up: every connection, one batch

        def inproc():
            for i in range(0, len(items), 16):
                chunk = items[i:i + 16]
                dep.predict([x for x, _ in chunk], adapters=[n for _, n in chunk], batch_size=16)
        tput = {"http": [], "inproc": []}
        for r in range(2 if quick else 3):
            for k in (("http", "inproc") if r % 2 == 0 else ("inproc", "http")):
                if k == "http":
                    wall, _ = http_clients(url, work)
                else:
                    t0 = time.perf_counter()
                    inproc()
                    wall = time.perf_counter() - t0
                tput[k].append(len(items) / wall)
        load.append(os.getloadavg()[0])
        row("HTTP, 16 concurrent clients of one text each, vs in-process batched predict",
            "python -m peftkit serve (dynamic batching, 5 ms)", "in-process predict, mixed batches of 16",
            tput["http"], tput["inproc"], "texts/s", ">=0.7", None,
            f"{len(items)} texts, a random adapter of 4 each; clients and server share this machine's cores")
        for clients in (1, 4, 16):
            n = (3 if quick else 30) if clients == 1 else (2 if quick else max(10, 80 // clients))
            sample = [(pool[(clients * 7 + i) % len(pool)], picks[i % len(picks)]) for i in range(clients * n)]
            wall, lat = http_clients(url, [sample[k::clients] for k in range(clients)])
            lat_ms = 1000 * np.asarray(lat)
            lat_rows.append({"clients": clients, "requests": len(lat), "p50_ms": float(np.percentile(lat_ms, 50)),
                             "p99_ms": float(np.percentile(lat_ms, 99)), "mean_ms": float(lat_ms.mean()),
                             "texts_per_s": len(lat) / wall})
            print(f"latency at {clients} clients: p50 {lat_rows[-1]['p50_ms']:.1f} ms, p99 {lat_rows[-1]['p99_ms']:.1f} ms "
                  f"({len(lat)} requests)", flush=True)
        load.append(os.getloadavg()[0])
    finally:
        stop()
    env = {"cpu": cpu_line(), "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "base": base, "repeats": repeats, "server": server,
           "load_avg_max": max(load), "date": time.strftime("%Y-%m-%d")}
    ratios = pd.DataFrame(rows).assign(**env)
    latency = pd.DataFrame(lat_rows).assign(**env)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ratios.to_csv(out_dir / "serve_mixed.csv", index=False)
    latency.to_csv(out_dir / "serve_latency.csv", index=False)
    print(f"\n{env['cpu']}; {threads} threads; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; 1-minute load average up to {max(load):.1f}")
    print(ratios[["comparison", "ours_value", "baseline_value", "unit", "ratio", "target", "meets_target"]]
          .round(3).to_string(index=False))
    print(f"wrote {out_dir / 'serve_mixed.csv'} and {out_dir / 'serve_latency.csv'}")
    return ratios, latency


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
    ap.add_argument("--mixed", action="store_true", help="mixed batches, padding-free inference and HTTP "
                    "(writes serve_mixed.csv and serve_latency.csv beside --out)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.csv"))
    ap.add_argument("--precisions", action="store_true",
                    help="time predict per inference precision instead (default 3 rounds x 20 predicts)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--precision-worker", help=argparse.SUPPRESS)
    ap.add_argument("--make-adapters", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.mixed:
        out = Path(a.out).parent
        if a.quick and a.out == ap.get_default("out"):  # a smoke run never overwrites the recorded results
            out = Path(tempfile.mkdtemp(prefix="bench_serve_quick_"))
        mixed_suite("tiny" if a.quick else a.base, a.threads, quick=a.quick, out_dir=out,
                    server="thread" if a.quick else "process")
        return 0


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
