from ..errors import CheckpointError, NonFiniteError, OutputExists
from ..store.checkpoint import latest_checkpoint, resolve_checkpoint
from ..store.run import load_model_weights
from .health import NonFiniteLoss
from .trainer import RunExists, TrainResult, evaluate, train

__all__ = [
    "train",
    "evaluate",
    "TrainResult",
    "RunExists",
    "OutputExists",
    "NonFiniteLoss",
    "NonFiniteError",
    "CheckpointError",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_model_weights",
]
