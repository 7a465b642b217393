"""Training: `train` runs (or resumes) one run in a folder; `evaluate` scores a model on
held-out batches. Checkpoints and run folders are read through `moelab.store`."""

from .evaluate import evaluate
from .health import NonFiniteLoss
from .trainer import RunExists, TrainResult, train

__all__ = ["train", "evaluate", "TrainResult", "RunExists", "NonFiniteLoss"]
