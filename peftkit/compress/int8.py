"""Real int8 inference on the CPU: `Int8Linear` (per-token activations, torch._int_mm), the
torch.ao path for comparison, a LoRA merged into an int8 base
(smoothing: smooth.py; files and sizes: int8_file.py). The package docstring (`peftkit.compress`) records what each path measured."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
from torch import nn

from ..core.targets import replace_module
from ..layers.lora import LoRALinear
from ..layers.names import is_adapter_param
from .common import linear_layers, merged_plain, row_scale
from .int8_embedding import Int8Embedding, embedding_layers
from .kbit import merge_into_quantized
from .smooth import smooth

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
_ONEDNN = getattr(getattr(torch.ops, "onednn", None), "qlinear_pointwise", None) is not None

# How Int8Linear multiplies. Measured on MiniLM's shapes (benchmarks/bench_int8.py, notebook 05):
# the int8 GEMM itself is 3-5x faster than fp32's, but the first Int8Linear spent twice as long
# again on elementwise passes around it: |x|, amax, divide, round, clamp and cast to quantize
# the activations; int32 -> float, two multiplies and the bias add to dequantize. Each pass
# writes a fresh (tokens, features) tensor, and on a busy machine each is also a parallel region
# that waits for its slowest thread. "onednn" cuts them to the fewest: amax and amin (no copy),
# one multiply, round in place, cast, flip the sign bit in place (int8 -> uint8 + 128, which is
# what oneDNN's fast kernels take: int8 activations fall to a reference loop that is 1000x
# slower), then oneDNN's int8 GEMM with the weight scales and the float conversion fused in, and
# one pass for the per-token scale and the bias, written in place.
KERNELS = ("onednn", "int_mm", "int_mm_v1", "float")
_kernel: list[str | None] = [None]  # chosen on first use (or by set_int8_kernel / PEFTKIT_INT8_KERNEL)


@functools.cache
def _probe_onednn() -> bool:
    """Whether oneDNN's int8 linear runs here and gives the exact integer products (asked once)."""
    if not _ONEDNN:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
        x = torch.randint(-127, 128, (5, 40), generator=g, dtype=torch.int8)
        scale = torch.rand(24, generator=g) + 0.5
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        z = torch.ops.onednn.qlinear_pointwise(x.view(torch.uint8) ^ 128, 1.0, 128, packed, scale,
                                               torch.zeros(24, dtype=torch.long), None, 1.0, 0, torch.float32,
                                               "none", [], "")
        exact = (x.long() @ w.long().t()).float() * scale
        return bool(torch.equal(z, exact))
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return False


def int8_kernel() -> str:
    """The kernel Int8Linear uses in this process: "onednn" (oneDNN's uint8 x int8 GEMM with the
    scales fused), "int_mm" (torch._int_mm), "int_mm_v1" (the first Int8Linear's code, kept for
    comparison) or "float" (dequantized weights; no speed-up). Chosen once: the env variable
    PEFTKIT_INT8_KERNEL, else the first of onednn and int_mm that runs correctly here."""
    if _kernel[0] is None:
        forced = os.environ.get("PEFTKIT_INT8_KERNEL")
        if forced:
            set_int8_kernel(forced)
        else:
            _kernel[0] = "onednn" if _probe_onednn() else ("int_mm" if _HAS_INT_MM else "float")
    return _kernel[0]


def set_int8_kernel(name: str | None) -> None:
    """Make every Int8Linear use kernel `name` (one of KERNELS); None: choose again on next use."""
    if name is not None and name not in KERNELS:
        raise ValueError(f"int8 kernel {name!r} is not one of {KERNELS}.")
    if name in ("int_mm", "int_mm_v1") and not _HAS_INT_MM:
        raise ValueError(f"int8 kernel {name!r} needs torch._int_mm, which this PyTorch lacks.")
    if name == "onednn" and not _probe_onednn():
        raise ValueError("int8 kernel 'onednn' does not run on this PyTorch (no torch.ops.onednn.qlinear_pointwise).")
    _kernel[0] = name


@contextlib.contextmanager
def using_int8_kernel(name: str):
    """Run every Int8Linear with kernel `name` inside the block (for comparisons), then restore."""
    previous = _kernel[0]
    set_int8_kernel(name)
    try:
        yield
    finally:
        _kernel[0] = previous


def int8_backend() -> str:
    """What `quantize_int8`'s default path runs on this PyTorch."""
    return {"onednn": "peftkit Int8Linear, oneDNN u8s8 GEMM (torch.ops.onednn.qlinear_pointwise)",
            "int_mm": "peftkit Int8Linear, torch._int_mm", "int_mm_v1": "peftkit Int8Linear v1, torch._int_mm",
            "float": "peftkit Int8Linear, float fallback"}[int8_kernel()]


