"""Checkpoints: model configuration, weights, EMA weights, optimiser, step, geometry, written atomically."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from .. import __version__
from .._atomic import atomic_path
from ..errors import CheckpointError
from ..models.occupancy import OccupancyCalibration
from ..models.shower_model import ModelConfig, ShowerModel

__all__ = ["save_checkpoint", "load_checkpoint", "model_from_checkpoint", "restore_occupancy", "inference_checkpoint",
           "write_inference_checkpoint", "CHECKPOINT_FORMAT"]

#: entries kept by :func:`inference_checkpoint`: enough to generate, adapt and reproduce, no optimiser
_INFERENCE_KEYS = ("model_config", "geometry", "geometries", "train_config", "train_state", "trainable", "command",
                   "adapter", "consistency")

CHECKPOINT_FORMAT = "caloadapt-checkpoint"


def save_checkpoint(path: str | os.PathLike[str], model: ShowerModel, **parts) -> None:
    """Write a checkpoint atomically.

    ``parts`` may hold ``ema`` (state dict), ``optimizer``, ``scheduler``, ``train_state`` (step,
    epoch, position, best values, seeds), ``geometry`` (name and YAML description), ``adapter``
    (adaptation method and its settings) and ``extra``.
    """
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "caloadapt_version": __version__,
               "model_config": model.config.to_dict(), "model": model.state_dict(),
               "occupancy": {name: c.to_dict() for name, c in model.occupancy.items()}, **parts}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint (a path, or the name of a shipped model); a clear
    :class:`CheckpointError` for anything wrong with it."""
    from ..pretrained import resolve_checkpoint

    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError):
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a caloadapt checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    for key in ("model_config", "model"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return payload


def model_from_checkpoint(checkpoint: str | os.PathLike[str] | dict, weights: str = "ema",
                          config: ModelConfig | None = None) -> ShowerModel:
    """Rebuild the model of a checkpoint and load its ``ema`` (default) or raw ``model`` weights.

    With ``config``, check that the checkpoint fits that architecture and say what does not.
    """
    payload = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    source = "checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
    try:
        stored = ModelConfig.from_dict(payload["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: unreadable model configuration: {err}") from None
    if config is not None and config != stored:
        differences = [f"{k}: checkpoint {v!r}, requested {getattr(config, k)!r}"
                       for k, v in stored.to_dict().items() if getattr(config, k) != getattr(stored, k)]
        raise CheckpointError(f"{source}: checkpoint does not fit the requested model ({'; '.join(differences)})")
    model = ShowerModel(stored)
    state = payload.get(weights) if weights == "ema" else payload["model"]
    state = state if state is not None else payload["model"]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{source}: weights do not match the model: missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")
    return restore_occupancy(model, payload, source)


def restore_occupancy(model: ShowerModel, payload: dict, source: str = "checkpoint") -> ShowerModel:
    """Give ``model`` the occupancy calibrations stored in a checkpoint (none before caloadapt 0.2)."""
    stored = payload.get("occupancy") or {}
    try:
        model.occupancy = {str(name): OccupancyCalibration.from_dict(c) for name, c in stored.items()}
    except (AttributeError, ValueError) as err:
        raise CheckpointError(f"{source}: unreadable occupancy calibration: {err}") from None
    return model


def inference_checkpoint(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> int:
    """Write a weights-only copy of ``source`` (its EMA weights as the model, no optimiser state).

    The provenance (configuration, geometry, training state and command) and the occupancy
    calibrations are kept. Returns the size of the written file in bytes.
    """
    payload = load_checkpoint(source)
    weights = payload.get("ema") or payload["model"]
    model = ShowerModel(ModelConfig.from_dict(payload["model_config"]))
    model.load_state_dict(weights)
    restore_occupancy(model, payload, str(source))
    return write_inference_checkpoint(model, payload, target)


def write_inference_checkpoint(model: ShowerModel, payload: dict, target: str | os.PathLike[str]) -> int:
    """Write ``model`` (its weights as EMA weights) with the provenance entries of ``payload``; bytes written."""
    save_checkpoint(target, model, ema=model.state_dict(),
                    **{k: payload[k] for k in _INFERENCE_KEYS if k in payload and k != "model_config"})
    return Path(target).stat().st_size
