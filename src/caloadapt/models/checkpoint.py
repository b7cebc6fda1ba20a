"""Checkpoints: model configuration, weights, EMA weights, sampler, optimiser, step, geometry, written atomically.

:func:`load_model` is the one loader of every kind: a pre-trained or scratch model, an adapted
one (peft adapters stored separately in a run's ``best.pt`` / ``last.pt`` are merged), a distilled
one and a multi-detector one; it returns the model and the :class:`~caloadapt.models.sampling.Sampler`
the checkpoint is to be sampled with.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .. import __version__
from .._atomic import atomic_path
from .._inputs import input_file, wrong_kind
from ..errors import CaloadaptError, CheckpointError, OutputError
from ..pretrained import resolve_checkpoint
from .adapters import AdaptMethod, merge, prepare
from .consistency import CONSISTENCY_KEY
from .occupancy import OccupancyCalibration
from .sampling import Sampler
from .shower_model import ModelConfig, ShowerModel

__all__ = ["load_model", "save_checkpoint", "load_checkpoint", "model_from_checkpoint", "restore_occupancy",
           "inference_checkpoint", "write_inference_checkpoint", "CHECKPOINT_FORMAT", "stored_config", "stored_sampler",
           "build_model", "load_weights"]

#: entries kept by :func:`inference_checkpoint`: enough to generate, adapt and reproduce, no optimiser
_INFERENCE_KEYS = ("model_config", "geometry", "geometries", "train_config", "train_state", "trainable", "command",
                   "adapter", "consistency", "sampler")

CHECKPOINT_FORMAT = "caloadapt-checkpoint"


def save_checkpoint(path: str | os.PathLike[str], model: ShowerModel, *, sampler: Sampler | dict | None = None,
                    **parts) -> None:
    """Write a checkpoint atomically, with the :class:`Sampler` it is to be generated with (default:
    :class:`Sampler()`, the EDM Heun sampler).

    ``parts`` may hold ``ema`` (state dict), ``optimizer``, ``scheduler``, ``train_state`` (step,
    epoch, position, best values, seeds), ``geometry`` (name and YAML description), ``adapter``
    (adaptation method and its settings) and ``extra``.
    """
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "caloadapt_version": __version__,
               "model_config": model.config.to_dict(), "model": model.state_dict(),
               "occupancy": {name: c.to_dict() for name, c in model.occupancy.items()},
               "sampler": (Sampler.from_dict(sampler) if isinstance(sampler, dict) else sampler or Sampler()).to_dict(),
               **parts}
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as err:  # torch's writer reports a full disk as a RuntimeError
            raise OutputError(f"{path}: cannot write the checkpoint: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _weights_only_failure(err: BaseException) -> tuple[bool, str] | None:
    """Why a weights-only load failed: (True, the global it refused) for a pickle that would run
    code or build foreign objects, (False, the reason) for one that is broken; None if unrelated."""
    text = str(err)
    if "Weights only load failed" not in text:
        return None
    refused = re.search(r"GLOBAL\s+([\w.]+)", text)
    if refused:
        return True, refused.group(1)
    reason = re.search(r"Unsupported operand \d+|WeightsUnpickler error: \S.*", text)
    return False, reason.group(0) if reason else "not a weights-only pickle"


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint (a path, or the name of a shipped model); a clear
    :class:`CheckpointError` for anything wrong with it.

    A checkpoint is data, never code: it is read with ``torch.load(weights_only=True)``, which
    allows tensors and plain containers and numbers only, so a planted pickle payload is refused
    before it can run. The model configuration and the weights are checked too (a configuration
    caloadapt can build, tensors of finite values).
    """
    path = input_file(resolve_checkpoint(path), "checkpoint file", CheckpointError)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError, TypeError,
            AttributeError, KeyError, IndexError, ImportError, MemoryError) as err:
        failure = _weights_only_failure(err)
        if failure is not None and failure[0]:
            raise CheckpointError(f"{path}: refused: loading it would call {failure[1]} (code, not data); a caloadapt "
                                  "checkpoint holds tensors and plain data only") from None
        reason = failure[1] if failure is not None else _first_line(err)
        raise CheckpointError(wrong_kind(path, "checkpoint file", expected=("checkpoint",))
                              or f"{path}: corrupt or not a PyTorch checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a caloadapt checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    for key in ("model_config", "model"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    stored_config(payload, str(path))
    stored_sampler(payload, str(path))
    for key in ("model", "ema"):
        if key in payload and payload[key] is not None:
            _check_weights(payload[key], f"{path}: {key!r}")
    return payload


def stored_config(payload: dict, source: str = "checkpoint") -> ModelConfig:
    """The :class:`ModelConfig` a checkpoint was written with; a :class:`CheckpointError` if unusable."""
    data = payload.get("model_config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: unreadable model configuration: expected a mapping, got "
                              f"{type(data).__name__}")
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{source}: unreadable model configuration: {_first_line(err)}") from None


def stored_sampler(payload: dict, source: str = "checkpoint") -> Sampler:
    """The :class:`Sampler` of a checkpoint; a :class:`CheckpointError` if unusable.

    Checkpoints of caloadapt 0.1 hold none: a distilled one is sampled in one consistency step on
    the noise range of its ``consistency`` marker, any other with the default Heun sampler.
    """
    data = payload.get("sampler")
    if data is None:
        marker = payload.get(CONSISTENCY_KEY)
        if not isinstance(marker, dict):
            return Sampler()
        data = {"kind": "consistency", "steps": 1,
                **{k: float(marker[k]) for k in ("sigma_min", "sigma_max", "rho") if k in marker}}
    try:
        return Sampler.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError, CaloadaptError) as err:
        raise CheckpointError(f"{source}: unreadable sampler settings: {_first_line(err)}") from None