def token_absmax(x2: torch.Tensor) -> torch.Tensor:
    """(rows, 1): each row's largest |x|, without writing an |x| copy; at least 1e-30, so that a
    row of zeros quantizes to zeros and 127 / absmax stays finite."""
    return torch.maximum(x2.amax(1, keepdim=True), x2.amin(1, keepdim=True).neg_()).clamp_min_(1e-30)


def quantize_tokens(x2: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Round each row of x2 to int8 codes on its own grid, absmax / 127 per step. |x| * 127 /
    absmax is at most 127 (to a float ulp), so no clamp is needed."""
    return torch.mul(x2, 127.0 / absmax).round_().to(torch.int8)


class Int8Linear(nn.Module):
    """A Linear in int8: weights per output row, activations per token, an int8 GEMM.

    Each token's activation row gets its own scale, so no token's rounding depends on another's,
    and the GEMM accumulates exactly in int32: a text gets the same answer alone or in any batch
    (and packed without padding), bit for bit, for every kernel but "float" (`int8_kernel`).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = row_scale(w, 127)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale.squeeze(1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self._packed = None  # oneDNN's layout of weight_int8, made on first use and whenever it changes

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def _onednn_weight(self) -> torch.Tensor:
        w = self.weight_int8
        try:
            version = w._version  # an in-place change (copy_, zero_) bumps it
        except RuntimeError:  # made under inference_mode: untracked; load_int8 and merge_int8_lora reset _packed
            version = -1
        key = (w.data_ptr(), version)
        if getattr(self, "_packed", None) is None or self._packed[0] != key:
            self._packed = (key, torch.ops.onednn.qlinear_prepack(w, None),
                            torch.zeros(self.out_features, dtype=torch.long))
        return self._packed

    def __getstate__(self):  # deepcopy and pickle leave the packed weight behind: remade on use
        return {**self.__dict__, "_packed": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32:
            x2 = x2.float()
        kernel = int8_kernel()
        if kernel != "float":
            x2 = x2.detach()  # inference only: rounding has no useful gradient, and the int8 GEMMs none at all
        if kernel == "onednn" and x2.device.type == "cpu":
            y = self._forward_onednn(x2)
        elif kernel in ("int_mm", "onednn") and _HAS_INT_MM and self.in_features % 8 == 0 and self.out_features % 8 == 0:
            y = self._forward_int_mm(x2)
        elif kernel == "int_mm_v1" and x2.shape[0] > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0:
            y = self._forward_int_mm_v1(x2)
        else:
            y = torch.nn.functional.linear(x2, self.dequantized_weight(), self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _forward_onednn(self, x2: torch.Tensor) -> torch.Tensor:
        absmax = token_absmax(x2)
        codes = quantize_tokens(x2, absmax).view(torch.uint8).bitwise_xor_(128)  # = int8 code + 128
        _, packed, zeros = self._onednn_weight()
        z = torch.ops.onednn.qlinear_pointwise(codes, 1.0, 128, packed, self.weight_scale, zeros, None,
                                               1.0, 0, torch.float32, "none", [], "")  # int32 sums * weight scale
        step = absmax / 127
        return torch.addcmul(self.bias, z, step, out=z) if self.bias is not None else z.mul_(step)

    def _forward_int_mm(self, x2: torch.Tensor) -> torch.Tensor:
        rows = x2.shape[0]
        if rows <= 16:  # torch._int_mm wants more than 16 rows: pad with zero rows (codes 0)
            x2 = torch.cat([x2, x2.new_zeros(17 - rows, x2.shape[1])])
        absmax = token_absmax(x2)
        y = torch._int_mm(quantize_tokens(x2, absmax), self.weight_int8.t()) * (absmax / 127)  # int32 * float: one pass
        y = torch.addcmul(self.bias, y, self.weight_scale, out=y) if self.bias is not None else y.mul_(self.weight_scale)
        return y[:rows]

    def _forward_int_mm_v1(self, x2: torch.Tensor) -> torch.Tensor:
        """The first Int8Linear, as it was: ten elementwise passes around torch._int_mm."""
        xs = row_scale(x2, 127)
        xq = torch.round(x2 / xs).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.weight_int8.t()).float() * xs * self.weight_scale
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def is_int8_module(m: nn.Module) -> bool:
    if isinstance(m, (Int8Linear, Int8Embedding)):
        return True
    ao = _ao_dynamic()
    return ao is not None and isinstance(m, ao[2])


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
            m._packed = None
        else:
            w, bias = m._packed_params._weight_bias()
            merged = w.dequantize() + delta
            scale = row_scale(merged, 127).squeeze(1).double()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*(deprecat|quantize_per_channel).*")
                qw = torch.quantize_per_channel(merged, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            m.set_weight_bias(qw, bias)
    return qmodel
