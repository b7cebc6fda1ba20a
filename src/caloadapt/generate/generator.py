"""Batched, seeded shower generation from a :class:`~caloadapt.models.ShowerModel`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..geometry import Geometry
from ..models.sampling import Sampler
from ..models.shower_model import ShowerModel
from ..showers import Showers

__all__ = ["iter_generate"]


def iter_generate(model: ShowerModel, geometry: Geometry, incident_energy_mev: np.ndarray, sampler: Sampler = Sampler(),
                  *, particle: str = "electron", seed: int = 0, batch_size: int = 64, digitise: bool = True,
                  device: torch.device | str = "cpu", progress: bool = False, theta_deg: np.ndarray | None = None,
                  phi_deg: np.ndarray | None = None) -> Iterator[Showers]:
    """Generate showers batch by batch, in the order of ``incident_energy_mev`` (MeV), at the incidence
    angles ``theta_deg``, ``phi_deg`` (one per shower; normal incidence when not given).

    ``sampler`` is usually the checkpoint's own (:func:`caloadapt.models.checkpoint.load_model`).
    With ``digitise`` the points are summed into the geometry's cells and cut at its threshold
    (one point per hit cell, as in the real data sets); otherwise raw points at layer centres.
    The same seed gives the same showers for the same batch size.
    """
    energy = np.asarray(incident_energy_mev, np.float64)
    model = model.to(device).eval()
    generator = torch.Generator(device).manual_seed(seed)
    angles = {name: np.asarray(values, np.float64) for name, values in (("theta_deg", theta_deg),
                                                                          ("phi_deg", phi_deg)) if values is not None}
    with tqdm(total=len(energy), unit="shower", disable=not progress, desc=f"generate {geometry.name}") as bar:
        for start in range(0, len(energy), batch_size):
            chunk = energy[start:start + batch_size]
            yield model.generate(geometry, chunk, sampler, generator=generator, particle=particle, digitise=digitise,
                                 **{name: values[start:start + batch_size] for name, values in angles.items()})
            bar.update(len(chunk))