def _check_weights(state, source: str) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{source}: weights must map parameter names to tensors")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: weight {name!r} holds NaN or infinite values")


def build_model(payload: dict, source: str = "checkpoint") -> ShowerModel:
    """A fresh :class:`ShowerModel` of a checkpoint's configuration (weights not loaded)."""
    config = stored_config(payload, source)
    try:
        return ShowerModel(config)
    except (TypeError, ValueError, RuntimeError, IndexError, ZeroDivisionError) as err:
        raise CheckpointError(f"{source}: model configuration cannot be built: {_first_line(err)}") from None


def load_weights(model: torch.nn.Module, state, source: str = "checkpoint", strict: bool = True):
    """``model.load_state_dict(state)`` with a :class:`CheckpointError` naming what does not fit."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: weights must map parameter names to tensors")
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} instead of {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{source}: weights do not fit the model: {len(wrong)} tensor(s) of another shape, "
                              f"e.g. {wrong[0]}")
    try:
        result = model.load_state_dict(state, strict=strict)
    except (RuntimeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{source}: weights do not fit the model: {_first_line(err)}") from None
    return result


def model_from_checkpoint(checkpoint: str | os.PathLike[str] | dict, weights: str = "ema",
                          config: ModelConfig | None = None, source: str | None = None) -> ShowerModel:
    """Rebuild the model of a checkpoint and load its ``ema`` (default) or raw ``model`` weights.

    With ``config``, check that the checkpoint fits that architecture and say what does not.
    ``source`` names a loaded payload in error messages (default: its path, or "checkpoint").
    """
    payload = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    source = source or ("checkpoint" if isinstance(checkpoint, dict) else str(checkpoint))
    stored = stored_config(payload, source)
    if config is not None and config != stored:
        differences = [f"{k}: checkpoint {v!r}, requested {getattr(config, k)!r}"
                       for k, v in stored.to_dict().items() if getattr(config, k) != getattr(stored, k)]
        raise CheckpointError(f"{source}: checkpoint does not fit the requested model ({'; '.join(differences)})")
    model = build_model(payload, source)
    state = payload.get(weights) if weights == "ema" else payload["model"]
    state = state if state is not None else payload["model"]
    result = load_weights(model, state, source, strict=False)
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


def load_model(checkpoint: str | os.PathLike[str] | dict, weights: str = "ema",
               source: str | None = None) -> tuple[ShowerModel, Sampler]:
    """The model of any checkpoint and the sampler it is to be generated with.

    Handles plain (pre-trained, scratch, multi-detector), adapted (peft adapters stored separately
    are merged into a plain :class:`ShowerModel`) and distilled checkpoints; anything wrong is a
    one-line :class:`CheckpointError`.

    Arguments:
        checkpoint: path, name of a shipped model, or a loaded payload (:func:`load_checkpoint`).
        weights: ``ema`` (default) or ``model`` (the raw weights).
        source: what to call a loaded payload in error messages (default: "checkpoint").
    """
    payload = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    source = source or ("checkpoint" if isinstance(checkpoint, dict) else str(checkpoint))
    sampler = stored_sampler(payload, source)
    method = payload.get("adapter")
    state = payload.get("ema") if weights == "ema" else payload["model"]
    state = state if state is not None else payload["model"]
    plain = build_model(payload, source)
    if method is None or set(state) == set(plain.state_dict()):
        return model_from_checkpoint(payload, weights=weights, source=source), sampler
    try:
        method = AdaptMethod.from_dict(method)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{source}: unreadable adaptation method: {_first_line(err)}") from None
    model, _ = prepare(plain, method, copy_model=False)
    load_weights(model, state, f"{source} ({method.name} adapters)")
    return restore_occupancy(merge(model, method, copy_model=False), payload, source), sampler


def inference_checkpoint(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> int:
    """Write a weights-only copy of ``source`` (its EMA weights as the model, no optimiser state).

    Any kind of checkpoint (:func:`load_model`); peft adapters are merged, so the copy is a plain
    model. The provenance (configuration, geometry, training state and command), the sampler and
    the occupancy calibrations are kept. Returns the size of the written file in bytes.
    """
    payload = load_checkpoint(source)
    model, _ = load_model(payload, source=str(source))
    return write_inference_checkpoint(model, payload, target)


def write_inference_checkpoint(model: ShowerModel, payload: dict, target: str | os.PathLike[str]) -> int:
    """Write ``model`` (its weights as EMA weights) with the provenance entries of ``payload``; bytes written."""
    save_checkpoint(target, model, ema=model.state_dict(), sampler=stored_sampler(payload),
                    **{k: payload[k] for k in _INFERENCE_KEYS if k in payload and k not in ("model_config", "sampler")})
    return Path(target).stat().st_size
