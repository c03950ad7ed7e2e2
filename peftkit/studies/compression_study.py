"""Measured studies of compression on a fine-tuned model: what notebook 05 and bench_compress show.

Each study takes the fine-tuned model (LoRA unmerged, as training left it) and its tokenizer,
builds the compressed variants with `peftkit.compress`, and measures them the same way:
accuracy and macro F1 on test splits (`metrics.evaluate_domains`) and inference latency on one
batch, interleaved so that machine noise hits every variant alike (`metrics.compare_latency`).
Tables come back as DataFrames; `plots` has figures for each.
"""

from __future__ import annotations

import os

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import nn
from tqdm.auto import tqdm

from .. import compress as C
from ..data import load_corpus, sample_rows, split
from ..style import NEUTRAL, QUANTITY_COLORS, TEMPLATE, accuracy_range
from ..training.metrics import compare_latency, evaluate_domains, test_split


def latency_batch(tokenizer, domain: str = "movies", batch_size: int = 32, max_length: int = 128, seed: int = 0) -> dict:
    """One batch of real test texts, tokenized as training saw them (padded to the longest)."""
    texts = test_split(domain, seed).text.head(batch_size).tolist()
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def calibration_batches(tokenizer, domain: str = "movies", n: int = 256, batch_size: int = 32,
                        max_length: int = 128, seed: int = 0) -> list[dict]:
    """`n` training texts of `domain` as model-input batches: calibration data for `smooth`."""
    train = split(load_corpus(domain), seed=seed)["train"]
    texts = sample_rows(train, n, seed).text.tolist()
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def int8_study(model, tokenizer, domains=None, n_eval: int | None = None, repeats: int = 20,
               batch_size: int = 32, progress: bool = True, alpha: float = 0.8, domain: str = "movies") -> dict[str, pd.DataFrame]:
    """fp32 (LoRA merged) against int8: ours (activations per token, `Int8Linear`) and torch.ao's
    dynamic quantization (activations per batch) with per-channel weights, per-tensor weights
    (its default), and per-channel after smoothing (calibrated on 256 training texts of `domain`).

    Returns {"accuracy": per domain and variant, "speed": ms per batch and ratio, "size": bytes}.
    """
    variants = {"fp32 merged": C.merged_plain(model, inplace=False).eval(),
                "int8 per-token (ours)": C.quantize_int8(model),
                "ao per-channel": C.quantize_int8(model, backend="ao"),
                "ao per-tensor": C.quantize_int8(model, backend="ao", per_channel=False),
                "ao smoothed": C.quantize_int8(model, backend="ao", alpha=alpha,
                                               calibration=calibration_batches(tokenizer, domain))}
    rows = []
    for name, m in tqdm(variants.items(), desc="int8 accuracy", disable=not progress):
        acc = evaluate_domains(m, tokenizer, domains, n_eval=n_eval)
        rows.append(acc.assign(variant=name))
    accuracy = pd.concat(rows, ignore_index=True)
    speed = compare_latency(variants, latency_batch(tokenizer, batch_size=batch_size), repeats=repeats)
    speed["speedup vs fp32"] = (speed["ms per batch"].iloc[0] / speed["ms per batch"]).round(2)
    fp32_file, int8_file = C.file_size(variants["fp32 merged"]), C.file_size(variants["int8 per-token (ours)"], int8=True)
    size = pd.DataFrame([{"variant": "fp32 merged", "file bytes": fp32_file},
                         {"variant": "bf16 (computed)", "file bytes": C.model_size(variants["fp32 merged"], "bf16")},
                         {"variant": "int8 per-token (ours)", "file bytes": int8_file}])
    size["vs fp32"] = (size["file bytes"] / fp32_file).round(3)
    return {"accuracy": accuracy, "speed": speed, "size": size}


class PinnedKernel(nn.Module):
    """`model` run with every Int8Linear on one kernel (to set two int8 kernels side by side)."""

    def __init__(self, model: nn.Module, kernel: str):
        super().__init__()
        self.model, self.kernel = model, kernel

    def forward(self, *args, **kwargs):
        with C.using_int8_kernel(self.kernel):
            return self.model(*args, **kwargs)


PRECISION_LABELS = {"fp32": "fp32 (LoRA merged)", "bf16-autocast": "bf16 autocast", "bf16-weights": "bf16 weights",
                    "int8 v1": "int8, first Int8Linear", "int8": "int8 (Int8Linear now)"}


