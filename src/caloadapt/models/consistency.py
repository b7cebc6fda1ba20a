"""Consistency distillation of the point diffusion model into a one-step (or few-step) sampler.

The recipe is that of CaloClouds II (method.md §4.6), which follows Y. Song, P. Dhariwal, M. Chen,
I. Sutskever, *Consistency Models*, ICML 2023, https://arxiv.org/abs/2303.01469:

- the consistency function ``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise, ctx)``
  with the boundary-condition scalings (Song et al. 2023, appendix C)
  ``c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)`` and
  ``c_out = (sigma - sigma_min) sigma_d / sqrt(sigma^2 + sigma_d^2)``, so ``f(x, sigma_min) = x``
  exactly; ``c_in`` and ``c_noise`` are the EDM ones, so the teacher's point network F is a
  good initialisation (:class:`ConsistencyPrecond`);
- student, EMA target and frozen teacher all start from the teacher's (EMA) weights; each step
  draws an index ``i`` uniformly from ``{0 .. n-2}`` on the Karras grid (n = 18), noises the data
  to ``sigma_i``, takes one deterministic Heun step of the teacher's probability-flow ODE to
  ``sigma_{i+1}`` and minimises ``|| f_student(x_{sigma_i}, sigma_i) - f_target(x_hat_{sigma_{i+1}}, sigma_{i+1}) ||^2``
  (uniform weights), averaged over the real points; the target follows the student by an EMA with
  mu = 0.95; RAdam, lr 1e-4, no scheduler, gradient clip 10 (:func:`distill`);
- sampling is one evaluation ``x = f(sigma_max z, sigma_max)``; the multistep sampler
  (Song et al. 2023, Algorithm 1) re-noises to lower levels and applies ``f`` again
  (:func:`sample_consistency`).

Only the point network is distilled; the shower flow is kept from the teacher unchanged. A
distilled checkpoint is an ordinary caloadapt checkpoint (it loads into a
:class:`~caloadapt.models.ShowerModel`, the student's weights in ``denoiser.net``) plus the marker
``consistency`` (see :func:`consistency_settings`). Its ``denoiser`` must be used through
:class:`ConsistencyPrecond` (``sample_consistency`` does that), never with the Heun/Euler samplers.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .edm import EDMPrecond, _finish, _initial_noise, _sigma_data_values, karras_sigmas

if TYPE_CHECKING:  # imported lazily at run time: shower_model may import this module for SAMPLERS
    from ..geometry import Geometry
    from ..showers import Showers
    from .shower_model import ShowerModel

__all__ = [
    "ConsistencyPrecond",
    "FusedDenoiser",
    "DistillConfig",
    "CONSISTENCY_KEY",
    "consistency_function",
    "consistency_settings",
    "multistep_sigmas",
    "sample_consistency",
    "distill",
    "generate_one_step",
    "load_consistency_model",
    "swapped_denoiser",
]

#: checkpoint entry that marks a distilled (consistency) checkpoint
CONSISTENCY_KEY = "consistency"


class ConsistencyPrecond(nn.Module):
    """Consistency-model parametrisation ``f(x; sigma)`` around a raw point network F.

    ``f(x; sigma) = c_skip x + c_out F(c_in x; c_noise, context)`` with (Song et al. 2023, app. C;
    method.md §4.6)

    - ``c_skip  = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)``
    - ``c_out   = (sigma - sigma_min) sigma_d / sqrt(sigma^2 + sigma_d^2)``
    - ``c_in    = 1 / sqrt(sigma^2 + sigma_d^2)``, ``c_noise = ln(sigma) / 4`` (as EDM)

    so that ``f(x; sigma_min) = x`` (the boundary condition). Same call interface as
    :class:`~caloadapt.models.edm.EDMPrecond`: ``forward(x (B, M, D), sigma (B,) or scalar, context (B, C))``.

    Arguments:
        net: the raw network, called as ``net(x, c_noise, context, mask)``.
        sigma_data: data standard deviation (one number or one per feature).
        sigma_min: the smallest noise level, where ``f`` is the identity.
    """

    sigma_data: Tensor

    def __init__(self, net: nn.Module, sigma_data: float | Sequence[float] = 0.5, sigma_min: float = 0.002) -> None:
        super().__init__()
        if not sigma_min > 0:
            raise ValueError(f"sigma_min must be positive, got {sigma_min}")
        self.net = net
        self.sigma_min = float(sigma_min)
        self.sigma_data_values = _sigma_data_values(sigma_data)
        self.register_buffer("sigma_data", torch.tensor(self.sigma_data_values), persistent=False)

    @classmethod
    def from_edm(cls, denoiser: EDMPrecond, sigma_min: float = 0.002, *, copy_net: bool = False) -> ConsistencyPrecond:
        """Wrap the point network of an EDM denoiser (shared, or a deep copy with ``copy_net``)."""
        net = copy.deepcopy(denoiser.net) if copy_net else denoiser.net
        wrapper = cls(net, denoiser.sigma_data_values, sigma_min)
        wrapper.sigma_data = wrapper.sigma_data.to(denoiser.sigma_data.device)  # the net is already there
        return wrapper

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for ``sigma`` of shape ``(B,)``; the first three broadcast
        against ``(B, M, D)``."""
        s = sigma.reshape(-1, 1, 1)
        sd = self.sigma_data.to(s.dtype)
        c_skip = sd**2 / ((s - self.sigma_min) ** 2 + sd**2)
        c_out = (s - self.sigma_min) * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = sigma.reshape(-1).log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: Tensor, sigma: Tensor | float, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """Consistency function ``f(x; sigma)`` of shape ``(B, M, D)`` (``mask`` as for ``EDMPrecond``)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        return c_skip * x + c_out * self.net(c_in * x, c_noise, context, mask)


def consistency_function(denoiser: nn.Module, sigma_min: float = 0.002) -> nn.Module:
    """The consistency function to evaluate for a denoiser handed to a sampler.

    An :class:`~caloadapt.models.edm.EDMPrecond` (what :meth:`ShowerModel.generate` passes; in a
    distilled model it holds the student network) is re-wrapped with the consistency scalings,
    sharing its network. Anything else (a :class:`ConsistencyPrecond`, an ONNX session exported
    from one) is taken to be the consistency function already; an ONNX denoiser exported from an
    EDM model (``kind == "edm"``) is refused.
    """
    if isinstance(denoiser, EDMPrecond):
        return ConsistencyPrecond.from_edm(denoiser, sigma_min)
    if isinstance(denoiser, FusedDenoiser):  # e.g. ShowerModel.generate wrapping its EDMPrecond
        return FusedDenoiser(consistency_function(denoiser.inner, sigma_min), denoiser.mask, denoiser.chunk_points)
    if getattr(denoiser, "kind", "consistency") != "consistency":
        raise ValueError("this denoiser is an EDM denoiser D(x; sigma), not a consistency function; "
                         "export the distilled checkpoint, or use the heun/euler samplers")
    return denoiser


def _fusable(net: nn.Module) -> bool:
    """True for a plain :class:`~caloadapt.models.pointwise.PointwiseNet` (no adapter wrappers)."""
    from .pointwise import ConcatSquashLinear, PointwiseNet, TimeEmbedding

    return (type(net) is PointwiseNet and type(net.time_embedding) is TimeEmbedding
            and all(type(layer) is ConcatSquashLinear and type(layer.linear) is nn.Linear
                    and type(layer.gate) is nn.Linear and type(layer.context_bias) is nn.Linear
                    for layer in net.layers))


def _fused_pointwise(net: nn.Module, x: Tensor, c_noise: Tensor, context: Tensor) -> Tensor:
    """``PointwiseNet.forward`` with fewer passes over the activations (memory-bound on CPU).

    Each layer computes ``(W h + b) * g + H ctx`` with the per-shower gate ``g`` and context bias:

    - showers with at least as many points as the layer has inputs: the gate and bias are folded
      into per-shower weights, ``h (W^T * g) + (b * g + H ctx)``, one ``baddbmm``;
    - smaller showers (where building per-shower weights would cost more than it saves):
      ``addcmul(H ctx, W h + b, g)``;

    followed by an in-place leaky-ReLU. Same values up to float rounding.
    """
    ctx = torch.cat([net.time_embedding(c_noise), context.to(x.dtype)], dim=-1)  # (S, C)
    h = x
    points = x.shape[1]
    last = len(net.layers) - 1
    for i, layer in enumerate(net.layers):
        gate = torch.sigmoid(layer.gate(ctx))  # (S, out)
        shift = layer.context_bias(ctx)  # (S, out)
        if points >= layer.linear.in_features:
            weight = layer.linear.weight.t().unsqueeze(0) * gate.unsqueeze(1)  # (S, in, out)
            h = torch.baddbmm(torch.addcmul(shift, layer.linear.bias, gate).unsqueeze(1), h, weight)
        else:
            h = torch.addcmul(shift.unsqueeze(1), layer.linear(h), gate.unsqueeze(1))
        if i < last:
            h = torch.nn.functional.leaky_relu_(h, net.negative_slope)
    return h


class FusedDenoiser(nn.Module):
    """Fast inference evaluation of an ``EDMPrecond`` or ``ConsistencyPrecond`` (same interface).

    - On CPU the point network runs with fused layers (:func:`_fused_pointwise`) when it is a
      plain ``PointwiseNet``; otherwise (and on GPUs) the wrapped module is called as is.
    - Showers are evaluated in chunks of about ``chunk_points`` points, so the activations stay
      in the CPU cache; with a ``mask`` whose real points are a prefix of each shower (as in
      ``ShowerModel.generate``), showers are sorted by size and each chunk is cut to its largest
      shower, so padding costs almost nothing. Padded points of the output are 0.
    - Under autograd (training) it simply calls the wrapped module.

    Arguments:
        denoiser: the module to evaluate (must have ``scalings(sigma)`` and ``net`` for fusion).
        mask: ``(B, M)`` bool of the batch this wrapper will see (optional).
        chunk_points: points per network call (default 2048 on CPU, 2^21 on CUDA).
    """

    def __init__(self, denoiser: nn.Module, mask: Tensor | None = None, chunk_points: int | None = None) -> None:
        super().__init__()
        self.inner = denoiser
        self.mask = mask
        self.chunk_points = chunk_points
        self.fusable = hasattr(denoiser, "scalings") and _fusable(getattr(denoiser, "net", None))
        self.kind = getattr(denoiser, "kind", "consistency" if isinstance(denoiser, ConsistencyPrecond) else "edm")

    def _evaluate(self, x: Tensor, sigma: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        if not self.fusable or x.device.type != "cpu":  # GPUs: the plain network (bandwidth is ample there)
            return self.inner(x, sigma, context, mask)
        c_skip, c_out, c_in, c_noise = self.inner.scalings(sigma)
        return torch.addcmul(c_skip * x, c_out, _fused_pointwise(self.inner.net, c_in * x, c_noise, context))

    def forward(self, x: Tensor, sigma: Tensor | float, context: Tensor, mask: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        batch, width = x.shape[:2]
        mask = mask if mask is not None else self.mask
        mask = mask if mask is not None and mask.shape == (batch, width) else None
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return self.inner(x, sigma, context, mask)
        chunk = self.chunk_points or (2**21 if x.device.type == "cuda" else 2048)
        if mask is not None:
            counts = mask.sum(dim=1)
            prefix = torch.arange(width, device=x.device)[None, :] < counts[:, None]
            if not torch.equal(prefix, mask):
                counts = None
        else:
            counts = None
        if counts is None:  # no usable mask: equal-width chunks of whole showers
            if batch * width <= chunk:
                return self._evaluate(x, sigma, context, mask)
            step = max(1, chunk // max(width, 1))
            return torch.cat([self._evaluate(x[i:i + step], sigma[i:i + step], context[i:i + step],
                                             None if mask is None else mask[i:i + step])
                              for i in range(0, batch, step)])
        order = counts.argsort(descending=True)
        sorted_counts = counts[order]
        # consecutive showers (largest first) in groups of about `chunk` real points
        group = torch.div(sorted_counts.cumsum(0) - sorted_counts, chunk, rounding_mode="floor")
        boundaries = torch.nonzero(group[1:] != group[:-1]).flatten().add(1).tolist()
        out = torch.zeros_like(x)
        widths = sorted_counts.tolist()
        for start, stop in zip([0, *boundaries], [*boundaries, batch]):
            m = widths[start]
            if m == 0:
                continue
            index = order[start:stop]
            out[index, :m] = self._evaluate(x[index, :m], sigma[index], context[index], mask[index, :m])
        return out.masked_fill_(~mask[..., None], 0.0)


def multistep_sigmas(n_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """Noise levels at which the multistep consistency sampler evaluates ``f``.

    ``[sigma_max]`` for one step; for ``n`` steps the first ``n`` levels of the Karras schedule
    with ``n + 1`` levels (``sigma_max`` down to ``sigma_min``), e.g. ``[80, 2.52]`` for two steps.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}")
    if n_steps == 1:
        return [float(sigma_max)]
    return karras_sigmas(n_steps + 1, sigma_min, sigma_max, rho)[:n_steps].tolist()


