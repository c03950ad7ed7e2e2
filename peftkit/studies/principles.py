"""Why low-rank updates and small bottlenecks work, measured on the real MiniLM (notebook 01).

LoRA (Hu et al., 2021, section 4.1) keeps the pretrained weight W0 frozen and learns

    W = W0 + B A,       B: (out, r), A: (r, in),   r(in + out) parameters instead of in * out,

on the hypothesis that the change a fine-tune makes to W has a low "intrinsic rank"
(section 7 of the paper; Aghajanyan et al., 2020). We test that on a real update: fine-tune
every weight for a few hundred steps, take dW = W - W0 and its singular values s_1 >= s_2 >= ...
By Eckart-Young the best rank-r approximation of dW keeps the fraction

    E(r) = (s_1^2 + ... + s_r^2) / (s_1^2 + ... + s_n^2)

of its squared Frobenius norm: the "energy" a rank-r LoRA could at best capture. A Gaussian
matrix with the same shape and norm has no preferred directions, so its E(r) is the baseline
that "low rank" must beat.

A bottleneck adapter (Houlsby et al., 2019, section 2.1) on a stream of width d with bottleneck
m computes x + up(act(down(x))) and costs 2 d m + d + m parameters (two matrices, two biases).
"""

from __future__ import annotations

import copy
import math
import time

import pandas as pd
import torch
from plotly.subplots import make_subplots

from ..bases.models import load_base
from ..core.methods import FullFineTune, LoRA
from ..core.surgery import apply, report
from ..data import load_corpus, sample_rows, split
from ..data.loaders import make_loaders
from ..layers.lora import LoRALinear
from ..training.loop import TrainConfig, fit

MODULES = ("query", "key", "value")  # the attention projections of a BERT layer


def lora_params(in_features: int, out_features: int, r: int) -> int:
    """r (in + out): A is (r, in) and B is (out, r); LoRA adds no bias."""
    return r * (in_features + out_features)


def adapter_params(hidden: int, size: int) -> int:
    """2 d m + d + m: down is (m, d) plus bias m, up is (d, m) plus bias d."""
    return 2 * hidden * size + hidden + size


def linear_params(in_features: int, out_features: int) -> int:
    """in * out + out: an nn.Linear's weight and bias."""
    return in_features * out_features + out_features


# --- 1. the parameter formula against the package ------------------------------------------

def lora_count_check(model=None, r: int = 8, targets=("query", "value")) -> pd.DataFrame:
    """Per LoRA layer of MiniLM: r(in+out) by the formula beside what `peftkit.report` counts.

    Args:
        model: a base model to copy (it is not changed); None loads MiniLM.
    Returns:
        module, in, out, r, formula, report, match; attrs hold the model's totals.
    """

    model = load_base("minilm")[0] if model is None else copy.deepcopy(model)
    apply(model, LoRA(r=r, targets=targets))
    rep = report(model).set_index("module")
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            # report's row for a wrapped layer counts W0 too, but only A and B are trainable.
            rows.append({"module": name, "in": m.in_features, "out": m.out_features, "r": r,
                         "formula": lora_params(m.in_features, m.out_features, r),
                         "report": int(rep.loc[name, "trainable"])})
    df = pd.DataFrame(rows)
    df["match"] = df["formula"] == df["report"]
    total = rep.loc["TOTAL"]
    df.attrs.update(trainable=int(total["trainable"]), total=int(total["total"]),
                    lora=int(df["report"].sum()))
    return df


# --- 2. the spectrum of a weight update -----------------------------------------------------

def _energy(s: torch.Tensor) -> torch.Tensor:
    """Cumulative fraction of sum(s^2) held by the first k singular values, k = 1..n."""
    e = torch.cumsum(s.double() ** 2, 0)
    return e / e[-1].clamp_min(torch.finfo(torch.float64).tiny)


