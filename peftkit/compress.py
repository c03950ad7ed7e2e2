"""Compression: real int8 inference, simulated k-bit quantization, merge/quantize order, pruning.

Every function here leaves its input alone and returns a compressed copy (``inplace=True`` to
skip the copy), so a fine-tuned model is never lost to an experiment.

**Real int8 (`quantize_int8`).** LoRA layers are merged first (a merged LoRA is a plain Linear),
then every Linear but the task head runs int8 GEMMs. Paths measured on MiniLM fine-tuned on
movies (batch 32, 2 threads; the issue's table, notebook 05 and `benchmarks/bench_compress.py`):

* ``torch.ao.quantization.quantize_dynamic`` (fbgemm int8 kernels): 2.0-2.9x faster than fp32.
  It quantizes the activations with **one scale per batch**, so a text's prediction depends on
  the other texts in its batch (their outliers, their padding). Measured: up to 1.0 point lost
  on a domain with per-channel weights at batch 64 and 0.7 at batch 8; with per-tensor weights
  (its default) 4.3 points on tweets. Smoothing the activations first (`smooth`, SmoothQuant's
  idea) helped or hurt by up to 2.4 points depending on the calibration sample. PyTorch also
  marks the API deprecated.
* torchao 0.18: int8 dynamic activations gave no gain on this CPU, int8 weight-only about 1.1x.
* **Ours, `Int8Linear` (the default):** weights per output row, activations quantized **per
  token**, and ``torch._int_mm`` for the int8 GEMM (exact int32 accumulation). 1.9x faster than
  fp32 here, within half a point on every domain, and a text's answer does not depend on its
  batch (tested). It needs no deprecated API; where ``torch._int_mm`` is missing, or a call
  has 16 rows or fewer, it multiplies the dequantized weights in float instead (correct, slower).

``backend="ao"`` keeps the torch.ao path for comparison (its deprecation warning silenced: it is
about the API, not the numbers) and raises a clear error once PyTorch has removed it.

**Simulated k-bit (`fake_quantize`, `simulate_kbit`).** Symmetric round-to-nearest for 2 to 8
bits, one scale per tensor (the article's) or per output channel. It runs in float: it shows the
accuracy cost of a format, not its speed.

**Merge and quantize order.** With a quantized base, merging a LoRA means dequantize, add the
update, requantize (`merge_into_quantized`): the update is rounded into the base's grid, and
small updates vanish. `merge_order_errors` measures each order against the exact W + sBA.

**Pruning.** `torch.nn.utils.prune` masks for unstructured (global or per layer) and row pruning,
`make_permanent` to bake the masks in, and `shrink_ffn`, which physically removes feed-forward
neurons. Only the last makes a dense CPU matmul faster: a zero is multiplied like any number.
"""

from __future__ import annotations

import copy
import re
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import prune

from .io import AdapterFileError, read_tensors, write_tensors
from .lora import LoRALinear
from .names import is_adapter_param
from .surgery import find_head, lora_layers, unload

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def _copy(model: nn.Module, inplace: bool) -> nn.Module:
    return model if inplace else copy.deepcopy(model)


def _skip_prefix(model: nn.Module, skip) -> list[str]:
    if skip == "head":
        head = find_head(model)
        return [head] if head else []
    return list(skip or [])


def linear_layers(model: nn.Module, skip="head") -> dict[str, nn.Linear]:
    """Every plain nn.Linear outside `skip` ("head": the task head; or a list of module names)."""
    prefixes = _skip_prefix(model, skip)
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear
            and not any(n == p or n.startswith(p + ".") for p in prefixes)}


def _merged_plain(model: nn.Module, inplace: bool) -> nn.Module:
    model = _copy(model, inplace)
    if lora_layers(model):
        unload(model)  # merge every LoRA and drop the wrappers: plain Linears with the same outputs
    return model


# --------------------------------------------------------------------------- sizes