@torch.no_grad()
def sample_consistency(
    denoiser: nn.Module,
    context: Tensor,
    n_points: int | None = None,
    *,
    mask: Tensor | None = None,
    n_steps: int = 1,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    point_dim: int = 4,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    sigmas: Sequence[float] | None = None,
    fast: bool = True,
    chunk_points: int | None = None,
) -> Tensor:
    """One-step (or multistep) consistency sampler, same call style as :func:`~caloadapt.models.edm.sample_heun`.

    One step: ``x = f(sigma_max z, sigma_max)`` with ``z ~ N(0, I)``. ``n_steps > 1``: Song et al.
    2023, Algorithm 1: for each further level ``s`` of :func:`multistep_sigmas` (or ``sigmas``),
    ``x = f(x + sqrt(s^2 - sigma_min^2) z', s)`` with fresh noise ``z'``. Network evaluations:
    ``n_steps``. Padded points (``mask`` False) are returned as 0.

    Arguments:
        denoiser: a :class:`ConsistencyPrecond`, an ``EDMPrecond`` holding a distilled network
            (wrapped by :func:`consistency_function`), or an ONNX consistency function.
        context: per-shower conditioning ``(B, C)``.
        n_points, mask, point_dim, generator, noise: as for ``sample_heun``.
        n_steps: network evaluations (1: one-step; 2: two-step).
        sigma_min, sigma_max, rho: the distillation's noise range and schedule.
        sigmas: explicit decreasing noise levels (overrides ``n_steps``); ``sigmas[0]`` scales the
            initial noise.
        fast: evaluate through :class:`FusedDenoiser` (fused layers, cache-sized chunks, padding
            skipped); False calls the network on the padded batch (same values up to rounding).
        chunk_points: points per network call for ``fast``.
    """
    f = consistency_function(denoiser, sigma_min)
    if fast and not isinstance(f, FusedDenoiser):
        f = FusedDenoiser(f, mask=mask, chunk_points=chunk_points)
    levels = list(map(float, sigmas)) if sigmas is not None else multistep_sigmas(n_steps, sigma_min, sigma_max, rho)
    x = _initial_noise(context, n_points, point_dim, mask, generator, noise) * levels[0]
    batch = x.shape[0]
    x = f(x, x.new_full((batch,), levels[0]), context)
    for level in levels[1:]:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = f(x + math.sqrt(max(level**2 - sigma_min**2, 0.0)) * z, x.new_full((batch,), level), context)
    return _finish(x, mask)


