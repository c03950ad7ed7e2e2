"""Training: `TrainConfig` and `fit` (which knows nothing about PEFT: it trains whatever requires
grad), checkpoints that resume bit for bit, and `evaluate` with the other measurements.

May import: data, layers (dropout knobs), runtime. Never core, bases or files.
"""

from .loop import TrainConfig, TrainingDiverged, fit  # noqa: F401
from .metrics import evaluate  # noqa: F401
