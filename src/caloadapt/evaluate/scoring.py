"""CaloTransfer scores of two in-memory shower batches in one geometry (used by sweeps and the demo)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Geometry
from ..showers import Showers
from .observables import ScoreTable, calotransfer_scores, layout_of, shower_observables

__all__ = ["VoxelRows", "score_showers", "voxel_chunk_size"]


def voxel_chunk_size(geometry: Geometry, budget_values: int = 10_000_000) -> int:
    """Showers per dense voxel chunk so that a chunk holds about ``budget_values`` cells."""
    return max(1, budget_values // geometry.n_cells)


@dataclass(frozen=True)
class VoxelRows:
    """Dense ``(N, n_cells)`` cell energies of showers, voxelised (with threshold) only row slice by slice."""

    showers: Showers
    geometry: Geometry

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.showers), self.geometry.n_cells

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.geometry.voxelise(self.showers[rows], threshold=True)


def score_showers(generated: Showers, reference: Showers, geometry: Geometry, *, n_bootstrap: int = 20,
                  seed: int = 0) -> ScoreTable:
    """Normalised W1 per observable and their geometric mean, both samples voxelised into ``geometry``."""
    layout = layout_of(geometry)
    chunk = voxel_chunk_size(geometry)
    observables = [shower_observables(VoxelRows(s, geometry), s.incident_energy_mev, layout, chunk_size=chunk)
                   for s in (reference, generated)]
    return calotransfer_scores(*observables, n_bootstrap=n_bootstrap, seed=seed)
