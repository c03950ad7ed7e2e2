"""Training: `TrainConfig` and `fit` (which knows nothing about PEFT: it trains whatever requires
grad), checkpoints that resume bit for bit, and `evaluate` with the other measurements.

May import: data, layers (dropout knobs), runtime, storage (atomic checkpoint folders, checksums). Never core, bases or files.
"""

from .checkpoint import CheckpointError  # noqa: F401
from .loop import ResumeMismatch, TrainConfig, TrainingDiverged, fit  # noqa: F401
from .metrics import evaluate  # noqa: F401
