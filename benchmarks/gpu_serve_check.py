"""A short check of the Deployer on a CUDA GPU (tiny random BERT; no model download): answers
equal the CPU's through every switch order, merged or not; threads get their own adapter's
answers; save/load round-trips; switch times. Exits non-zero on a failure.

    python benchmarks/gpu_serve_check.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXTS = ["a wonderful, moving film", "dull and far too long", "", "not bad at all", "the plot? what plot",
         "i loved every minute of it", "meh", "an utter waste of two hours"] * 4


def make(path, method, seed):
    import peftkit as pk
    model, _ = pk.load_base("tiny", seed=0)
    pk.apply(model, method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pk.save_adapter(model, path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    a = ap.parse_args()
    import peftkit as pk
    from peftkit.serving.deployer import Deployer
    from peftkit.studies.serving_study import swap_times
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    res, failures = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}, []
    with tempfile.TemporaryDirectory() as tmp:
        methods = {"a": pk.LoRA(r=4, alpha=8), "b": pk.LoRA(r=4, alpha=8), "p": pk.Adapter(size=8),
                   "h": pk.Hybrid(lora=pk.LoRA(r=2, alpha=4), adapter=pk.Adapter(size=4))}
        for i, (n, m) in enumerate(methods.items()):
            make(Path(tmp) / n, m, i + 1)
        deps = {"cpu": Deployer("tiny", device="cpu"), "cuda": Deployer("tiny", device="auto"),
                "cuda_merged": Deployer("tiny", device="cuda", merged=True)}
        for d in deps.values():
            for n in methods:
                d.register(n, Path(tmp) / n)
        res["auto_device"] = str(deps["cuda"].device)
        worst = 0.0
        for n in ["a", "b", "a", "p", "b", "h", "a", "h", "p", "b"]:
            want = deps["cpu"].predict(TEXTS, adapter=n, batch_size=5)
            for k in ("cuda", "cuda_merged"):
                got = deps[k].predict(TEXTS, adapter=n, batch_size=5)
                worst = max(worst, float(np.abs(got["probability"] - want["probability"]).max()))
                if not (got["label"] == want["label"]).all():
                    failures.append(f"{k} labels differ from cpu for adapter {n}")
        res["max_prob_diff_vs_cpu"] = worst
        if worst > 1e-4:
            failures.append(f"cuda probabilities differ from cpu by {worst}")
        # threads, on the GPU
        d = deps["cuda"]
        want = {n: d.predict(TEXTS, adapter=n, batch_size=3) for n in methods}
        errors, bad = [], []

        def caller(n):
            try:
                for _ in range(10):
                    got = d.predict(TEXTS, adapter=n, batch_size=3)
                    if not np.allclose(got["probability"], want[n]["probability"], atol=1e-6):
                        bad.append(n)
            except Exception as e:  # reported below
                errors.append(repr(e))
        before = d.switches
        ts = [threading.Thread(target=caller, args=(n,)) for n in methods]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        res["thread_switches"] = d.switches - before
        if errors or bad:
            failures.append(f"threads: errors {errors[:2]}, wrong answers for {sorted(set(bad))}")
        # save / load on the GPU
        d.save(Path(tmp) / "dep")
        back = Deployer.load(Path(tmp) / "dep", device="cuda")
        for n in methods:
            if not np.allclose(back.predict(TEXTS, adapter=n)["probability"], d.predict(TEXTS, adapter=n)["probability"], atol=1e-6):
                failures.append(f"save/load changed adapter {n}")
        for k in ("cuda", "cuda_merged"):
            t = swap_times(deps[k], ["a", "b"], 300)
            torch.cuda.synchronize()
            res[f"{k}_switch_ms_median"] = 1000 * float(np.median(t))
        t = swap_times(deps["cuda"], ["a", "p"], 30)
        res["cuda_rebuild_switch_ms_median"] = 1000 * float(np.median(t))
    res["failures"] = failures
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
