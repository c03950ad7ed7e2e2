"""Compression: real int8 inference, the inference precision, simulated k-bit, merge/quantize order, pruning.

Every function here leaves its input alone and returns a compressed copy (``inplace=True`` to
skip the copy), so a fine-tuned model is never lost to an experiment.

May import: core, layers, files (the int8 file format), runtime (the CPU's facts) and data (a default
calibration sample). serving imports compress (a Deployer's precision); compress never imports serving.

**Real int8 (`quantize_int8`).** LoRA layers are merged first (a merged LoRA is a plain Linear),
then every Linear but the task head runs int8 GEMMs. The default layer is ours, `Int8Linear`:
weights per output row, activations quantized **per token**, and an int8 GEMM with exact int32
accumulation, so every int8 layer gives a token the same output bit for bit alone or in any
batch (tested). The GEMM is oneDNN's uint8 x int8 kernel with the weight scales fused in
(``torch.ops.onednn.qlinear_pointwise``), else ``torch._int_mm``; where neither runs, the
dequantized weights are multiplied in float (correct, no faster). `int8_kernel` says which, and
`int8.py` what the first version lost to the elementwise work around its GEMM. ``backend="ao"`` keeps PyTorch's dynamic
quantization (``quantize_dynamic``, fbgemm) for comparison: it scales the activations **once per
batch**, so a prediction depends on its batch, and PyTorch marks the API deprecated (its warning
is silenced; a clear error replaces it once the API is gone). `smooth` adds SmoothQuant-style
smoothing. What each path measured, speed and accuracy per domain, is in benchmarks/README.md
(`python benchmarks/bench_compress.py`) and notebook 05.

The embedding tables are stored per row in int8 as well (`Int8Embedding`, ``embeddings=True``,
the default): the word embeddings are about half of MiniLM's weights.

**The inference precision (`optimize_for_inference`, precision.py).** fp32, bf16 (autocast or bf16
weights, where the CPU has AVX512-BF16 or AMX) or int8: "auto" times them here, checks each
against fp32 on calibration texts, keeps the fastest that agrees, and caches the timing per CPU.

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

# One concept per module: int8.py (real int8 layers), int8_embedding.py (int8 tables), smooth.py (SmoothQuant),
# int8_file.py (int8 files and sizes), kbit.py (simulated rounding and merge orders), prune.py (pruning),
# precision.py (fp32, bf16 or int8 for inference, chosen for this CPU) with bf16.py (the bf16 forms) and timing.py
# (calibration, timing, its cache); common.py holds what they share. Everything is re-exported here.

from .common import DTYPE_BYTES, merged_plain, skip_prefix, linear_layers  # noqa: F401
from .int8_embedding import Int8Embedding, embedding_layers  # noqa: F401
from .int8 import (  # noqa: F401
    Int8Linear,
    _HAS_INT_MM,
    _ao_dynamic,
    is_int8_module,
    KERNELS as INT8_KERNELS,
    int8_backend,
    int8_kernel,
    merge_int8_lora,
    quantize_int8,
    set_int8_kernel,
    using_int8_kernel,
)
from .smooth import Smoothed, input_absmax, smooth  # noqa: F401
from .int8_file import _int8_state, file_size, load_int8, model_size, save_int8  # noqa: F401
from .bf16 import bf16_support, use_bf16  # noqa: F401
from .precision import CANDIDATES, PRECISIONS, PrecisionChoice, optimize_for_inference  # noqa: F401
from .timing import cache_path  # noqa: F401
from .kbit import (  # noqa: F401
    ORDERS,
    error_sweep,
    fake_quantize,
    merge_into_quantized,
    merge_order_errors,
    quantization_error,
    quantize_base,
    quantize_codes,
    quantized_with_lora,
    simulate_kbit,
)
from .prune import (  # noqa: F401
    FFN_PAIRS,
    ffn_pairs,
    make_permanent,
    prune_rows,
    prune_unstructured,
    shrink_ffn,
    sparsity_report,
)
