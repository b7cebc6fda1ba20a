"""Models: the per-point diffusion network with EDM preconditioning, its samplers, and ShowerFlow.

- :mod:`~caloadapt.models.pointwise`: CaloClouds II PointWise-Net with named parameter groups;
- :mod:`~caloadapt.models.transformer`: a point transformer (attention through inducing tokens,
  adaptive layer norm), the alternative backbone with the same adaptation interface;
- :mod:`~caloadapt.models.edm`: EDM preconditioning, masked loss, Karras schedule, Heun/Euler samplers;
- :mod:`~caloadapt.models.flow`: conditional neural spline flow over per-shower statistics;
- :mod:`~caloadapt.models.representation`: point frames, flow statistics on an X0 grid, conditioning;
- :mod:`~caloadapt.models.consistency`, :mod:`~caloadapt.models.fused`: the consistency function of a distilled
  model, fast CPU evaluation of a point network;
- :mod:`~caloadapt.models.sampling`: the :class:`Sampler` a checkpoint is generated with;
- :mod:`~caloadapt.models.shower_model`: flow + diffusion together, training losses and generation;
- :mod:`~caloadapt.models.adapters`: the adaptation methods (trained parameter groups, peft adapters);
- :mod:`~caloadapt.models.checkpoint`: the checkpoint format and :func:`load_model`, the loader of every
  kind of checkpoint.
"""

from __future__ import annotations

from .edm import (
    Denoiser,
    EDMLoss,
    EDMPrecond,
    karras_sigmas,
    random_point_subset,
    sample_euler,
    sample_heun,
)
from .flow import ShowerFlow
from .pointwise import PARAMETER_GROUPS, ConcatSquashLinear, FourierFeatures, PointwiseNet, TimeEmbedding
from .representation import FRAMES, DepthGrid, PointFrame
from .checkpoint import load_model
from .sampling import DEFAULT_STEPS, SAMPLER_KINDS, Sampler
from .shower_model import BACKBONES, ModelConfig, ShowerModel
from .transformer import PointTransformer

__all__ = [
    "PARAMETER_GROUPS",
    "ConcatSquashLinear",
    "FourierFeatures",
    "TimeEmbedding",
    "PointwiseNet",
    "PointTransformer",
    "BACKBONES",
    "Denoiser",
    "EDMPrecond",
    "EDMLoss",
    "random_point_subset",
    "karras_sigmas",
    "sample_heun",
    "sample_euler",
    "ShowerFlow",
    "FRAMES",
    "DepthGrid",
    "PointFrame",
    "DEFAULT_STEPS",
    "SAMPLER_KINDS",
    "Sampler",
    "ModelConfig",
    "ShowerModel",
    "load_model",
]
