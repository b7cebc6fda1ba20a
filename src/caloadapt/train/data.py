"""Training data: shower subsets from files, streamed in blocks, turned into padded batches.

Batches are a deterministic function of (data seed, epoch, position), so a resumed run sees
exactly the batches the interrupted run would have seen. Files larger than one block are never
held in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.io import read_showers
from ..errors import InputError
from ..geometry import Geometry
from ..models.representation import hits_as_spots, shower_depth_x0, shower_statistics
from ..models.shower_model import ModelConfig, shower_condition
from ..showers import Showers

__all__ = ["Batch", "make_batch", "training_points", "ShowerSubset", "BatchStream", "DataSource", "split_indices"]


@dataclass
class Batch:
    """A padded training batch (tensors on CPU; move with :meth:`to`)."""

    points: torch.Tensor      # (B, M, 4) point features
    mask: torch.Tensor        # (B, M) True for real points
    condition: torch.Tensor   # (B, C) energy and points conditions (+ detector descriptor)
    statistics: torch.Tensor  # (B, S) flow inputs

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.points, self.mask, self.condition, self.statistics)))

    def __len__(self) -> int:
        return len(self.points)


@dataclass(frozen=True)
class DataSource:
    """One training file, its detector and its share of the training batches (joint pre-training)."""

    path: Path
    geometry: Geometry
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise InputError(f"{self.path}: sampling weight must be positive, got {self.weight}")


def training_points(geometry: Geometry, showers: Showers, config: ModelConfig, rng: np.random.Generator,
                    smear: bool = True) -> tuple[Showers, Showers]:
    """The showers as the model learns them, and their points moved inside their cells.

    With ``config.hits_as_spots`` cell-level hits are first split into spot-like points
    (:func:`~caloadapt.models.representation.hits_as_spots`: the flow then counts those), which are then
    placed inside their cells following the fall of the energy density from ring to ring; otherwise
    hits are smeared uniformly (:meth:`Geometry.dequantise`). Sub-cell points are kept as they are.
    """
    if not config.hits_as_spots:
        return showers, geometry.dequantise(showers, rng) if smear else showers
    spots = hits_as_spots(geometry, showers, rng)
    if spots is showers:  # sub-cell points (or none): nothing to split or move
        return showers, showers
    # the split points sit at their hits' cell centres: smeared without checking again
    return spots, geometry.smear_hits(spots, rng, radial_profile=True) if smear else spots


def make_batch(showers: Showers, geometry: Geometry, config: ModelConfig, rng: np.random.Generator,
               max_points: int, smear: bool = True) -> Batch:
    """Features of a batch of showers: cell-level hits are smeared inside their cells
    (dequantisation; sub-cell spots stay where they are, :meth:`Geometry.dequantise`), and at
    most ``max_points`` random points per shower are kept (an unbiased sample of the per-point
    loss; the transformer's attention pools by softmax averages, which a uniform subset also
    estimates). The point frame, the flow's grid and whether the detector
    descriptor is appended to the condition come from the model's ``config`` (with
    ``config.hits_as_spots`` hits become spot-like points first, :func:`training_points`)."""
    showers, moved = training_points(geometry, showers, config, rng, smear)
    statistics = shower_statistics(geometry, showers, rng, config.grid)
    features = config.point_frame(geometry).to_features(moved)
    counts = showers.n_points
    keep = np.minimum(counts, max_points)
    width = max(int(keep.max(initial=0)), 1)
    points = np.zeros((len(showers), width, 4), np.float32)
    mask = np.zeros((len(showers), width), bool)
    for i, (start, n, k) in enumerate(zip(showers.offsets[:-1], counts, keep)):
        chosen = rng.choice(n, k, replace=False) if n > k else np.arange(n)
        points[i, :k] = features[start + chosen]
        mask[i, :k] = True
    depth = shower_depth_x0(geometry, showers) if config.shower_depth_condition else None
    condition = shower_condition(showers.incident_energy_mev, counts, geometry, config, depth,
                                 (showers.theta_deg, showers.phi_deg))
    return Batch(torch.from_numpy(points), torch.from_numpy(mask),
                 torch.as_tensor(condition, dtype=torch.float32), torch.as_tensor(statistics, dtype=torch.float32))


def split_indices(n_available: int, n_samples: int | None, val_fraction: float,
                  data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_samples`` showers of a file (all if None) with ``data_seed``, split train/validation.

    The draw depends only on the data seed, never on the model seed, so runs with different
    initialisations see the same showers.
    """
    n = n_available if n_samples is None else n_samples
    if n > n_available:
        raise InputError(f"asked for {n} showers, the file has {n_available}")
    if n < 2:
        raise InputError("need at least 2 showers (training and validation)")
    chosen = np.random.default_rng(data_seed).permutation(n_available)[:n]
    n_val = min(max(1, int(round(val_fraction * n))), n - 1)
    return np.sort(chosen[n_val:]), np.sort(chosen[:n_val])


class ShowerSubset:
    """Showers ``indices`` of a file, read in blocks of ``block_size`` consecutive indices.

    One block (the whole subset when it fits) is cached, so small fine-tuning sets are read once.
    """

    def __init__(self, path: str | Path, geometry: Geometry, indices: np.ndarray, block_size: int = 5000):
        self.path, self.geometry = Path(path), geometry
        self.indices = np.asarray(indices, np.int64)
        self.blocks = [self.indices[i:i + block_size] for i in range(0, len(self.indices), block_size)]
        self._cache: tuple[int, Showers] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def block(self, b: int) -> Showers:
        if self._cache is None or self._cache[0] != b:
            self._cache = (b, read_showers(self.path, self.geometry, indices=self.blocks[b]))
        return self._cache[1]

    def batches(self, batch_size: int, seed: int, epoch: int, skip: int = 0) -> Iterator[Showers]:
        """Shuffled batches of one epoch (block order and order inside blocks from ``seed, epoch``)."""
        rng = np.random.default_rng([seed, epoch])
        position = 0
        for b in rng.permutation(len(self.blocks)):
            order = rng.permutation(len(self.blocks[b]))
            starts = range(0, len(order), batch_size)
            if position + len(starts) <= skip:  # whole block already consumed before a resume
                position += len(starts)
                continue
            showers = self.block(int(b))
            for start in starts:
                if position >= skip:
                    yield showers[order[start:start + batch_size]]
                position += 1


class BatchStream:
    """Endless shuffled batches of a subset, epoch after epoch, with a resumable cursor.

    ``cursor`` (epoch, batches taken in that epoch) is all a checkpoint needs to continue with
    exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, subset: ShowerSubset, batch_size: int, seed: int, epoch: int = 0, position: int = 0):
        self.subset, self.batch_size, self.seed = subset, batch_size, seed
        self.epoch, self.position = epoch, position
        self._batches: Iterator[Showers] | None = None

    @property
    def cursor(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def next(self) -> Showers:
        while True:
            if self._batches is None:
                self._batches = self.subset.batches(self.batch_size, self.seed, self.epoch, skip=self.position)
            showers = next(self._batches, None)
            if showers is not None:
                self.position += 1
                return showers
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