def model_size(model: nn.Module, dtype: str = "fp32", skip="head") -> int:
    """Bytes the model's tensors take on disk when stored as `dtype` ("fp32", "bf16", "fp16", "int8").

    int8 stores each Linear weight (outside `skip`) as one byte per entry plus one fp32 scale per
    output row, as `save_int8` writes it; everything else (embeddings, norms, biases) stays fp32.
    For a model already quantized by `quantize_int8`, dtype is ignored and its real storage counted.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPE_BYTES)}.")
    quantized = {n: m for n, m in model.named_modules() if _is_int8_module(m)}
    if quantized:
        return sum(t.numel() * t.element_size() for t in _int8_state(model).values())
    if dtype != "int8":
        return sum(t.numel() for t in model.state_dict().values()) * DTYPE_BYTES[dtype]
    lins = linear_layers(model, skip)
    total = sum(t.numel() * 4 for t in model.state_dict().values())
    for m in lins.values():
        total -= m.weight.numel() * 3 - m.out_features * 4  # 4 -> 1 byte per weight, plus row scales
    return total


# --------------------------------------------------------------------------- real int8

def _ao_dynamic():
    """torch.ao's dynamic quantization entry points, or None where this PyTorch no longer has them."""
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    except ImportError:
        return None
    return quantize_dynamic, per_channel_dynamic_qconfig, DynamicLinear


_HAS_INT_MM = hasattr(torch, "_int_mm")


def int8_backend() -> str:
    """What `quantize_int8`'s default path runs on this PyTorch."""
    return "peftkit Int8Linear, torch._int_mm" if _HAS_INT_MM else "peftkit Int8Linear, float fallback"


