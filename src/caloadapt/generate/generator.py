"""Batched, seeded shower generation from a :class:`~caloadapt.models.ShowerModel`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..geometry import Geometry
from ..models.shower_model import SAMPLERS, ShowerModel
from ..errors import InputError
from ..showers import Showers

__all__ = ["iter_generate"]


def iter_generate(model: ShowerModel, geometry: Geometry, incident_energy_mev: np.ndarray, *,
                  particle: str = "electron", n_steps: int = 13, sampler: str = "heun", seed: int = 0,
                  batch_size: int = 64, digitise: bool = True, device: torch.device | str = "cpu",
                  progress: bool = False) -> Iterator[Showers]:
    """Generate showers batch by batch, in the order of ``incident_energy_mev`` (MeV).

    With ``digitise`` the points are summed into the geometry's cells and cut at its threshold
    (one point per hit cell, as in the real data sets); otherwise raw points at layer centres.
    The same seed gives the same showers for the same batch size.
    """
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if n_steps < 1:
        raise InputError("the number of sampler steps must be at least 1")
    energy = np.asarray(incident_energy_mev, np.float64)
    model = model.to(device).eval()
    generator = torch.Generator(device).manual_seed(seed)
    with tqdm(total=len(energy), unit="shower", disable=not progress, desc=f"generate {geometry.name}") as bar:
        for start in range(0, len(energy), batch_size):
            chunk = energy[start:start + batch_size]
            showers = model.generate(geometry, chunk, n_steps=n_steps, sampler=sampler, generator=generator,
                                     particle=particle)
            yield geometry.digitise(showers) if digitise else showers
            bar.update(len(chunk))
