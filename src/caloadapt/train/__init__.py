"""Training: data batches, the one training loop (pre-training, from scratch, adaptation, distillation).

The checkpoint format lives with the models (:mod:`caloadapt.models.checkpoint`); its functions are
re-exported here for the callers that know them from here.
"""

from __future__ import annotations

from ..models.checkpoint import (inference_checkpoint, load_checkpoint, load_model, model_from_checkpoint,
                                 save_checkpoint, write_inference_checkpoint)
from .calibrate import calibrate_occupancy, training_showers
from .data import Batch, BatchStream, DataSource, ShowerSubset, make_batch, split_indices
from .distill import DistillConfig, distill
from .loop import TrainConfig, resolve_device, train

__all__ = ["TrainConfig", "train", "DistillConfig", "distill", "resolve_device", "Batch", "BatchStream", "DataSource",
           "ShowerSubset", "make_batch", "split_indices", "save_checkpoint", "load_checkpoint", "load_model",
           "model_from_checkpoint", "inference_checkpoint", "write_inference_checkpoint", "calibrate_occupancy",
           "training_showers"]
