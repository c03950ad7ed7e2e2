"""A short check of peftkit on a CUDA GPU: the LoRA fast path's numerics, dtype and device
following the base, bf16 training with fit(), and LoRA layer speed against a plain Linear and
PEFT's LoRA. Needs no model download (random BERT from a config); exits non-zero on failure.

    python benchmarks/gpu_check.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def check_numerics(dev) -> dict:
    from peftkit.layers.lora import LoRALinear
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for shape in [(4, 7, 64), (2048, 384)]:
        base = torch.nn.Linear(shape[-1], 96).to(dev)
        layer = LoRALinear(base, r=8, alpha=16)
        torch.nn.init.normal_(layer.lora_B)
        x = torch.randn(*shape, device=dev, requires_grad=True)
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
        got = [x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
        for t in (x, layer.lora_A, layer.lora_B):
            t.grad = None
        ref = base(x) + layer.scale * (x @ layer.lora_A.T @ layer.lora_B.T)
        ref.backward(g)
        want = [x.grad, layer.lora_A.grad, layer.lora_B.grad]
        # relative to each tensor's scale: dA and dB sum over every token, so their absolute
        # float32 rounding grows with the token count while the relative error stays ~1e-6
        err = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip([y] + got, [ref] + want))
        assert err < 1e-5, (shape, err)
        out[f"fp32 max relative error {shape}"] = err
    base = torch.nn.Linear(16, 8).double().to(dev)
    layer = LoRALinear(base, r=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16, dtype=torch.float64, device=dev, requires_grad=True)
    out["gradcheck float64"] = torch.autograd.gradcheck(layer, (x,))
    bf = LoRALinear(torch.nn.Linear(32, 32).to(dev, torch.bfloat16), r=4)
    assert bf.lora_A.dtype == torch.bfloat16 and bf.lora_A.device.type == "cuda"
    assert bf(torch.randn(3, 32, device=dev, dtype=torch.bfloat16)).dtype == torch.bfloat16
    out["bf16 dtype follows base"] = True
    return out


def check_fit(dev) -> dict:
    import peftkit as pk
    from peftkit.training.loop import TrainConfig, fit, resolve_device
    from transformers import BertConfig, BertForSequenceClassification
    assert resolve_device("auto").type == "cuda"
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=128, num_labels=2))
    pk.apply(model, pk.Hybrid())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (64, 16), generator=g)
    labels = (ids[:, 0] > 250).long()  # learnable from the first token
    batches = [{"input_ids": ids[i:i + 16], "attention_mask": torch.ones(16, 16, dtype=torch.long),
                "labels": labels[i:i + 16]} for i in range(0, 64, 16)]
    hist = fit(model, batches, batches, TrainConfig(epochs=15, lr=3e-3, progress=False, device="auto", bf16=True))
    first, last = hist.loss.head(4).mean(), hist.loss.tail(4).mean()
    assert next(model.parameters()).device.type == "cuda"
    assert last < first, (first, last)
    return {"fit bf16 loss first/last": [round(first, 4), round(last, 4)],
            "fit val accuracy": float(hist.val_accuracy.dropna().iloc[-1])}


def time_layers(dev, repeats=50) -> dict:
    import peft
    from peftkit.layers.lora import LoRALinear
    torch.backends.cuda.matmul.allow_tf32 = True
    res = {}
    for n in (1024, 4096):
        x = torch.randn(8192, n, device=dev, requires_grad=True)
        gy = torch.randn(8192, n, device=dev)
        lin = torch.nn.Linear(n, n).to(dev).requires_grad_(False)
        ours = LoRALinear(torch.nn.Linear(n, n).to(dev), r=8, alpha=16)

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(n, n)
        theirs = peft.get_peft_model(Wrap(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"])).to(dev)
        layers = {"frozen linear": lin, "peftkit LoRA": ours, "PEFT LoRA": theirs.base_model.model.proj}
        times = {k: [] for k in layers}
        for i in range(repeats + 5):
            for k, m in layers.items():
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                m(x).backward(gy)
                e.record()
                torch.cuda.synchronize()
                if i >= 5:
                    times[k].append(s.elapsed_time(e))
        base = statistics.median(times["frozen linear"])
        res[f"{n}x{n} fwd+bwd ratio vs frozen linear (8192 tokens)"] = {k: round(statistics.median(v) / base, 3) for k, v in times.items()}
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    dev = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    report.update(check_numerics(dev))
    report.update(check_fit(dev))
    report.update(time_layers(dev))
    print(json.dumps(report, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
