"""How a trained model is sampled: one typed value, chosen when the checkpoint is written.

A :class:`Sampler` names the ODE solver and its noise schedule. Training writes the EDM default
(Heun, 13 steps, Karras et al. 2022 schedule); distillation writes the consistency sampler with
the noise range the student was distilled on. :func:`caloadapt.models.checkpoint.load_model`
returns it beside the model, so generation uses the checkpoint's own settings unless a caller
overrides the steps. The occupancy calibration is not part of it: it is fitted per geometry and
stays with the model (:attr:`ShowerModel.occupancy`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import Tensor, nn

from ..errors import InputError
from .consistency import sample_consistency
from .edm import DEFAULT_STEPS, sample_euler, sample_heun

__all__ = ["Sampler", "SAMPLER_KINDS", "DEFAULT_STEPS"]

#: ``heun`` and ``euler`` solve the probability-flow ODE of a diffusion model; ``consistency``
#: evaluates a distilled consistency function (``caloadapt distill``)
SAMPLER_KINDS = ("heun", "euler", "consistency")


@dataclass(frozen=True)
class Sampler:
    """A sampler of the point cloud and its noise schedule.

    Attributes:
        kind: ``heun``, ``euler`` or ``consistency`` (:data:`SAMPLER_KINDS`).
        steps: noise levels before the final 0 (Heun: ``2 steps - 1`` network evaluations) or,
            for ``consistency``, network evaluations (1: one-step).
        sigma_min, sigma_max, rho: the Karras schedule (Karras et al. 2022, eq. 5,
            arXiv:2206.00364); a distilled model must be sampled on the range it was distilled on.
    """

    kind: str = "heun"
    steps: int = DEFAULT_STEPS
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        if self.kind not in SAMPLER_KINDS:
            raise InputError(f"unknown sampler {self.kind!r}; expected one of {', '.join(SAMPLER_KINDS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"the number of sampler steps must be an integer of at least 1, got {self.steps!r}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise InputError(f"the sampler needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.sigma_max > math.sqrt(torch.finfo(torch.float32).max):  # the network works in float32, with sigma^2
            raise InputError(f"the sampler's sigma_max {self.sigma_max} is beyond what float32 networks compute with")
        if not self.rho > 0:
            raise InputError(f"the sampler's rho must be positive, got {self.rho}")

    @property
    def distilled(self) -> bool:
        """True for the consistency sampler, which needs a distilled network."""
        return self.kind == "consistency"

    def with_steps(self, steps: int | None) -> Sampler:
        """The same sampler with ``steps`` steps (None: unchanged)."""
        return self if steps is None else replace(self, steps=int(steps))

    def with_sigma_max(self, sigma_max: float | None) -> Sampler:
        """The same sampler starting from noise level ``sigma_max`` (None: unchanged)."""
        return self if sigma_max is None else replace(self, sigma_max=float(sigma_max))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Sampler:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown sampler settings {sorted(unknown)}")
        return cls(**data)

    def __call__(self, denoiser: nn.Module, context: Tensor, mask: Tensor, *,
                 generator: torch.Generator | None = None, noise: Tensor | None = None,
                 given: Tensor | None = None) -> Tensor:
        """Sample ``(B, M, 4)`` normalised point features for the real points of ``mask`` ``(B, M)``.

        ``denoiser`` is an EDM denoiser ``D(x; sigma, context, mask)`` for ``heun`` / ``euler``; for
        ``consistency`` the same module holding a distilled network, or a consistency function.
        ``given``: the values of the denoiser's given channels, NaN elsewhere (``sample_heun``).
        """
        schedule = {"n_steps": self.steps, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho}
        solver = {"heun": sample_heun, "euler": sample_euler, "consistency": sample_consistency}[self.kind]
        return solver(denoiser, context, mask=mask, generator=generator, noise=noise, given=given, **schedule)