def consistency_settings(checkpoint: str | os.PathLike[str] | dict) -> dict | None:
    """The ``consistency`` marker of a checkpoint (path or loaded payload), None for a diffusion model.

    Keys: ``sigma_min``, ``sigma_max``, ``rho``, ``steps`` (supported step counts, [1, 2]),
    ``sigmas`` (levels of the two-step sampler), ``n_grid`` (Karras grid of the distillation),
    ``teacher`` (provenance of the teacher).
    """
    if not isinstance(checkpoint, dict):
        from ..train.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(checkpoint)
    return checkpoint.get(CONSISTENCY_KEY)


def load_consistency_model(checkpoint: str | os.PathLike[str] | dict) -> tuple[ShowerModel, dict]:
    """Load a distilled checkpoint: ``(model, settings)``; a clear error for a plain diffusion checkpoint."""
    from ..adapt.finetune import load_adapted_model
    from ..errors import CheckpointError
    from ..train.checkpoint import load_checkpoint

    payload = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    settings = payload.get(CONSISTENCY_KEY)
    if settings is None:
        source = "checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
        raise CheckpointError(f"{source}: not a distilled (consistency) checkpoint; run `caloadapt distill` first")
    return load_adapted_model(payload), settings


@contextlib.contextmanager
def _sampler_registered(name: str, sampler) -> Iterator[None]:
    """Register ``sampler`` in ``ShowerModel``'s ``SAMPLERS`` under ``name`` for the duration of the block."""
    from .shower_model import SAMPLERS

    previous = SAMPLERS.get(name)
    SAMPLERS[name] = sampler
    try:
        yield
    finally:
        if previous is None:
            SAMPLERS.pop(name, None)
        else:
            SAMPLERS[name] = previous


