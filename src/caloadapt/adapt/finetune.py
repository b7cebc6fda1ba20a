"""One fine-tuning run: pre-trained checkpoint -> method -> training -> merged, loadable model.

Files of a run directory (besides those of :func:`caloadapt.train.train`):

- ``parameters.json``: the trainable / total parameters per group (:func:`parameter_report`),
  also stored in every checkpoint of the run as ``parameters``, and ``whole_model``: those of the
  point network and the flow together (:func:`whole_model`);
- ``model.pt``: the best EMA weights with any peft adapters merged, a plain checkpoint.

``best.pt`` and ``last.pt`` keep peft adapters separate (they are what ``--resume`` continues);
:func:`caloadapt.models.checkpoint.load_model` loads either kind.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from .._atomic import atomic_path
from ..geometry import Geometry
from ..models.adapters import AdaptMethod, format_report, parameter_report, prepare
from ..models.checkpoint import load_checkpoint, load_model, save_checkpoint
from ..train.loop import train

__all__ = ["finetune", "load_adapted_state", "whole_model"]


def whole_model(rows: list[dict]) -> dict:
    """Trainable / total parameters of the whole model (point network + flow) from the report rows:
    the number a parameter-efficiency claim is about (BitFit of the point network with the flow fully
    adapted trains most of the model)."""
    by_group = {r["group"]: r for r in rows}
    every, net, flow = by_group["all"], by_group["net"], by_group["flow"]
    return {"trainable": every["trainable"], "total": every["total"], "percent": every["percent"],
            "trainable_net": net["trainable"], "trainable_flow": flow["trainable"]}


def load_adapted_state(payload: dict, source: str = "checkpoint", weights: str = "ema") -> dict:
    """The state dict of a loaded checkpoint with peft adapters merged (EMA weights if present)."""
    return {k: v.detach().clone() for k, v in load_model(payload, weights, source)[0].state_dict().items()}


def finetune(pretrained: str | os.PathLike[str], data_path: str | os.PathLike[str], geometry: Geometry,
             out_dir: str | os.PathLike[str], method: AdaptMethod, config, *, resume: bool = False,
             checkpoint_parts: dict | None = None, stop_after_steps: int | None = None,
             hits_as_spots: bool | None = None, progress: bool = True, log=print) -> dict:
    """Adapt the pre-trained model to the showers of ``data_path`` with ``method``.

    Arguments:
        pretrained: checkpoint of the pre-trained model (its architecture and feature
            normalisation are kept; ``scratch`` re-initialises the weights only).
        data_path, geometry: target training data and its geometry.
        out_dir: run directory.
        method: the adaptation method.
        config: :class:`caloadapt.train.TrainConfig`; its ``seed`` also seeds the initialisation
            of ``scratch`` and of the adapters.
        resume, checkpoint_parts, stop_after_steps, progress: as for :func:`caloadapt.train.train`.
        hits_as_spots: train on the target's hits split into spot-like points
            (:attr:`~caloadapt.models.ModelConfig.hits_as_spots`); None keeps the pre-trained model's setting.
        log: called with the parameter table (None: silent).

    Returns:
        The training summary with ``parameters`` (the report rows) and ``model`` (path of the
        merged checkpoint).
    """
    out_dir = Path(out_dir)
    base, sampler = load_model(pretrained)  # the adapted model is generated as its pre-trained model was
    base.occupancy = {}  # calibrations belong to the weights they were fitted with; training fits the target's
    if hits_as_spots is not None:
        base.config = replace(base.config, hits_as_spots=hits_as_spots)
    model, names = prepare(base, method, seed=config.seed)
    rows = parameter_report(model, names)
    if log is not None:
        log(f"adaptation method {method.label()} (flow: {'full' if method.name == 'scratch' else method.flow})\n"
            + format_report(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "parameters.json") as tmp:
        tmp.write_text(json.dumps({"method": method.to_dict(), "whole_model": whole_model(rows), "trainable": names,
                                   "groups": rows}, indent=1))
    parts = {"adapter": method.to_dict(), "parameters": rows, "pretrained": str(pretrained),
             **(checkpoint_parts or {})}
    summary = train(model, data_path, geometry, out_dir, config, trainable=names, resume=resume,
                    fit_normalisation=False, checkpoint_parts=parts, stop_after_steps=stop_after_steps,
                    progress=progress, sampler=sampler)
    if int(os.environ.get("RANK", "0")) == 0:
        payload = load_checkpoint(out_dir / "best.pt")
        merged, _ = load_model(payload, "ema", str(out_dir / "best.pt"))
        keep = {k: payload[k] for k in ("train_config", "train_state", "geometry", "trainable") if k in payload}
        state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
        save_checkpoint(out_dir / "model.pt", merged.to(torch.device("cpu")), ema=state, sampler=sampler, **keep,
                        **parts)
    return {**summary, "parameters": rows, "whole_model": whole_model(rows), "model": str(out_dir / "model.pt")}