def _row_scale(w: torch.Tensor, qmax: int) -> torch.Tensor:
    return (w.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(torch.finfo(torch.float32).tiny)


class Int8Linear(nn.Module):
    """A Linear in int8: weights per output row, activations per token, ``torch._int_mm``.

    Each token's activation row gets its own scale, so no token's rounding depends on another's:
    a text gets the same answer alone or in any batch. The int8 GEMM accumulates exactly in int32.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = _row_scale(w, 127)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale.squeeze(1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        # _int_mm wants more than 16 rows and sizes that are multiples of 8: else use the float path.
        if _HAS_INT_MM and x2.shape[0] > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0:
            xs = _row_scale(x2, 127)
            xq = torch.round(x2 / xs).clamp(-127, 127).to(torch.int8)
            y = torch._int_mm(xq, self.weight_int8.t()).float() * xs * self.weight_scale
        else:
            y = x2 @ self.dequantized_weight().t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def _is_int8_module(m: nn.Module) -> bool:
    if isinstance(m, Int8Linear):
        return True
    ao = _ao_dynamic()
    return ao is not None and isinstance(m, ao[2])


class Smoothed(nn.Module):
    """``inner(x * inv_scale)``: a Linear whose input channels were rescaled before quantization.

    SmoothQuant's idea (Xiao et al., 2022): a few input channels carry most of an activation's
    range, and with one activation scale per batch they leave the other channels only a few int8
    levels. Dividing channel j of the input by s_j and multiplying column j of W by s_j changes
    nothing in exact arithmetic, and moves the range from the activations (quantized per batch)
    to the weights (quantized per output row, where it is cheap). BERT normalizes *after* the
    residual add, so 1/s cannot be folded into the LayerNorm: it stays here, as one
    multiply per input element, small beside the GEMM.
    """

    def __init__(self, inner: nn.Module, inv_scale: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("inv_scale", inv_scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.inv_scale.to(x.dtype))


@torch.no_grad()
def input_absmax(model: nn.Module, calibration, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |x| each of `layers` sees over the calibration batches."""
    stats, hooks = {}, []
    for name, m in layers.items():
        def hook(mod, inp, out, name=name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().amax(0).float()
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in calibration:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not stats:
        raise ValueError("the calibration data gave no batches: pass a few batches of model inputs.")
    return stats


def smooth(model: nn.Module, calibration, alpha: float = 0.8, skip="head", inplace: bool = False) -> nn.Module:
    """Wrap every Linear outside `skip` in `Smoothed`, with s_j = max|x_j|^alpha / max|W_j|^(1-alpha).

    calibration: an iterable of model-input dicts (a few hundred real examples is plenty).
    alpha: how much of the activation range moves to the weights (0: none, 1: all). 0.8 kept
    MiniLM within a point of fp32 on every domain (notebook 05; 0.5, SmoothQuant's default for
    large LMs, did not).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must lie in [0, 1].")
    model = _merged_plain(model, inplace)
    layers = linear_layers(model, skip)
    stats = input_absmax(model, calibration, layers)
    from .targets import replace_module
    with torch.no_grad():
        for name, lin in layers.items():
            if name not in stats:
                continue  # never reached by the calibration data: left as it is
            w_max = lin.weight.detach().abs().amax(0).float().clamp_min(1e-5)
            s = (stats[name].clamp_min(1e-5) ** alpha / w_max ** (1 - alpha)).clamp_min(1e-5)
            lin.weight.mul_(s.to(lin.weight.dtype))
            replace_module(model, name, Smoothed(lin, 1.0 / s))
    return model


def quantize_int8(model: nn.Module, skip="head", inplace: bool = False, backend: str = "int_mm",
                  per_channel: bool = True, calibration=None, alpha: float = 0.8) -> nn.Module:
    """An int8 copy of `model` for CPU inference: LoRA merged, every Linear outside `skip` in int8.

    backend: "int_mm" (default: `Int8Linear`, weights per output row, activations per token) or
    "ao" (torch.ao dynamic quantization, activations per batch; see the module docstring).
    per_channel=False (ao only) gives torch.ao's default, one weight scale per tensor.
    calibration: a few batches of model inputs; when given, input channels are first rescaled
    into the weights (`smooth`, with `alpha`). Bottleneck adapters stay as modules; their
    Linears are quantized too. skip: "head", or module names to keep in float.
    """
    if backend not in ("ao", "int_mm"):
        raise ValueError(f"backend={backend!r} is not one of 'int_mm', 'ao'.")
    model = _merged_plain(model, inplace).eval()
    if calibration is not None:
        smooth(model, calibration, alpha, skip, inplace=True)
    targets = linear_layers(model, skip)
    if not targets:
        raise ValueError("this model has no nn.Linear outside the skipped modules: nothing to quantize.")
    ao = _ao_dynamic()
    if backend == "ao" and ao is None:
        raise RuntimeError("this PyTorch has no torch.ao.quantization.quantize_dynamic any more; "
                           "use backend='int_mm' (the default).")
    if not per_channel and backend == "int_mm":
        raise ValueError("per_channel=False exists to compare with torch.ao's default; the int_mm path is per channel only.")
    if backend == "ao":
        quantize_dynamic, qconfig, _ = ao
        if not per_channel:
            from torch.ao.quantization import default_dynamic_qconfig as qconfig
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(deprecat|quantize_per_channel).*")
            quantize_dynamic(model, {n: qconfig for n in targets}, dtype=torch.qint8, inplace=True)
        return model
    if not _HAS_INT_MM:
        warnings.warn("this PyTorch has no torch._int_mm: the int8 layers multiply dequantized weights "
                      "in float (same answers, no speed-up).", RuntimeWarning, stacklevel=2)
    from .targets import replace_module
    for name, lin in targets.items():
        replace_module(model, name, Int8Linear(lin))
    return model


def _int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of an int8 model as save_int8 stores them: int8 codes, fp32 row scales, the rest."""
    state, done = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            codes, scale, bias = m.weight_int8, m.weight_scale, m.bias
        elif _is_int8_module(m):
            w, bias = m._packed_params._weight_bias()
            codes, scale = w.int_repr(), w.q_per_channel_scales().float()
        else:
            continue
        state[f"{name}.weight_int8"], state[f"{name}.weight_scale"] = codes.contiguous(), scale.contiguous()
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().float()
        done.add(name)
    for k, v in model.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if isinstance(v, torch.Tensor) and not v.is_quantized and owner not in done and not any(
                owner == d or owner.startswith(d + ".") for d in done):
            state[k] = v
    return state


def save_int8(model: nn.Module, path) -> Path:
    """Write an int8 model from `quantize_int8` as one safetensors file (no pickle)."""
    state = _int8_state(model)
    if not any(k.endswith(".weight_int8") for k in state):
        raise ValueError("save_int8 needs a model from quantize_int8: this one has no int8 layer.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = "int_mm" if any(isinstance(m, Int8Linear) for m in model.modules()) else "ao"
    write_tensors(path, state, {"format": f"peftkit-int8/{backend}"})  # load_int8 rebuilds the same kind
    return path


def load_int8(base: nn.Module, path) -> nn.Module:
    """Rebuild an int8 model on `base` (a fresh base of the same architecture) from `save_int8`'s file.

    The file's layers and shapes are checked against `base` before anything changes.
    """
    tensors = read_tensors(Path(path))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        fmt = (f.metadata() or {}).get("format", "")
    backend = fmt.split("/", 1)[1] if fmt.startswith("peftkit-int8/") else "int_mm"
    if backend not in ("int_mm", "ao"):
        raise AdapterFileError(f"{path} says its int8 layers are {backend!r}, which this peftkit does not know.")
    names = sorted(k[: -len(".weight_int8")] for k in tensors if k.endswith(".weight_int8"))
    if not names:
        raise AdapterFileError(f"{path} holds no int8 layers: was it written by peftkit.compress.save_int8?")
    model = _merged_plain(base, inplace=False)
    from .targets import replace_module
    for key in [k for k in tensors if k.endswith(".inv_scale")]:
        owner = key[: -len(".inv_scale")]
        lin = dict(model.named_modules()).get(owner)
        if type(lin) is not nn.Linear:
            raise AdapterFileError(f"{path} was written for another base: it smooths {owner!r}, which is not a Linear here.")
        replace_module(model, owner, Smoothed(lin, tensors[key]))
    modules = dict(model.named_modules())
    for n in names:
        m = modules.get(n)
        codes = tensors[f"{n}.weight_int8"]
        if type(m) is not nn.Linear or tuple(m.weight.shape) != tuple(codes.shape):
            raise AdapterFileError(f"{path} was written for another base: layer {n!r} is "
                                   f"{tuple(codes.shape)} there but {getattr(m, 'weight', None) is not None and tuple(m.weight.shape) or 'missing'} here.")
    rest = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in names}
    _, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected:
        raise AdapterFileError(f"{path} has tensors this base lacks: {unexpected[:5]}.")
    skip = [n for n, m in modules.items() if type(m) is nn.Linear and n not in names]
    model = quantize_int8(model, skip=skip, inplace=True, backend=backend)
    for n in names:  # then the stored codes and scales, exactly
        m, codes, scale = model.get_submodule(n), tensors[f"{n}.weight_int8"], tensors[f"{n}.weight_scale"]
        bias = tensors.get(f"{n}.bias")
        if isinstance(m, Int8Linear):
            m.weight_int8.copy_(codes)
            m.weight_scale.copy_(scale)
            if bias is not None:
                m.bias.copy_(bias)
        else:
            qw = torch._make_per_channel_quantized_tensor(codes, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            m.set_weight_bias(qw, bias)
    return model


def file_size(model: nn.Module, int8: bool = False) -> int:
    """Bytes of the model written to disk: safetensors fp32 state, or `save_int8`'s file."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "model.safetensors"
        if int8:
            save_int8(model, p)
        else:
            write_tensors(p, {k: v.clone() for k, v in _merged_plain(model, False).state_dict().items()})
        return p.stat().st_size


# --------------------------------------------------------------------------- simulated k-bit

def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: simulated quantization supports whole numbers of bits from 2 to 8.")


def quantize_codes(w: torch.Tensor, bits: int, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: integer codes in [-(2^(b-1)-1), 2^(b-1)-1] and their scale(s).

    per_channel=True keeps one scale per output row (shape (out, 1)), False one for the tensor.
    """
    _check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().float()
    scale = _row_scale(w, qmax) if per_channel else (w.abs().max() / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scale).clamp(-qmax, qmax).to(torch.int8)
    return codes, scale


def fake_quantize(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """`w` rounded to a `bits`-bit symmetric grid and mapped back to float (same dtype as `w`)."""
    codes, scale = quantize_codes(w, bits, per_channel)
    return (codes.float() * scale).to(w.dtype)


def quantization_error(model: nn.Module, bits: int, per_channel: bool = True, skip="head") -> pd.DataFrame:
    """Per Linear weight: MSE and max absolute error of `bits`-bit quantization, with a TOTAL row."""
    rows = []
    for name, m in linear_layers(_merged_plain(model, False), skip).items():
        w = m.weight.detach().float()
        err = fake_quantize(w, bits, per_channel) - w
        rows.append({"layer": name, "params": w.numel(), "mse": float(err.pow(2).mean()),
                     "max_abs": float(err.abs().max()), "rel_err": float(err.norm() / w.norm())})
    df = pd.DataFrame(rows)
    total = {"layer": "TOTAL", "params": int(df.params.sum()),
             "mse": float((df.mse * df.params).sum() / df.params.sum()), "max_abs": float(df.max_abs.max()),
             "rel_err": float(df.rel_err.mean())}
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)


def error_sweep(model: nn.Module, bits=range(2, 9), skip="head") -> pd.DataFrame:
    """TOTAL error per (bits, scheme): how much per-channel scales buy at each width."""
    rows = []
    for b in bits:
        for pc in (False, True):
            t = quantization_error(model, b, pc, skip).iloc[-1]
            rows.append({"bits": b, "scheme": "per-channel" if pc else "per-tensor", "mse": t.mse,
                         "max_abs": t.max_abs, "rel_err": t.rel_err})
    return pd.DataFrame(rows)


def simulate_kbit(model: nn.Module, bits: int, per_channel: bool = True, skip="head", inplace: bool = False) -> nn.Module:
    """A copy whose Linear weights (LoRA merged first) are rounded to `bits` bits, in float."""
    _check_bits(bits)
    model = _merged_plain(model, inplace)
    with torch.no_grad():
        for m in linear_layers(model, skip).values():
            m.weight.copy_(fake_quantize(m.weight, bits, per_channel))
    return model


def quantize_base(model: nn.Module, bits: int = 4, per_channel: bool = True, skip="head", inplace: bool = False) -> nn.Module:
    """QLoRA's starting point, simulated: every base Linear frozen at `bits` bits.

    Apply a LoRA to the result and train it: the LoRA learns on top of the rounded base, so its
    update can make up for part of the rounding. (Real QLoRA also stores the base in 4 bits and
    uses the NF4 grid; this keeps float storage and the symmetric grid, so it shows the accuracy
    effect only.)
    """
    if lora_layers(model):
        raise ValueError("quantize_base expects the plain base model: quantize it first, then apply the LoRA.")
    model = simulate_kbit(model, bits, per_channel, skip, inplace)
    return model


def merge_into_quantized(codes: torch.Tensor, scale: torch.Tensor, delta: torch.Tensor, bits: int,
                         per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge an update into an already-quantized weight: dequantize, add `delta`, requantize."""
    if delta.shape != codes.shape:
        raise ValueError(f"the update has shape {tuple(delta.shape)} but the quantized weight {tuple(codes.shape)}.")
    return quantize_codes(codes.float() * scale + delta.float(), bits, per_channel)


def merge_int8_lora(qmodel: nn.Module, lora_model: nn.Module) -> nn.Module:
    """Merge the LoRA of `lora_model` into the matching layers of an int8 model, in place.

    Each layer is dequantized, gets its update sBA added, and is requantized per channel: the
    deployment case of a quantized base shipped once and LoRAs merged into it later. The other
    tensors that trained with the LoRA (the task head) are copied across as they are.
    """
    deltas = {}
    for name, m in lora_model.named_modules():
        if isinstance(m, LoRALinear):
            if m.merged:
                raise ValueError(f"{name} is already merged in lora_model: unmerge it first, or the update would count twice.")
            deltas[name] = m.delta_weight().detach().float()
    if not deltas:
        raise ValueError("lora_model has no LoRA layers to merge.")
    modules = dict(qmodel.named_modules())
    missing = [n for n in deltas if n not in modules or not _is_int8_module(modules[n])]
    if missing:
        raise ValueError(f"these LoRA layers have no int8 layer of the same name in qmodel: {missing[:5]}.")
    q_state = qmodel.state_dict()
    trained = {}
    for name, p in lora_model.named_parameters():
        if p.requires_grad and not is_adapter_param(name):
            plain = name.replace(".base.", ".")
            if plain not in q_state or not isinstance(q_state[plain], torch.Tensor) or q_state[plain].shape != p.shape:
                raise ValueError(f"{plain} trained with the LoRA but qmodel has no float tensor of that name and "
                                 "shape to receive it (was it quantized?): keep it out of quantize_int8 with skip=.")
            trained[plain] = p.detach()
    with torch.no_grad():
        for plain, value in trained.items():
            q_state[plain].copy_(value)
    for name, delta in deltas.items():
        m = modules[name]
        if isinstance(m, Int8Linear):
            codes, scale = merge_into_quantized(m.weight_int8, m.weight_scale[:, None], delta, 8)
            m.weight_int8.copy_(codes)
            m.weight_scale.copy_(scale.squeeze(1))
        else:
            w, bias = m._packed_params._weight_bias()
            merged = w.dequantize() + delta
            scale = _row_scale(merged, 127).squeeze(1).double()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*(deprecat|quantize_per_channel).*")
                qw = torch.quantize_per_channel(merged, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            m.set_weight_bias(qw, bias)
    return qmodel


ORDERS = ("merge then quantize", "quantize then merge", "unmerged LoRA on quantized base")


def quantized_with_lora(model: nn.Module, bits: int, order: str, per_channel: bool = True, skip="head") -> nn.Module:
    """A copy of a LoRA model deployed on a `bits`-bit base in one of the three ORDERS.

    "merge then quantize" rounds W + sBA; "quantize then merge" rounds W, then merges sBA into
    the rounded weight (dequantize, add, requantize); "unmerged LoRA on quantized base" rounds W
    and keeps the LoRA beside it in float (QLoRA's deployment). Every other Linear is rounded too.
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not one of {list(ORDERS)}.")
    if not lora_layers(model):
        raise ValueError("quantized_with_lora needs a model with LoRA layers.")
    if order == "merge then quantize":
        return simulate_kbit(model, bits, per_channel, skip)
    model = copy.deepcopy(model)
    was_merged = {m: m.merged for m in lora_layers(model)}
    for m in was_merged:
        m.unmerge()
    prefixes = _skip_prefix(model, skip)
    with torch.no_grad():
        for name, m in model.named_modules():
            if type(m) is nn.Linear and not any(name == p or name.startswith(p + ".") for p in prefixes):
                m.weight.copy_(fake_quantize(m.weight, bits, per_channel))
    if order == "unmerged LoRA on quantized base":
        return model
    with torch.no_grad():
        for m in lora_layers(model):
            codes, scale = quantize_codes(m.base.weight, bits, per_channel)
            codes, scale = merge_into_quantized(codes, scale, m.delta_weight(), bits, per_channel)
            m.base.weight.copy_(codes.float() * scale)
    _strip_without_merge(model)
    return model


def _strip_without_merge(model: nn.Module) -> None:
    """Drop LoRA wrappers whose update is already inside the base weight."""
    from .targets import replace_module
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        replace_module(model, name, m.base)
    if hasattr(model, "peftkit"):
        del model.peftkit


def merge_order_errors(model: nn.Module, bits: int = 4, per_channel: bool = True) -> pd.DataFrame:
    """Per LoRA layer and order, the error against the exact merged weight W + sBA (MSE, relative
    to W + sBA, and relative to the update sBA itself) for three deployments:

    * merge then quantize: Q(W + sBA);
    * quantize then merge: dequantize Q(W), add sBA, requantize (`merge_into_quantized`);
    * quantized base, LoRA kept unmerged in float: Q(W) + sBA.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("merge_order_errors needs a model with LoRA layers.")
    rows = []
    for name, m in layers.items():
        w = m.base.weight.detach().float()
        if m.merged:
            w = w - m.delta_weight().float()
        d = m.delta_weight().detach().float()
        exact = w + d
        codes, scale = quantize_codes(w, bits, per_channel)
        orders = {"merge then quantize": fake_quantize(exact, bits, per_channel),
                  "quantize then merge": (lambda c, s: c.float() * s)(*merge_into_quantized(codes, scale, d, bits, per_channel)),
                  "unmerged LoRA on quantized base": codes.float() * scale + d}
        for order, approx in orders.items():
            err = approx - exact
            rows.append({"layer": name, "order": order, "mse": float(err.pow(2).mean()),
                         "rel_err": float(err.norm() / exact.norm()),
                         # above 1: the error is larger than the whole LoRA update it was meant to add
                         "err_vs_update": float(err.norm() / d.norm().clamp_min(1e-12))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- pruning

def prune_unstructured(model: nn.Module, amount: float, scope: str = "global", skip="head",
                       inplace: bool = False) -> nn.Module:
    """Zero the `amount` fraction of smallest-magnitude weights: across all Linears or per layer.

    Masks are torch.nn.utils.prune reparametrizations; `make_permanent` bakes them in.
    """
    _check_amount(amount)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope={scope!r} is not one of 'global', 'layer'.")
    model = _merged_plain(model, inplace)
    lins = list(linear_layers(model, skip).values())
    if scope == "global":
        prune.global_unstructured([(m, "weight") for m in lins], pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for m in lins:
            prune.l1_unstructured(m, "weight", amount=amount)
    return model


def prune_rows(model: nn.Module, amount: float, skip="head", inplace: bool = False) -> nn.Module:
    """Structured: zero the `amount` fraction of output rows with the smallest L2 norm, per layer."""
    _check_amount(amount)
    model = _merged_plain(model, inplace)
    for m in linear_layers(model, skip).values():
        prune.ln_structured(m, "weight", amount=amount, n=2, dim=0)
    return model


# (inner, outer) feed-forward pairs by architecture: BERT-style and DistilBERT-style names.
FFN_PAIRS = [(r"(.*)\.intermediate\.dense$", r"\1.output.dense"), (r"(.*)\.ffn\.lin1$", r"\1.ffn.lin2")]


def ffn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    names = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    pairs = []
    for n in sorted(names):
        for pat, repl in FFN_PAIRS:
            if re.match(pat, n):
                outer = re.sub(pat, repl, n)
                if outer in names:
                    pairs.append((n, outer))
    return pairs


def shrink_ffn(model: nn.Module, amount: float, inplace: bool = False) -> nn.Module:
    """Remove the `amount` fraction of feed-forward neurons per block, physically.

    A neuron j is scored by ||W_in[j]|| * ||W_out[:, j]|| (L2 norms of what feeds it and what it
    feeds); the lowest go, and both Linears are rebuilt smaller, so every matmul shrinks.
    """
    _check_amount(amount)
    model = _merged_plain(model, inplace)
    pairs = ffn_pairs(model)
    if not pairs:
        raise ValueError("no feed-forward pair found (BERT's intermediate/output.dense or DistilBERT's "
                         "ffn.lin1/lin2): shrink_ffn does not know this architecture; use prune_rows.")
    from .targets import replace_module
    for inner_name, outer_name in pairs:
        inner, outer = model.get_submodule(inner_name), model.get_submodule(outer_name)
        score = inner.weight.detach().norm(dim=1) * outer.weight.detach().norm(dim=0)
        keep_n = max(1, inner.out_features - int(round(amount * inner.out_features)))
        keep = score.topk(keep_n).indices.sort().values
        new_in = nn.Linear(inner.in_features, keep_n, bias=inner.bias is not None)
        new_out = nn.Linear(keep_n, outer.out_features, bias=outer.bias is not None)
        with torch.no_grad():
            new_in.weight.copy_(inner.weight[keep])
            if inner.bias is not None:
                new_in.bias.copy_(inner.bias[keep])
            new_out.weight.copy_(outer.weight[:, keep])
            if outer.bias is not None:
                new_out.bias.copy_(outer.bias)
        replace_module(model, inner_name, new_in.to(inner.weight.dtype))
        replace_module(model, outer_name, new_out.to(outer.weight.dtype))
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "intermediate_size"):
        cfg.intermediate_size = model.get_submodule(pairs[0][0]).out_features
    return model


def _check_amount(amount) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise ValueError(f"amount={amount!r}: give the fraction to prune, at least 0 and below 1.")


def make_permanent(model: nn.Module) -> nn.Module:
    """Bake every pruning mask into its weight and drop the reparametrization (in place)."""
    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")
    return model


def sparsity_report(model: nn.Module) -> pd.DataFrame:
    """Zeros per Linear weight (masked or baked in), with a TOTAL row."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight.detach()
            rows.append({"layer": name, "shape": "x".join(map(str, w.shape)), "params": w.numel(),
                         "zeros": int((w == 0).sum()), "pruning_mask": prune.is_pruned(m)})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["sparsity"] = df.zeros / df.params
    total = {"layer": "TOTAL", "shape": "", "params": int(df.params.sum()), "zeros": int(df.zeros.sum()),
             "pruning_mask": bool(df.pruning_mask.any())}
    total["sparsity"] = total["zeros"] / total["params"]
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)
