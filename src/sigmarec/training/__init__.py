"""SFT training of the SIGMA model on accelerate (CPU, one GPU or many)."""

from sigmarec.training.config import TrainingConfig
from sigmarec.training.distributed import accelerate_config, describe, make_accelerator
from sigmarec.training.loop import ExampleStream, TrainResult, save_trained, train_sigma

__all__ = [
    "ExampleStream", "TrainResult", "TrainingConfig", "accelerate_config", "describe",
    "make_accelerator", "save_trained", "train_sigma",
]
