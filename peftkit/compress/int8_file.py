"""int8 models on disk: `save_int8` writes the int8 codes and row scales as one safetensors file
(no pickle), `load_int8` rebuilds the model on a fresh base after checking every layer and shape; `model_size` and `file_size`
count the bytes a model takes on disk in fp32, bf16, fp16 or int8."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core.targets import replace_module
from ..files.adapter_file import AdapterFileError, read_tensors, write_tensors
from ..layers.names import under
from .common import DTYPE_BYTES, linear_layers, merged_plain
from .int8 import Int8Linear, is_int8_module, quantize_int8
from .int8_embedding import Int8Embedding, embedding_layers
from .smooth import Smoothed


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
            m._packed = None
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
