"""Training a model's flow by itself: its point network is kept as it is.

The flow (per-layer hits and energies, centre of gravity) and the point network learn from losses of
their own (docs/model.md), so a trained model's flow can be trained further, or replaced by a flow of
another size trained from scratch, without touching the point network. Two uses (docs/inclined.md,
docs/speed.md): a flow that was still improving when its pre-training's schedule ended (the angular
model's), and a smaller flow for a one-step student, whose own flow costs as much as its network.
The data are the model's training showers; each step is the flow's likelihood of a batch of them
(``--max-points`` only bounds what is read of their points: the flow sees per-shower statistics).
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from ..geometry import Geometry
from ..models import ShowerModel
from ..models.checkpoint import load_model
from .loop import Objective, TrainConfig, train

__all__ = ["FlowLikelihood", "train_flow"]


class FlowLikelihood(Objective):
    """The flow's negative log-likelihood per statistic; the flow is kept at its best validation loss."""

    train_keys = val_keys = ("flow",)
    best = {"flow": "flow."}
    name = "train-flow"

    def losses(self, model, batch, generator):
        return model(batch.points, batch.mask, batch.condition, batch.statistics, generator, diffusion=False)

    @torch.no_grad()
    def validate(self, model, batches, device):
        total = sum(float(model.flow_loss(b.condition.to(device), b.statistics.to(device))) * len(b) for b in batches)
        return {"flow": total / sum(len(b) for b in batches)}


def _with_new_flow(model: ShowerModel, transforms: int | None, hidden: tuple[int, ...] | None) -> ShowerModel:
    """``model`` with a freshly initialised flow of the given size (the global RNG draws it); all else kept."""
    config = replace(model.config, flow_transforms=transforms or model.config.flow_transforms,
                     flow_hidden=tuple(hidden or model.config.flow_hidden))
    fresh = ShowerModel(config)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("flow.")}
    missing, unexpected = fresh.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith("flow.") for k in missing), (missing, unexpected)
    return fresh


def train_flow(checkpoint: str | os.PathLike[str], data: str | os.PathLike[str], geometry: Geometry,
               out_dir: str | os.PathLike[str], config: TrainConfig, *, flow_transforms: int | None = None,
               flow_hidden: tuple[int, ...] | None = None, resume: bool = False,
               checkpoint_parts: dict | None = None, progress: bool = True) -> dict:
    """Train the flow of ``checkpoint`` alone on the showers of ``data``; write the run as :func:`train` does.

    Arguments:
        checkpoint: a trained model (pre-trained, adapted or distilled); its point network, feature
            normalisation and sampler are kept. Its occupancy calibration belonged to its old flow and
            is dropped (``config.occupancy_showers`` fits a new one at the end, or ``caloadapt
            calibrate``).
        flow_transforms, flow_hidden: a new flow of this size, from a fresh initialisation drawn from
            ``config.seed``; None (both): go on training the checkpoint's own flow.
        resume, checkpoint_parts, progress: as for :func:`train`.
    """
    model, sampler = load_model(checkpoint)
    model.occupancy = {}
    if flow_transforms is not None or flow_hidden is not None:
        torch.manual_seed(config.seed)
        model = _with_new_flow(model, flow_transforms, flow_hidden)
    names = [name for name, _ in model.named_parameters() if name.startswith("flow.")]
    parts = {"flow_trained_from": str(checkpoint), **(checkpoint_parts or {})}
    return train(model, data, geometry, out_dir, config, trainable=names, resume=resume, fit_normalisation=False,
                 checkpoint_parts=parts, progress=progress, objective=FlowLikelihood(), sampler=sampler)
