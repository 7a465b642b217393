from .checkpoint import CheckpointError, latest_checkpoint, resolve_checkpoint
from .health import NonFiniteLoss
from .trainer import RunExists, TrainResult, evaluate, train

__all__ = ["train", "evaluate", "TrainResult", "RunExists", "NonFiniteLoss", "CheckpointError",
           "latest_checkpoint", "resolve_checkpoint"]
