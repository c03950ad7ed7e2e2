"""Real int8 inference on the CPU: `Int8Linear` (per-token activations, torch._int_mm), the
torch.ao path for comparison, SmoothQuant-style smoothing, int8 files, and a LoRA merged into an
int8 base. The package docstring (`peftkit.compress`) records what each path measured."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core.targets import replace_module
from ..files.adapter_file import AdapterFileError, read_tensors, write_tensors
from ..layers.lora import LoRALinear
from ..layers.names import is_adapter_param, under
from .common import DTYPE_BYTES, merged_plain, row_scale, linear_layers
from .int8_embedding import Int8Embedding, embedding_layers
from .kbit import merge_into_quantized

# --------------------------------------------------------------------------- sizes

def model_size(model: nn.Module, dtype: str = "fp32", skip="head", embeddings: bool = True) -> int:
    """Bytes the model's tensors take on disk when stored as `dtype` ("fp32", "bf16", "fp16", "int8").

    int8 stores each Linear weight (outside `skip`), and with `embeddings` each embedding table, as
    one byte per entry plus one fp32 scale per row, as `save_int8` writes it; everything else
    (norms, biases, the head) stays fp32.
    For a model already quantized by `quantize_int8`, dtype is ignored and its real storage counted.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPE_BYTES)}.")
    quantized = {n: m for n, m in model.named_modules() if is_int8_module(m)}
    if quantized:
        return sum(t.numel() * t.element_size() for t in _int8_state(model).values())
    if dtype != "int8":
        return sum(t.numel() for t in model.state_dict().values()) * DTYPE_BYTES[dtype]
    lins = linear_layers(model, skip)
    total = sum(t.numel() * 4 for t in model.state_dict().values())
    for m in lins.values():
        total -= m.weight.numel() * 3 - m.out_features * 4  # 4 -> 1 byte per weight, plus row scales
    for m in (embedding_layers(model, skip).values() if embeddings else ()):
        total -= m.weight.numel() * 3 - m.num_embeddings * 4
    return total


# --------------------------------------------------------------------------- real int8

def _ao_dynamic():
    """torch.ao's dynamic quantization entry points, or None where this PyTorch no longer has them."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        return None
    return quantize_dynamic, per_channel_dynamic_qconfig, DynamicLinear


_HAS_INT_MM = hasattr(torch, "_int_mm")


def int8_backend() -> str:
    """What `quantize_int8`'s default path runs on this PyTorch."""
    return "peftkit Int8Linear, torch._int_mm" if _HAS_INT_MM else "peftkit Int8Linear, float fallback"


