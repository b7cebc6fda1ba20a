"""The consistency function of a distilled point network and its one-step / multistep sampler.

Y. Song, P. Dhariwal, M. Chen, I. Sutskever, *Consistency Models*, ICML 2023, arXiv:2303.01469,
as used by CaloClouds II (Buhmann et al. 2023, arXiv:2309.05704):

- the consistency function ``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise, ctx)``
  with the boundary-condition scalings (Song et al. 2023, appendix C)
  ``c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)`` and
  ``c_out = (sigma - sigma_min) sigma_d / sqrt(sigma^2 + sigma_d^2)``, so ``f(x, sigma_min) = x``
  exactly; ``c_in`` and ``c_noise`` are the EDM ones, so the teacher's point network F is a
  good initialisation (:class:`ConsistencyPrecond`);
- sampling is one evaluation ``x = f(sigma_max z, sigma_max)``; the multistep sampler
  (Song et al. 2023, Algorithm 1) re-noises to lower levels and applies ``f`` again
  (:func:`sample_consistency`).

The distillation that trains the student is :func:`caloadapt.train.distill.distill`. A distilled
checkpoint loads into a :class:`~caloadapt.models.ShowerModel` (the student's weights in
``denoiser.net``) with the ``consistency`` marker and the consistency sampler of its noise range;
its ``denoiser`` must be evaluated through :class:`ConsistencyPrecond` (``sample_consistency``
does that), never with the Heun/Euler samplers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .edm import (EDMPrecond, given_mask, as_sigma_data, given_scalings, impose_given, initial_noise,
                  karras_sigmas, zero_padding)
from .fused import FusedDenoiser

__all__ = [
    "ConsistencyPrecond",
    "CONSISTENCY_KEY",
    "consistency_function",
    "multistep_sigmas",
    "sample_consistency",
]

#: checkpoint entry that marks a distilled (consistency) checkpoint
CONSISTENCY_KEY = "consistency"


class ConsistencyPrecond(nn.Module):
    """Consistency-model parametrisation ``f(x; sigma)`` around a raw point network F.

    ``f(x; sigma) = c_skip x + c_out F(c_in x; c_noise, context)`` with (Song et al. 2023, app. C;
    docs/model.md §5)

    - ``c_skip  = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)``
    - ``c_out   = (sigma - sigma_min) sigma_d / sqrt(sigma^2 + sigma_d^2)``
    - ``c_in    = 1 / sqrt(sigma^2 + sigma_d^2)``, ``c_noise = ln(sigma) / 4`` (as EDM)

    so that ``f(x; sigma_min) = x`` (the boundary condition). Same call interface as
    :class:`~caloadapt.models.edm.EDMPrecond`: ``forward(x (B, M, D), sigma (B,) or scalar, context (B, C))``.

    Arguments:
        net: the raw network, called as ``net(x, c_noise, context, mask)``.
        sigma_data: data standard deviation (one number or one per feature).
        sigma_min: the smallest noise level, where ``f`` is the identity.
        given_channels: feature channels that are conditions (as for ``EDMPrecond``): ``f`` returns
            them unchanged.
    """

    sigma_data: Tensor
    #: what this module computes (an ONNX export records it)
    kind = "consistency"

    def __init__(self, net: nn.Module, sigma_data: float | Sequence[float] = 0.5, sigma_min: float = 0.002,
                 given_channels: Sequence[int] = ()) -> None:
        super().__init__()
        if not sigma_min > 0:
            raise ValueError(f"sigma_min must be positive, got {sigma_min}")
        self.net = net
        self.sigma_min = float(sigma_min)
        self.sigma_data_values = as_sigma_data(sigma_data)
        self.given_channels = tuple(int(c) for c in given_channels)
        self.register_buffer("sigma_data", torch.tensor(self.sigma_data_values), persistent=False)
        self.register_buffer("given", given_mask(self.given_channels, getattr(net, "point_dim", None)),
                             persistent=False)

    @classmethod
    def from_edm(cls, denoiser: EDMPrecond, sigma_min: float = 0.002, *, copy_net: bool = False) -> ConsistencyPrecond:
        """Wrap the point network of an EDM denoiser (shared, or a deep copy with ``copy_net``)."""
        net = copy.deepcopy(denoiser.net) if copy_net else denoiser.net
        wrapper = cls(net, denoiser.sigma_data_values, sigma_min, getattr(denoiser, "given_channels", ()))
        # the net is already there
        wrapper.sigma_data, wrapper.given = wrapper.sigma_data.to(denoiser.sigma_data.device), wrapper.given.to(
            denoiser.sigma_data.device)
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
        return (*given_scalings(c_skip, c_out, c_in, sd, self.given), c_noise)

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
        return FusedDenoiser(consistency_function(denoiser.inner, sigma_min), denoiser.chunk_points)
    if getattr(denoiser, "kind", "consistency") != "consistency":
        raise ValueError("this denoiser is an EDM denoiser D(x; sigma), not a consistency function; "
                         "export the distilled checkpoint, or use the heun/euler samplers")
    return denoiser


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
    given: Tensor | None = None,
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
        given: values of the given channels, NaN elsewhere (as for ``sample_heun``); re-noising
            leaves them as they are.
    """
    f = consistency_function(denoiser, sigma_min)
    if fast and not isinstance(f, FusedDenoiser):
        f = FusedDenoiser(f, chunk_points=chunk_points)
    levels = list(map(float, sigmas)) if sigmas is not None else multistep_sigmas(n_steps, sigma_min, sigma_max, rho)
    x = impose_given(initial_noise(context, n_points, point_dim, mask, generator, noise) * levels[0], given)
    batch = x.shape[0]
    x = f(x, x.new_full((batch,), levels[0]), context, mask)
    for level in levels[1:]:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_noisy = impose_given(x + math.sqrt(max(level**2 - sigma_min**2, 0.0)) * z, given)
        x = f(x_noisy, x.new_full((batch,), level), context, mask)
    return zero_padding(x, mask)
