"""peftkit: LoRA and bottleneck Adapters, correct by construction and measured side by side.

The package is folders by layer; each imports only the layers listed below it (checked by
import-linter, `make test`):

    notebook/   figures, widgets, the notebook runner
    studies/    experiments, tuning, selection, the article, compression and serving studies, federated
    serving/    Deployer, its store, Monitor
    compress/   int8, k-bit, pruning, the inference precision (optimize_for_inference)
    training/   fit, checkpoints, evaluate            files/      adapter files, PEFT format
    bases/      load_base, the fast BERT forward      data/       corpus, loaders
    core/       method specs and registry, architecture defaults, targets, surgery
    layers/     LoRA layers (Linear/Conv1D, conv, embedding, attention), adapters, FastDropout, names
    runtime.py  device, threads, versions, memory     _version.py
    storage.py  atomic folders, append-only JSONL logs, checksums, the default runs/ folder

`import peftkit as pk` gives the names of the README's tour.
"""

from ._version import __version__
from .bases.models import MLP, ModelWithAdapters, ModelWithLoRA, load_base
from .core.methods import METHODS, Adapter, DoRA, FullFineTune, HeadOnly, Hybrid, LoRA, Method, PeftMethod, register
from .core.surgery import apply, merge, report, trainable_fraction, unload, unmerge
from .core.targets import TargetError
from .compress.precision import optimize_for_inference
from .files.adapter_file import AdapterFileError, load_adapter, save_adapter
from .files.peft_format import export_peft, import_peft
from .layers.adapters import AdapterLinear, BottleneckAdapter
from .layers.dropout import FastDropout, use_fast_dropout
from .layers.dora import DoRALinear
from .layers.lora import LoRALinear, MergeError
from .layers.lora_attention import LoRAMultiheadAttention
from .layers.lora_conv import LoRAConv
from .layers.lora_embedding import LoRAEmbedding
from .serving.deployer import Deployer
from .serving.monitor import Monitor
from .studies import article
from .studies.experiments import compare
from .studies.federated import aggregate
from .studies.federated_sim import simulate_federated
from .studies.merge_study import learn_merge_weights
from .studies.merging import merge_adapters
from .studies.summary import summarize

__all__ = [
    "Adapter", "AdapterFileError", "AdapterLinear", "BottleneckAdapter", "Deployer", "FastDropout",
    "DoRA", "DoRALinear", "FullFineTune", "HeadOnly", "Hybrid", "LoRA", "LoRAConv", "LoRAEmbedding", "LoRALinear",
    "LoRAMultiheadAttention", "METHODS", "MLP", "MergeError", "Method", "ModelWithAdapters", "ModelWithLoRA",
    "Monitor", "PeftMethod", "TargetError", "__version__", "aggregate", "apply", "article", "compare", "export_peft",
    "import_peft", "learn_merge_weights", "load_adapter", "load_base", "merge", "merge_adapters", "optimize_for_inference",
    "register", "report", "save_adapter", "simulate_federated", "summarize", "trainable_fraction",
    "unload", "unmerge", "use_fast_dropout",
]
