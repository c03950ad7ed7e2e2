"""peftkit: LoRA and bottleneck Adapters, correct by construction and measured side by side."""

__version__ = "0.1.0"

from .adapters import AdapterLinear, BottleneckAdapter  # noqa: E402
from .dropout import FastDropout, use_fast_dropout  # noqa: E402
from .io import AdapterFileError, load_adapter, save_adapter  # noqa: E402
from .interop import export_peft, import_peft  # noqa: E402
from .lora import LoRALinear, MergeError  # noqa: E402
from .methods import METHODS, Adapter, FullFineTune, HeadOnly, Hybrid, LoRA, Method  # noqa: E402
from .models import MLP, ModelWithAdapters, ModelWithLoRA, load_base  # noqa: E402
from .monitor import Monitor  # noqa: E402
from .serve import Deployer  # noqa: E402
from .surgery import apply, merge, report, trainable_fraction, unload, unmerge  # noqa: E402
from .targets import TargetError  # noqa: E402

__all__ = [
    "Adapter", "AdapterFileError", "AdapterLinear", "BottleneckAdapter", "Deployer", "FastDropout", "FullFineTune", "HeadOnly",
    "Hybrid", "LoRA", "LoRALinear", "METHODS", "MLP", "MergeError", "Method", "ModelWithAdapters",
    "ModelWithLoRA", "Monitor", "TargetError", "apply", "export_peft", "import_peft", "load_adapter", "load_base",
    "merge", "report", "save_adapter", "trainable_fraction", "unload", "unmerge", "use_fast_dropout",
]
