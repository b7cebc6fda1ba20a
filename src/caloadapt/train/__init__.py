"""Training: data batches, the training loop (pre-training, from scratch, adaptation), checkpoints."""

from __future__ import annotations

from .calibrate import calibrate_occupancy, training_showers
from .checkpoint import (inference_checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint,
                         write_inference_checkpoint)
from .data import Batch, BatchStream, DataSource, ShowerSubset, make_batch, split_indices
from .loop import TrainConfig, resolve_device, train

__all__ = ["TrainConfig", "train", "resolve_device", "Batch", "BatchStream", "DataSource", "ShowerSubset",
           "make_batch", "split_indices", "save_checkpoint", "load_checkpoint", "model_from_checkpoint",
           "inference_checkpoint", "write_inference_checkpoint", "calibrate_occupancy", "training_showers"]
