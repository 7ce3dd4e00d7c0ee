"""Training: the loop (`train`), its arguments, evaluation, checkpoints and reports."""

from .args import TrainArgs
from .checkpoint import CheckpointError, latest_checkpoint
from .evaluation import evaluate
from .loop import NonFiniteLossError, TrainResult, train

__all__ = ["CheckpointError", "NonFiniteLossError", "TrainArgs", "TrainResult", "evaluate", "latest_checkpoint", "train"]