class Int8Linear(nn.Module):
    """A Linear in int8: weights per output row, activations per token, ``torch._int_mm``.

    Each token's activation row gets its own scale, so no token's rounding depends on another's:
    a text gets the same answer alone or in any batch. The int8 GEMM accumulates exactly in int32.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = row_scale(w, 127)
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
            xs = row_scale(x2, 127)
            xq = torch.round(x2 / xs).clamp(-127, 127).to(torch.int8)
            y = torch._int_mm(xq, self.weight_int8.t()).float() * xs * self.weight_scale
        else:
            y = x2 @ self.dequantized_weight().t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def is_int8_module(m: nn.Module) -> bool:
    if isinstance(m, (Int8Linear, Int8Embedding)):
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
    model = merged_plain(model, inplace)
    layers = linear_layers(model, skip)
    stats = input_absmax(model, calibration, layers)
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
                  per_channel: bool = True, calibration=None, alpha: float = 0.8,
                  embeddings: bool = True) -> nn.Module:
    """An int8 copy of `model` for CPU inference: LoRA merged, every Linear outside `skip` in int8.

    backend: "int_mm" (default: `Int8Linear`, weights per output row, activations per token) or
    "ao" (torch.ao dynamic quantization, activations per batch; see the module docstring).
    per_channel=False (ao only) gives torch.ao's default, one weight scale per tensor.
    calibration: a few batches of model inputs; when given, input channels are first rescaled
    into the weights (`smooth`, with `alpha`). Bottleneck adapters stay as modules; their
    Linears are quantized too. skip: "head", or module names to keep in float. embeddings: store
    the embedding tables as `Int8Embedding` too (per row), which is most of the file's saving.
    """
    if backend not in ("ao", "int_mm"):
        raise ValueError(f"backend={backend!r} is not one of 'int_mm', 'ao'.")
    model = merged_plain(model, inplace).eval()
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
    for name, emb in (embedding_layers(model, skip).items() if embeddings else ()):
        replace_module(model, name, Int8Embedding(emb))
    if backend == "ao":
        quantize_dynamic, qconfig, _ = ao
        if not per_channel:
            from torch.ao.quantization import default_dynamic_qconfig as qconfig  # deprecated API: only on this path
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(deprecat|quantize_per_channel).*")
            quantize_dynamic(model, {n: qconfig for n in targets}, dtype=torch.qint8, inplace=True)
        return model
    if not _HAS_INT_MM:
        warnings.warn("this PyTorch has no torch._int_mm: the int8 layers multiply dequantized weights "
                      "in float (same answers, no speed-up).", RuntimeWarning, stacklevel=2)
    for name, lin in targets.items():
        replace_module(model, name, Int8Linear(lin))
    return model


def _int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of an int8 model as save_int8 stores them: int8 codes, fp32 row scales, the rest."""
    state, done = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            codes, scale, bias = m.weight_int8, m.weight_scale, m.bias
        elif isinstance(m, Int8Embedding):
            codes, scale, bias = m.weight_int8, m.weight_scale, None
        elif is_int8_module(m):
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
                under(owner, d) for d in done):
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
    with safe_open(str(path), "pt") as f:
        fmt = (f.metadata() or {}).get("format", "")
    backend = fmt.split("/", 1)[1] if fmt.startswith("peftkit-int8/") else "int_mm"
    if backend not in ("int_mm", "ao"):
        raise AdapterFileError(f"{path} says its int8 layers are {backend!r}, which this peftkit does not know.")
    names = sorted(k[: -len(".weight_int8")] for k in tensors if k.endswith(".weight_int8"))
    if not names:
        raise AdapterFileError(f"{path} holds no int8 layers: was it written by peftkit.compress.save_int8?")
    model = merged_plain(base, inplace=False)
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
        if type(m) not in (nn.Linear, nn.Embedding) or tuple(m.weight.shape) != tuple(codes.shape):
            raise AdapterFileError(f"{path} was written for another base: layer {n!r} is "
                                   f"{tuple(codes.shape)} there but {getattr(m, 'weight', None) is not None and tuple(m.weight.shape) or 'missing'} here.")
    rest = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in names}
    _, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected:
        raise AdapterFileError(f"{path} has tensors this base lacks: {unexpected[:5]}.")
    skip = [n for n, m in modules.items() if type(m) is nn.Linear and n not in names]
    model = quantize_int8(model, skip=skip, inplace=True, backend=backend, embeddings=False)
    for n in names:
        if type(modules[n]) is nn.Embedding:  # the tables the file stores in int8, and only those
            replace_module(model, n, Int8Embedding(modules[n]))
    for n in names:  # then the stored codes and scales, exactly
        m, codes, scale = model.get_submodule(n), tensors[f"{n}.weight_int8"], tensors[f"{n}.weight_scale"]
        bias = tensors.get(f"{n}.bias")
        if isinstance(m, (Int8Linear, Int8Embedding)):
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
            write_tensors(p, {k: v.clone() for k, v in merged_plain(model, False).state_dict().items()})
        return p.stat().st_size


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
    missing = [n for n in deltas if n not in modules or not is_int8_module(modules[n])]
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
            scale = row_scale(merged, 127).squeeze(1).double()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*(deprecat|quantize_per_channel).*")
                qw = torch.quantize_per_channel(merged, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            m.set_weight_bias(qw, bias)
    return qmodel
