"""Compression: real int8 inference, simulated k-bit quantization, merge/quantize order, pruning.

Every function here leaves its input alone and returns a compressed copy (``inplace=True`` to
skip the copy), so a fine-tuned model is never lost to an experiment.

**Real int8 (`quantize_int8`).** LoRA layers are merged first (a merged LoRA is a plain Linear),
then every Linear but the task head runs int8 GEMMs. Paths measured on MiniLM fine-tuned on
movies (batch 32, 2 threads; the issue's table, notebook 05 and `benchmarks/bench_compress.py`):

* ``torch.ao.quantization.quantize_dynamic`` (fbgemm int8 kernels): 2.9-3.6x faster than fp32.
  It quantizes the activations with **one scale per batch**, so a text's prediction depends on
  the other texts in its batch (their outliers, their padding). Measured: up to 1.0 point lost
  on a domain with per-channel weights at batch 64 and 0.7 at batch 8; with per-tensor weights
  (its default) 4.3 points on tweets. Smoothing the activations first (`smooth`, SmoothQuant's
  idea) helped or hurt by up to 2.4 points depending on the calibration sample. PyTorch also
  marks the API deprecated.
* torchao 0.18: int8 dynamic activations gave no gain on this CPU, int8 weight-only about 1.1x.
* **Ours, `Int8Linear` (the default):** weights per output row, activations quantized **per
  token**, and ``torch._int_mm`` for the int8 GEMM (exact int32 accumulation). 1.8-2.7x faster
  than fp32 here, within 0.8 point on every domain, and a text's answer does not depend on its
  batch (tested). It needs no deprecated API; where ``torch._int_mm`` is missing, or a call
  has 16 rows or fewer, it multiplies the dequantized weights in float instead (correct, slower).

The embedding tables are stored per row in int8 as well (`Int8Embedding`, ``embeddings=True``,
the default): MiniLM's word embeddings are half its weights, so without them the int8 file is
only 0.65x the fp32 one.

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

# One concept per module: int8.py (real int8), int8_embedding.py (int8 tables), kbit.py (simulated rounding and merge orders),
# prune.py (pruning); common.py holds what they share. Everything is re-exported here.

from .common import DTYPE_BYTES, _merged_plain, _skip_prefix, linear_layers  # noqa: F401
from .int8_embedding import Int8Embedding, embedding_layers  # noqa: F401
from .int8 import (  # noqa: F401
    Int8Linear,
    Smoothed,
    _HAS_INT_MM,
    _ao_dynamic,
    _int8_state,
    _is_int8_module,
    file_size,
    input_absmax,
    int8_backend,
    load_int8,
    merge_int8_lora,
    model_size,
    quantize_int8,
    save_int8,
    smooth,
)
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