def spectrum_table(delta: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    """Singular values and cumulative energy of `delta` beside a random matrix of equal norm.

    The random matrix is Gaussian with the shape of `delta`, rescaled to the same Frobenius
    norm, so both rows of the table share one scale and only the *shape* of the spectrum differs.
    Returns columns k, sv_update, energy_update, sv_random, energy_random (k = 1..min(shape)).
    """
    if delta.ndim != 2:
        raise ValueError(f"spectrum_table takes a 2-D weight update, got shape {tuple(delta.shape)}.")
    d = delta.detach().to("cpu", torch.float64)
    norm = torch.linalg.matrix_norm(d)
    if norm == 0:
        raise ValueError("the weight update is all zeros: did the layer train? Check that it "
                         "requires grad and that the run took at least one step.")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(d.shape, generator=g, dtype=torch.float64)
    noise *= norm / torch.linalg.matrix_norm(noise)
    s_upd, s_rnd = torch.linalg.svdvals(d), torch.linalg.svdvals(noise)
    df = pd.DataFrame({"k": range(1, len(s_upd) + 1),
                       "sv_update": s_upd.numpy(), "energy_update": _energy(s_upd).numpy(),
                       "sv_random": s_rnd.numpy(), "energy_random": _energy(s_rnd).numpy()})
    df.attrs.update(shape=tuple(d.shape), frobenius=float(norm))
    return df


def energy_at(df: pd.DataFrame, r: int, which: str = "update") -> float:
    """The fraction of squared Frobenius norm in the top-r directions ("update" or "random")."""
    col = f"energy_{which}"
    if col not in df:
        raise ValueError(f"which must be 'update' or 'random', got {which!r}.")
    if not 1 <= r <= len(df):
        raise ValueError(f"r must be between 1 and {len(df)} (the matrix's smaller side), got {r}.")
    return float(df[col].iloc[r - 1])


def rank_for_energy(df: pd.DataFrame, fraction: float = 0.9, which: str = "update") -> int:
    """The smallest k whose top-k directions hold at least `fraction` of the energy."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    col = df[f"energy_{which}"]
    return int(df["k"][col >= fraction - 1e-12].iloc[0])


def weight_name(layer: int, module: str) -> str:
    if module not in MODULES:
        raise ValueError(f"module must be one of {list(MODULES)}, got {module!r}.")
    return f"bert.encoder.layer.{layer}.attention.self.{module}.weight"


def update_spectrum(steps: int = 300, layer: int = 0, module: str = "query", n_train: int = 4000,
                    lr: float = 2e-5, batch_size: int = 32, seed: int = 0,
                    progress: bool = False) -> pd.DataFrame:
    """Fully fine-tune MiniLM on the movies corpus, then take the spectrum of one weight's update.

    Every weight trains (not a LoRA): we want the update gradient descent finds when nothing
    forces it to be low-rank. Returns `spectrum_table(W - W0)`; attrs also hold the weight's
    name, the steps taken, the first and last training loss and the seconds it took.
    """

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    name = weight_name(layer, module)  # checks `module` before the slow part
    t0 = time.perf_counter()
    model, tok = load_base("minilm", seed=seed)
    n_layers = model.config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in 0..{n_layers - 1} (MiniLM has {n_layers}), got {layer}.")
    apply(model, FullFineTune())
    w0 = model.get_parameter(name).detach().to("cpu", copy=True)

    train = split(load_corpus("movies"), seed=seed)["train"]
    train = sample_rows(train, n_train, seed)  # smaller tokenising cost
    loaders = make_loaders(tok, {"train": train}, batch_size=batch_size, seed=seed)
    # epochs is large enough that max_steps, not the epoch count, ends the run.
    epochs = -(-steps * batch_size // len(train))
    hist = fit(model, loaders["train"], None, TrainConfig(
        epochs=max(1, epochs), lr=lr, batch_size=batch_size, max_steps=steps, seed=seed,
        progress=progress))

    df = spectrum_table(model.get_parameter(name).detach().cpu() - w0, seed=seed)
    df.attrs.update(weight=name, steps=int(hist["step"].iloc[-1]), n_train=len(train),
                    loss_first=float(hist["loss"].iloc[0]),
                    loss_last=float(hist["loss"].tail(10).mean()),  # smoothed: one batch is noisy
                    seconds=time.perf_counter() - t0)
    return df


# --- 3. figures ----------------------------------------------------------------------------

def spectrum_figure(df: pd.DataFrame, r: int = 8):
    """Two panels: singular values and cumulative energy against rank k, update against random.

    Both x axes are logarithmic: the top few directions, where LoRA lives, would otherwise be
    squeezed against the left edge of a 384-wide axis.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "singular values s<sub>k</sub>", "energy held by the top-k directions"))
    styles = {"update": dict(color="#1f77b4"), "random": dict(color="#7f7f7f", dash="dot")}
    label = {"update": "fine-tuning update", "random": "random, same norm"}
    for which, line in styles.items():
        fig.add_scatter(x=df["k"], y=df[f"sv_{which}"], name=label[which], line=line,
                        legendgroup=which, row=1, col=1)
        fig.add_scatter(x=df["k"], y=df[f"energy_{which}"], name=label[which], line=line,
                        legendgroup=which, showlegend=False, row=1, col=2)
    # The marker for r is a trace, not a shape: shapes on log axes take log10 coordinates.
    fig.add_scatter(x=[r, r], y=[0, 1], mode="lines", name=f"LoRA rank r = {r}",
                    line=dict(color="#d62728", dash="dash"), row=1, col=2)
    e = energy_at(df, r)
    fig.add_annotation(x=math.log10(r), y=e, text=f"r = {r}: {e:.0%}", showarrow=True, arrowhead=2,
                       ax=-60, ay=40 if e > 0.8 else -30, row=1, col=2)  # stay clear of the title
    fig.update_xaxes(type="log", title_text="k (rank)")
    fig.update_yaxes(type="log", dtick=1, exponentformat="power", title_text="singular value",
                     row=1, col=1)  # dtick=1: one label per decade
    fig.update_yaxes(title_text="fraction of ‖ΔW‖<sub>F</sub><sup>2</sup>", range=[0, 1.02], row=1, col=2)
    title = df.attrs.get("weight", "a weight update")
    fig.update_layout(title=f"Spectrum of ΔW = W − W<sub>0</sub> for {title}", height=420,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def energy_table(df: pd.DataFrame, ranks=(1, 2, 4, 8, 16, 32, 64)) -> pd.DataFrame:
    """E(r) for the update and for the random matrix at a few ranks (those that fit the shape)."""
    ranks = [r for r in ranks if r <= len(df)]
    return pd.DataFrame({"r": ranks,
                         "update": [energy_at(df, r) for r in ranks],
                         "random": [energy_at(df, r, "random") for r in ranks]})
