"""Training: data, augmentation, losses, the loop (local and DDP over Dask), metrics."""

from segcore.training.config import AugmentConfig, TrainConfig
from segcore.training.loop import TrainResult, train

__all__ = ["AugmentConfig", "TrainConfig", "TrainResult", "train"]