def precision_study(model, tokenizer, domains=None, n_eval: int | None = None, repeats: int = 20,
                    batch_size: int = 32, domain: str = "movies", n_calibration: int = 256,
                    progress: bool = True, cache=False) -> dict:
    """fp32, bf16 (both forms, where the CPU has bf16), int8 (the first Int8Linear's kernel and
    today's) and "auto" (`optimize_for_inference` on `n_calibration` training texts of `domain`),
    measured in one run: ms per batch of `batch_size` real test texts (interleaved repeats,
    medians; thread CPU time at one thread, else wall time) and accuracy on every domain.

    Returns {"speed", "accuracy" (per domain, in %, with each precision's drop against fp32),
    "choice" (auto's PrecisionChoice), "env" (the CPU, its flags and family, threads, torch, clock)}.
    """
    from .. import runtime
    from ..compress import precision as P
    ok, why = P.bf16_support("cpu")
    variants = {"fp32": P.build(model, "fp32")}
    if ok:
        variants["bf16-autocast"] = P.build(model, "bf16-autocast")
        variants["bf16-weights"] = P.build(model, "bf16-weights")
    int8 = P.build(model, "int8")
    if C.int8_kernel() != "int_mm_v1" and C._HAS_INT_MM:
        variants["int8 v1"] = PinnedKernel(int8, "int_mm_v1").eval()
    variants["int8"] = int8
    calibration = sample_rows(split(load_corpus(domain), seed=0)["train"], n_calibration, 0).text.tolist()
    auto = C.optimize_for_inference(model, "auto", calibration=calibration, tokenizer=tokenizer, cache=cache,
                                    batch_size=batch_size, verbose=False)
    choice = auto.inference_precision
    ms = P.time_models(variants, [latency_batch(tokenizer, batch_size=batch_size)], repeats=repeats)
    rows = []
    for name, m in tqdm(variants.items(), desc="precision accuracy", disable=not progress):
        rows.append(evaluate_domains(m, tokenizer, domains, n_eval=n_eval).assign(precision=name))
    accuracy = pd.concat(rows, ignore_index=True)
    wide = accuracy.pivot(index="domain", columns="precision", values="accuracy")[list(variants)] * 100
    speed = pd.DataFrame([{"precision": n, "what": PRECISION_LABELS[n], "ms per batch": ms[n],
                           "speed-up vs fp32": ms["fp32"] / ms[n],
                           "worst drop on a domain (pt)": float((wide["fp32"] - wide[n]).max())} for n in variants])
    speed = pd.concat([speed, pd.DataFrame([{
        "precision": "auto", "what": f"auto's choice: {choice.precision}", "ms per batch": ms[choice.precision],
        "speed-up vs fp32": ms["fp32"] / ms[choice.precision],
        "worst drop on a domain (pt)": float((wide["fp32"] - wide[choice.precision]).max())}])], ignore_index=True)
    if not ok:
        speed = pd.concat([speed, pd.DataFrame([{"precision": "bf16", "what": f"skipped: {why}"}])], ignore_index=True)
    for n in [c for c in wide.columns if c != "fp32"]:
        wide[f"{n} drop (pt)"] = wide["fp32"] - wide[n]
    env = {"cpu": runtime.cpu_name(), "cpu_family": runtime.cpu_family(), "cpu_flags": runtime.cpu_summary(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "clock": P.clock()[1],
           "int8_kernel": C.int8_backend(), "batch_size": batch_size, "repeats": repeats,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    return {"speed": speed, "accuracy": wide.round(2), "choice": choice, "env": env}


def precision_figure(study: dict):
    """Speed-up against fp32 and the worst accuracy drop on a domain, per precision."""
    _, go, make_subplots, template = _figures()
    sp = study["speed"].dropna(subset=["ms per batch"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"speed-up vs fp32 ({study['env']['cpu']})",
                                                         "worst accuracy drop on a domain (pt)"))
    fig.add_trace(go.Bar(x=sp["what"], y=sp["speed-up vs fp32"], showlegend=False, marker_color="#555",
                         text=sp["speed-up vs fp32"].round(2)), 1, 1)
    fig.add_trace(go.Bar(x=sp["what"], y=sp["worst drop on a domain (pt)"], showlegend=False, marker_color="#999",
                         text=sp["worst drop on a domain (pt)"].round(2)), 1, 2)
    fig.update_yaxes(title_text="speed-up (x)", row=1, col=1)
    fig.update_yaxes(title_text="points below fp32", row=1, col=2)
    fig.update_layout(template=template, height=420)
    return fig


def accuracy_drop(accuracy: pd.DataFrame, reference: str = "fp32 merged") -> pd.DataFrame:
    """Accuracy per domain (rows) and variant (columns), in points, with each variant's drop."""
    wide = accuracy.pivot(index="domain", columns="variant", values="accuracy") * 100
    for v in [c for c in wide.columns if c != reference]:
        wide[f"{v} drop (pt)"] = wide[reference] - wide[v]
    return wide.round(2)


def bits_study(model, tokenizer, bits=(8, 6, 4, 3, 2), domain: str = "movies", n_eval: int | None = None,
               progress: bool = True) -> pd.DataFrame:
    """Accuracy of the merged model with every Linear rounded to each width, per tensor and per channel."""
    rows = []
    grid = [(b, pc) for b in bits for pc in (False, True)]
    for b, pc in tqdm(grid, desc="bits", disable=not progress):
        m = C.simulate_kbit(model, b, per_channel=pc)
        r = evaluate_domains(m, tokenizer, [domain], n_eval=n_eval).iloc[0]
        rows.append({"bits": b, "scheme": "per-channel" if pc else "per-tensor", "accuracy": r.accuracy,
                     "f1_macro": r.f1_macro, "weight_rel_err": C.quantization_error(model, b, pc).rel_err.iloc[-1]})
    return pd.DataFrame(rows)


def order_study(model, tokenizer, bits: int = 4, domain: str = "movies", n_eval: int | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Accuracy of the three merge/quantize orders at `bits`, beside the float model."""
    rows = [{"order": "float (no quantization)", **_acc(model, tokenizer, domain, n_eval)}]
    for order in tqdm(C.ORDERS, desc="orders", disable=not progress):
        rows.append({"order": order, **_acc(C.quantized_with_lora(model, bits, order), tokenizer, domain, n_eval)})
    df = pd.DataFrame(rows)
    err = C.merge_order_errors(model, bits).groupby("order")[["rel_err", "err_vs_update"]].mean()
    return df.merge(err, left_on="order", right_index=True, how="left")


def encoder_only(model: nn.Module) -> list[str]:
    """What global pruning leaves alone: the task head and the pooler. Ranked by magnitude against the encoder's
    weights, MiniLM's pooler (mean |w| 0.007, a tenth of a query's 0.074) went first and whole: at 60% global
    sparsity it was all zeros, every text got one pooled vector, and the model answered one class."""
    head = C.common.skip_prefix(model, "head")
    return head + [n for n, _ in model.named_modules() if n.split(".")[-1] == "pooler"]


def pruning_study(model, tokenizer, amounts=(0.1, 0.3, 0.5, 0.7), domain: str = "movies",
                  n_eval: int | None = None, repeats: int = 10, progress: bool = True) -> pd.DataFrame:
    """Accuracy and latency after unstructured (global, over the encoder's Linears: `encoder_only`) pruning and
    after shrinking the FFN."""
    dense = C.merged_plain(model, inplace=False).eval()
    keep = encoder_only(dense)
    batch = latency_batch(tokenizer)
    rows, models = [], {"dense": dense}
    grid = [(kind, a) for a in amounts for kind in ("unstructured", "ffn neurons")]
    for kind, a in tqdm(grid, desc="pruning", disable=not progress):
        if kind == "unstructured":
            m = C.make_permanent(C.prune_unstructured(dense, a, scope="global", skip=keep))
        else:
            m = C.shrink_ffn(dense, a)
        name = f"{kind} {a:.0%}"
        models[name] = m.eval()
        r = evaluate_domains(m, tokenizer, [domain], n_eval=n_eval).iloc[0]
        rows.append({"variant": name, "kind": kind, "amount": a, "accuracy": r.accuracy, "f1_macro": r.f1_macro,
                     "sparsity": C.sparsity_report(m).sparsity.iloc[-1], "params": sum(p.numel() for p in m.parameters())})
    r = evaluate_domains(dense, tokenizer, [domain], n_eval=n_eval).iloc[0]
    rows.insert(0, {"variant": "dense", "kind": "dense", "amount": 0.0, "accuracy": r.accuracy, "f1_macro": r.f1_macro,
                    "sparsity": C.sparsity_report(dense).sparsity.iloc[-1], "params": sum(p.numel() for p in dense.parameters())})
    speed = compare_latency(models, batch, repeats=repeats).rename(columns={"model": "variant"})
    out = pd.DataFrame(rows).merge(speed[["variant", "ms per batch"]], on="variant")
    out["speedup vs dense"] = (out["ms per batch"].iloc[0] / out["ms per batch"]).round(2)
    return out


def _acc(model, tokenizer, domain, n_eval) -> dict:
    r = evaluate_domains(model, tokenizer, [domain], n_eval=n_eval).iloc[0]
    return {"accuracy": r.accuracy, "f1_macro": r.f1_macro}


def qlora_study(lora_row: dict, qlora_row: dict, ptq_accuracy: float) -> pd.DataFrame:
    """The QLoRA question in one table: a LoRA on the float base, the same LoRA rounded after
    training (post-training quantization), and a LoRA trained on the rounded base."""
    df = pd.DataFrame([
        {"setting": "LoRA on float base", "accuracy": lora_row["accuracy"], "f1_macro": lora_row["f1_macro"]},
        {"setting": f"float LoRA, then base rounded to {qlora_row['spec']['base_bits']} bits",
         "accuracy": ptq_accuracy, "f1_macro": float("nan")},
        {"setting": f"LoRA trained on {qlora_row['spec']['base_bits']}-bit base (QLoRA-style)",
         "accuracy": qlora_row["accuracy"], "f1_macro": qlora_row["f1_macro"]},
    ])
    lost = lora_row["accuracy"] - ptq_accuracy
    df["share of the rounding loss recovered"] = [float("nan"), 0.0,
                                                  (qlora_row["accuracy"] - ptq_accuracy) / lost if lost > 0 else float("nan")]
    return df


# --------------------------------------------------------------------------- figures

def _figures():
    return px, go, make_subplots, TEMPLATE


def bits_figure(df: pd.DataFrame):
    """Accuracy against bits, one line per scheme (from `bits_study`)."""
    _, go, _, template = _figures()
    fig = go.Figure()
    for i, (scheme, g) in enumerate(df.sort_values("bits").groupby("scheme", sort=False)):
        fig.add_trace(go.Scatter(x=g.bits, y=g.accuracy, name=scheme, mode="lines+markers",
                                 line=dict(color=QUANTITY_COLORS[i % len(QUANTITY_COLORS)]),
                                 customdata=g[["f1_macro", "weight_rel_err"]].to_numpy(),
                                 hovertemplate="%{x} bits<br>accuracy %{y:.1%}<br>F1 %{customdata[0]:.3f}"
                                               "<br>weight error %{customdata[1]:.3g}<extra>" + scheme + "</extra>"))
    fig.update_layout(template=template, height=380, title="Accuracy after rounding every weight",
                      xaxis=dict(dtick=1, autorange="reversed", title_text="bits per weight"))
    fig.update_yaxes(title_text="accuracy", tickformat=".0%", range=accuracy_range(df.accuracy))
    return fig


def int8_figure(study: dict):
    """Three panels: accuracy per domain, speed-up, and file size, fp32 against int8."""
    _, go, make_subplots, template = _figures()
    fig = make_subplots(rows=1, cols=3, subplot_titles=("test accuracy per domain", "speed-up vs fp32 (batch 32)",
                                                         "file size vs fp32"), column_widths=[0.5, 0.25, 0.25])
    colour = {}  # one colour per variant in all three panels; a variant with no accuracy bar (bf16) is grey
    for i, (v, g) in enumerate(study["accuracy"].groupby("variant", sort=False)):
        colour[v] = QUANTITY_COLORS[i % len(QUANTITY_COLORS)]
        fig.add_trace(go.Bar(x=g.domain, y=g.accuracy, name=v, marker_color=colour[v],
                             hovertemplate="%{x}: %{y:.1%}<extra>" + str(v) + "</extra>"), 1, 1)
    sp = study["speed"]
    fig.add_trace(go.Bar(x=sp.model, y=sp["speedup vs fp32"], showlegend=False,
                         marker_color=[colour.get(m, NEUTRAL) for m in sp.model],
                         text=[f"{v:.2f}x" for v in sp["speedup vs fp32"]], hovertemplate="%{x}: %{y:.2f}x<extra></extra>"), 1, 2)
    sz = study["size"]
    fig.add_trace(go.Bar(x=sz.variant, y=sz["vs fp32"], showlegend=False, marker_color=[colour.get(m, NEUTRAL) for m in sz.variant],
                         text=[f"{v:.2f}x" for v in sz["vs fp32"]], hovertemplate="%{x}: %{y:.2f}x<extra></extra>"), 1, 3)
    fig.update_yaxes(tickformat=".0%", range=accuracy_range(study["accuracy"].accuracy, bars=True), title_text="accuracy",
                     row=1, col=1)
    fig.update_yaxes(title_text="speed-up (x)", row=1, col=2)
    fig.update_yaxes(title_text="size (x fp32)", row=1, col=3)
    fig.update_layout(template=template, height=420, barmode="group")
    return fig


def orders_figure(df: pd.DataFrame, qlora: pd.DataFrame | None = None):
    """Accuracy of the merge/quantize orders (and the QLoRA-style settings, when given)."""
    _, go, make_subplots, template = _figures()
    cols = 2 if qlora is not None else 1
    fig = make_subplots(rows=1, cols=cols, subplot_titles=("merge and quantize: the order", "training on the rounded base")[:cols])
    fig.add_trace(go.Bar(x=df.order, y=df.accuracy, showlegend=False, text=[f"{a:.1%}" for a in df.accuracy],
                         marker_color=QUANTITY_COLORS[0], hovertemplate="%{x}: %{y:.1%}<extra></extra>"), 1, 1)
    accs = list(df.accuracy)
    if qlora is not None:
        fig.add_trace(go.Bar(x=qlora.setting, y=qlora.accuracy, showlegend=False, text=[f"{a:.1%}" for a in qlora.accuracy],
                             marker_color=QUANTITY_COLORS[1], hovertemplate="%{x}: %{y:.1%}<extra></extra>"), 1, 2)
        accs += list(qlora.accuracy)
    fig.update_yaxes(title_text="movies test accuracy", tickformat=".0%", range=accuracy_range(accs, bars=True))
    fig.update_layout(template=template, height=440)
    return fig


# unstructured pruning and FFN shrinking: one colour each, in both panels and in the legend
PRUNING_COLORS = {"unstructured": QUANTITY_COLORS[0], "ffn neurons": QUANTITY_COLORS[1]}


def pruning_figure(df: pd.DataFrame):
    """Accuracy and speed-up against the amount pruned, unstructured against FFN neurons: one
    colour per kind in both panels, the legend naming each kind once, and the dense model's
    speed (1x) as a reference line."""
    _, go, make_subplots, template = _figures()
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "speed-up vs dense (batch 32)"))
    dense = df[df.kind == "dense"].iloc[0]
    for i, (kind, g) in enumerate(df[df.kind != "dense"].groupby("kind", sort=False)):
        g = pd.concat([pd.DataFrame([dense]), g]).sort_values("amount")
        color = PRUNING_COLORS.get(kind, QUANTITY_COLORS[(i + 2) % len(QUANTITY_COLORS)])
        fig.add_trace(go.Scatter(x=g.amount, y=g.accuracy, name=kind, mode="lines+markers", legendgroup=kind,
                                 line=dict(color=color), hovertemplate="%{x:.0%} pruned: %{y:.1%}<extra>" + kind + "</extra>"),
                      1, 1)
        fig.add_trace(go.Scatter(x=g.amount, y=g["speedup vs dense"], name=kind, mode="lines+markers",
                                 legendgroup=kind, showlegend=False, line=dict(color=color),
                                 hovertemplate="%{x:.0%} pruned: %{y:.2f}x<extra>" + kind + "</extra>"), 1, 2)
    fig.add_hline(y=1.0, line=dict(color=NEUTRAL, dash="dot"), row=1, col=2,
                  annotation_text="dense", annotation_position="bottom right")
    fig.update_xaxes(title_text="fraction pruned", tickformat=".0%")
    fig.update_yaxes(title_text="accuracy", tickformat=".0%", range=accuracy_range(df.accuracy), row=1, col=1)
    fig.update_yaxes(title_text="speed-up (x)", row=1, col=2)
    fig.update_layout(template=template, height=400, legend=dict(title_text="pruned"))
    return fig
