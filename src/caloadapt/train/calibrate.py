"""Occupancy calibration of a trained model on its own training showers.

Run at the end of every training (:func:`caloadapt.train.train`), and by ``caloadapt calibrate``
for a checkpoint written without one. The training showers are found again from the options
recorded in the checkpoint (number of showers, validation share, data seed), so the evaluation
reference and the validation showers never enter the fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..data.io import count_showers, read_showers
from ..models.occupancy import fit_occupancy
from ..models.sampling import Sampler
from ..models.shower_model import ShowerModel
from ..showers import Showers
from .data import DataSource, split_indices

__all__ = ["training_showers", "calibrate_occupancy"]


def training_showers(source: DataSource, train_config: dict | None, n_showers: int) -> Showers:
    """Up to ``n_showers`` showers of the training split of ``source``, evenly spread over it.

    ``train_config`` holds ``n_samples``, ``val_fraction`` and ``data_seed`` of the run (as a
    checkpoint records them); without it the whole file counts as training data.
    """
    n_file = count_showers(source.path)
    if train_config is None:
        indices = np.arange(n_file)
    else:
        indices, _ = split_indices(n_file, train_config.get("n_samples"), train_config.get("val_fraction", 0.1),
                                   train_config.get("data_seed", 0))
    pick = np.unique(np.linspace(0, len(indices) - 1, min(n_showers, len(indices))).astype(np.int64))
    return read_showers(source.path, source.geometry, indices=indices[pick])


def calibrate_occupancy(model: ShowerModel, sources: Sequence[DataSource], train_config: dict | None, *,
                        n_showers: int = 128, seed: int = 0, progress: bool = True,
                        sampler: Sampler = Sampler(), check: bool = True) -> None:
    """Fit ``model.occupancy`` for the detector of each source on its training showers (in place),
    generating with ``sampler`` (the one its checkpoint holds); ``check``: the fit's third pass, which
    records the calibrated hits beside the training showers' (:func:`~caloadapt.models.occupancy.fit_occupancy`)."""
    for source in sources:
        showers = training_showers(source, train_config, n_showers)
        if progress:
            tqdm.write(f"fitting the occupancy calibration in {source.geometry.name} on {len(showers)} "
                       "training showers")
        model.occupancy[source.geometry.name] = fit_occupancy(model, source.geometry, showers, seed=seed,
                                                              sampler=sampler, progress=progress, check=check)