@contextlib.contextmanager
def swapped_denoiser(model: ShowerModel, denoiser: nn.Module) -> Iterator[ShowerModel]:
    """Temporarily replace ``model.denoiser`` (e.g. by a :class:`ConsistencyPrecond` or an ONNX module)."""
    original = model.denoiser
    model.denoiser = denoiser
    try:
        yield model
    finally:
        model.denoiser = original


def generate_one_step(model: ShowerModel, geometry: Geometry, incident_energy_mev: np.ndarray, *,
                      n_steps: int = 1, settings: dict | None = None, denoiser: nn.Module | None = None,
                      generator: torch.Generator | None = None, particle: str = "electron",
                      max_points: int = 40_000, occupancy="auto") -> Showers:
    """Generate one batch of showers with a distilled model (``ShowerModel.generate`` with the
    consistency sampler; the flow and the post-processing are unchanged).

    Arguments:
        model: the distilled model (:func:`load_consistency_model`).
        settings: its ``consistency`` marker (noise range; defaults 0.002 and 80).
        denoiser: evaluate this consistency function instead of the model's network (e.g. an
            :class:`~caloadapt.export.onnx.OnnxDenoiser`).
        n_steps: 1 (one-step) or more (multistep).
        occupancy: as for :meth:`ShowerModel.generate` (``auto``: the model's calibration).
    """
    settings = settings or {}
    sigma_min = float(settings.get("sigma_min", 0.002))
    sigma_max = float(settings.get("sigma_max", 80.0))
    rho = float(settings.get("rho", 7.0))
    sigmas = settings.get("sigmas") if n_steps == 2 and settings.get("sigmas") else None

    def sampler(den, context, n_points=None, **kwargs):
        kwargs.update(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        if sigmas is not None:
            kwargs["sigmas"] = sigmas
        return sample_consistency(den, context, n_points, **kwargs)

    f = denoiser if denoiser is not None else ConsistencyPrecond.from_edm(model.denoiser, sigma_min)
    with _sampler_registered("_consistency_one_step", sampler), swapped_denoiser(model, f):
        return model.generate(geometry, incident_energy_mev, n_steps=n_steps, sampler="_consistency_one_step",
                              generator=generator, particle=particle, max_points=max_points,
                              occupancy=occupancy)


# -- distillation ----------------------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    """Options of one consistency distillation (recorded in its checkpoints as ``train_config``).

    Attributes:
        steps: optimiser steps (the CaloClouds II consistency model was trained for about 1M).
        batch_size: showers per step.
        lr: learning rate (1e-4, constant).
        optimizer: ``radam`` (CaloClouds II) or ``adam``.
        grad_clip: maximum gradient norm (10).
        target_ema: EMA decay mu of the target network (0.95).
        ema_decay: decay of the EMA of the student used for sampling (with the usual warm-up).
        n_grid: Karras grid size n of the distillation (18); i is drawn from {0 .. n-2}.
        sigma_min, sigma_max, rho: noise range and schedule (0.002, 80, 7).
        max_points: points per shower per step.
        n_samples, val_fraction, data_seed: the shower subset and split (as in training).
        val_max_showers, val_max_points: size of the validation set; its ``one_step`` score is the
            mean squared difference between the one-step sample and the teacher's Heun ODE
            solution (``val_teacher_steps`` steps) from the same noise (the distillation target).
        val_every, checkpoint_every: steps between validations / checkpoints.
        seed: seed of the training noise.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4
    optimizer: str = "radam"
    grad_clip: float = 10.0
    target_ema: float = 0.95
    ema_decay: float = 0.999
    n_grid: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    max_points: int = 1024
    n_samples: int | None = None
    val_fraction: float = 0.1
    val_max_showers: int = 256
    val_max_points: int = 256
    val_teacher_steps: int = 18
    val_every: int = 200
    checkpoint_every: int = 200
    seed: int = 0
    data_seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        from ..errors import InputError

        if self.optimizer not in {"adam", "radam"}:
            raise InputError(f"unknown optimizer {self.optimizer!r}; expected adam or radam")
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("steps and batch size must be positive")
        if self.n_grid < 2:
            raise InputError("the distillation grid needs at least 2 noise levels")
        if not 0 < self.sigma_min < self.sigma_max:
            raise InputError("need 0 < sigma_min < sigma_max")
        if not 0 <= self.target_ema < 1 or not 0 <= self.ema_decay < 1:
            raise InputError("EMA decays must lie in [0, 1)")


def _masked_mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Mean squared difference over the real points (``mask`` True) and the features."""
    squared = torch.where(mask[..., None], (a - b) ** 2, a.new_zeros(()))
    return squared.sum() / (mask.sum() * a.shape[-1]).clamp_min(1)


def _teacher_heun_step(teacher: nn.Module, x: Tensor, sigma: Tensor, sigma_next: Tensor, context: Tensor,
                       mask: Tensor) -> Tensor:
    """One deterministic Heun step of the probability-flow ODE from ``sigma`` to ``sigma_next`` (both (B,), > 0)."""
    s, s_next = sigma[:, None, None], sigma_next[:, None, None]
    d = (x - teacher(x, sigma, context, mask)) / s
    x_euler = x + (s_next - s) * d
    d_next = (x_euler - teacher(x_euler, sigma_next, context, mask)) / s_next
    return x + (s_next - s) * (0.5 * d + 0.5 * d_next)


@torch.no_grad()
def _lerp_module(ema: nn.Module, model: nn.Module, weight: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), weight)


def _net_of(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The point-network entries of a ShowerModel state dict, without the ``denoiser.net.`` prefix."""
    prefix = "denoiser.net."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def distill(teacher: ShowerModel, data_path: str | os.PathLike[str], geometry: Geometry,
            out_dir: str | os.PathLike[str], config: DistillConfig = DistillConfig(), *, resume: bool = False,
            checkpoint_parts: dict | None = None, stop_after_steps: int | None = None,
            progress: bool = True) -> dict:
    """Distil the teacher's point diffusion model into a consistency model (method.md §4.6).

    Writes ``last.pt`` (everything to resume), ``best.pt`` (the student EMA weights with the best
    validation ``one_step`` score; what ``caloadapt generate`` should load) and ``metrics.csv`` into
    ``out_dir``. Both checkpoints load as a :class:`ShowerModel` (student network, the teacher's
    flow and normalisation) and carry the ``consistency`` marker.

    Arguments:
        teacher: the trained diffusion model, with its EMA weights loaded (e.g. from
            :func:`caloadapt.adapt.load_adapted_model`); it is not modified.
        data_path, geometry: showers to noise (any file the teacher can read; usually its
            training or adaptation data).
        out_dir: run directory.
        config: :class:`DistillConfig`.
        resume: continue from ``out_dir/last.pt`` (same options required).
        checkpoint_parts: extra entries for every checkpoint (e.g. ``command``, ``teacher``).
        stop_after_steps: end this call after that many steps (with a checkpoint).
        progress: show a progress bar.

    Returns:
        Summary: ``steps``, ``best`` (validation scores), ``best_step``, ``final`` (last
        validation), ``wall_s``, ``checkpoint`` (path of ``best.pt``).
    """
    from tqdm.auto import tqdm

    from ..data.io import count_showers, read_showers
    from ..errors import CheckpointError
    from ..train.checkpoint import load_checkpoint, save_checkpoint
    from ..train.data import ShowerSubset, make_batch, split_indices
    from ..train.loop import resolve_device

    device = resolve_device(config.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    # data, as in training: the subset and split depend only on the data seed
    train_idx, val_idx = split_indices(count_showers(data_path), config.n_samples, config.val_fraction,
                                       config.data_seed)
    subset = ShowerSubset(data_path, geometry, train_idx)
    val_showers = read_showers(data_path, geometry, indices=val_idx[: config.val_max_showers])
    val_rng = np.random.default_rng([config.data_seed, 1])
    val = [make_batch(chunk, geometry, teacher.config, val_rng, config.val_max_points).to(device)
           for chunk in val_showers.chunks(64)]

    # networks: frozen teacher; student, its EMA and the target all start from the teacher's weights
    base = copy.deepcopy(teacher).to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    edm = base.denoiser
    student = ConsistencyPrecond.from_edm(edm, config.sigma_min, copy_net=True).train()
    for p in student.parameters():
        p.requires_grad_(True)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    student_ema = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = (torch.optim.RAdam if config.optimizer == "radam" else torch.optim.Adam)(
        student.parameters(), lr=config.lr)
    grid_sigmas = karras_sigmas(config.n_grid, config.sigma_min, config.sigma_max, config.rho)[:-1]
    grid_sigmas = grid_sigmas.to(device=device, dtype=torch.float32)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "best": {"one_step": math.inf, "loss": math.inf},
                             "best_step": 0, "final": {}, "wall_s": 0.0}

    last, best = out_dir / "last.pt", out_dir / "best.pt"
    if resume and last.exists():
        payload = load_checkpoint(last)
        if payload.get("train_config") != asdict(config):
            raise CheckpointError(f"{last}: was written with other distillation options; resume with the same ones")
        student.net.load_state_dict(_net_of(payload["model"]))
        student_ema.net.load_state_dict(_net_of(payload["ema"]))
        target.net.load_state_dict(payload["target"])
        optimizer.load_state_dict(payload["optimizer"])
        state = payload["train_state"]
        best_ema = _net_of(load_checkpoint(best)["ema"]) if best.exists() else None
    else:
        best_ema = None
    best_ema = best_ema or {k: v.clone() for k, v in student_ema.net.state_dict().items()}

    settings = {"sigma_min": config.sigma_min, "sigma_max": config.sigma_max, "rho": config.rho,
                "steps": [1, 2], "sigmas": multistep_sigmas(2, config.sigma_min, config.sigma_max, config.rho),
                "n_grid": config.n_grid, "teacher": (checkpoint_parts or {}).get("teacher")}
    parts = {"train_config": asdict(config), "geometry": {"name": geometry.name, "spec": geometry.spec},
             CONSISTENCY_KEY: settings, **(checkpoint_parts or {})}
    teacher_state = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}
    skeleton = copy.deepcopy(base).cpu()  # the saved model: the teacher's flow and buffers, the student's net

    def write(path: Path, ema_net: dict[str, Tensor], full: bool) -> None:
        skeleton.denoiser.net.load_state_dict({k: v.detach().cpu() for k, v in student.net.state_dict().items()})
        model = skeleton
        ema = {**teacher_state, **{f"denoiser.net.{k}": v.detach().cpu().clone() for k, v in ema_net.items()}}
        extra = {"target": {k: v.detach().cpu() for k, v in target.net.state_dict().items()},
                 "optimizer": optimizer.state_dict()} if full else {}
        save_checkpoint(path, model, ema=ema, train_state=state, **extra, **parts)

    # validation: fixed noise; the teacher's ODE solutions are computed once
    val_gen = torch.Generator(device).manual_seed(12345)
    val_noise = [torch.randn(b.points.shape, generator=val_gen, device=device) for b in val]
    from .edm import sample_heun

    with torch.inference_mode():
        reference = [sample_heun(FusedDenoiser(edm, mask=b.mask), b.condition, mask=b.mask,
                                 n_steps=config.val_teacher_steps,
                                 sigma_min=config.sigma_min, sigma_max=config.sigma_max, rho=config.rho, noise=z)
                     for b, z in zip(val, val_noise)]

    def validate() -> dict[str, float]:
        gen = torch.Generator(device).manual_seed(54321)
        one_step, loss, n = 0.0, 0.0, 0
        with torch.inference_mode():
            for b, z, ref in zip(val, val_noise, reference):
                x1 = sample_consistency(student_ema, b.condition, mask=b.mask, sigma_min=config.sigma_min,
                                        sigma_max=config.sigma_max, noise=z)
                one_step += float(_masked_mse(x1, ref, b.mask)) * len(b)
                loss += float(_step_loss(b, gen, student_ema)) * len(b)
                n += len(b)
        return {"one_step": one_step / max(n, 1), "loss": loss / max(n, 1)}

    def _step_loss(b, gen: torch.Generator, online: nn.Module) -> Tensor:
        x = (b.points - base.point_mean) / base.point_std
        x = torch.where(b.mask[..., None], x, x.new_zeros(()))
        index = torch.randint(0, config.n_grid - 1, (len(b),), generator=gen, device=device)
        sigma, sigma_next = grid_sigmas[index], grid_sigmas[index + 1]
        x_cur = x + sigma[:, None, None] * torch.randn(x.shape, generator=gen, device=device)
        with torch.no_grad():
            x_next = _teacher_heun_step(edm, x_cur, sigma, sigma_next, b.condition, b.mask)
            goal = target(x_next, sigma_next, b.condition, b.mask)
        return _masked_mse(online(x_cur, sigma, b.condition, b.mask), goal, b.mask)

    metrics_path = out_dir / "metrics.csv"
    if not (resume and metrics_path.exists()):
        with open(metrics_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "epoch", "train_loss", "val_loss", "val_one_step", "wall_s"])
        if state["step"] == 0:  # the starting point: the teacher's network under the consistency scalings
            state["final"] = validate()
            state["best"] = dict(state["final"])
            with open(metrics_path, "a", newline="") as f:
                csv.writer(f).writerow([0, 0, "", state["final"]["loss"], state["final"]["one_step"], 0.0])

    bar = tqdm(total=config.steps, initial=state["step"], disable=not progress, desc="distill", unit="step")
    started = time.perf_counter() - state["wall_s"]
    running, n_running = 0.0, 0
    stop = False
    while state["step"] < config.steps and not stop:
        for showers in subset.batches(config.batch_size, config.data_seed, state["epoch"], skip=state["position"]):
            step = state["step"]
            batch = make_batch(showers, geometry, teacher.config, np.random.default_rng([config.seed, step]),
                               config.max_points).to(device)
            gen = torch.Generator(device).manual_seed(config.seed * 1_000_003 + step * 101)
            loss = _step_loss(batch, gen, student)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite distillation loss at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()
            _lerp_module(target, student, 1 - config.target_ema)
            _lerp_module(student_ema, student, 1 - min(config.ema_decay, (1 + step) / (10 + step)))
            state["step"] += 1
            state["position"] += 1
            running += float(loss.detach())
            n_running += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / n_running:.4f}")

            step = state["step"]
            if stop_after_steps is not None and step >= stop_after_steps:
                stop = True
            if step % config.val_every == 0 or step == config.steps:
                scores = validate()
                state["final"] = scores
                if scores["one_step"] < state["best"]["one_step"]:
                    state["best"], state["best_step"] = dict(scores), step
                    best_ema = {k: v.clone() for k, v in student_ema.net.state_dict().items()}
                with open(metrics_path, "a", newline="") as f:
                    csv.writer(f).writerow([step, state["epoch"], running / max(n_running, 1), scores["loss"],
                                            scores["one_step"], round(time.perf_counter() - started, 2)])
                running, n_running = 0.0, 0
                write(best, best_ema, full=False)
            if step % config.checkpoint_every == 0 or step == config.steps or stop:
                state["wall_s"] = time.perf_counter() - started
                write(last, student_ema.net.state_dict(), full=True)
            if step >= config.steps or stop:
                break
        else:
            state["epoch"] += 1
            state["position"] = 0
    bar.close()
    if not best.exists():  # stopped before the first validation
        write(best, best_ema, full=False)
    return {"steps": state["step"], "best": state["best"], "best_step": state["best_step"],
            "final": state["final"], "wall_s": time.perf_counter() - started, "checkpoint": str(best)}
