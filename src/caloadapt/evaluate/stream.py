"""Streaming accumulation of one shower file for the evaluation: read chunk by chunk, voxelise into the
target geometry, and keep only what the scores need (:class:`SampleSummary`).

A file of any layout (caloadapt points, ILD, CaloChallenge) and of any geometry is read in chunks and
digitised into the target readout, so memory stays bounded by the chunk size and by the
cell-level arrays the classifier is allowed (``max_low_level_floats``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse
from tqdm.auto import tqdm

from ..data.io import count_showers, detect_format, file_geometry, iter_showers
from ..errors import InputError
from ..geometry import Geometry
from ..showers import ENERGY, Showers
from .calochallenge import CaloChallengeBinning, HighLevelFeatures, high_level_features, low_level_vector
from .energy_bins import ENERGY_DECADES_MEV, energy_bin_masks
from .observables import ShowerObservables, layout_of, one_hot_matrix, shower_observables

__all__ = ["SampleSummary", "stream_sample", "source_geometry", "calochallenge_binning_of", "concatenate_observables",
           "concatenate_high_level_features"]


# -- geometry helpers ------------------------------------------------------------------------------
def calochallenge_binning_of(geometry: Geometry) -> CaloChallengeBinning | None:
    """The CaloChallenge binning of a uniform cylindrical readout (same mesh in every layer), or None."""
    readout = geometry.readout
    if getattr(readout, "kind", "") != "cylindrical" or not readout.is_uniform:
        return None
    edges = np.asarray(readout.r_edges_mm[0], dtype=np.float64)
    if len(edges) < 2:
        return None
    binning = CaloChallengeBinning(tuple(edges), int(readout.n_alpha[0]), geometry.n_layers)
    if binning.n_voxels != geometry.n_cells:
        return None
    return binning


#: cells of the dense voxel chunk of :func:`stream_sample` (about 40 B each with its working copies): a
#: readout of millions of cells takes fewer showers at once, the built-in ones their usual 500
DENSE_CHUNK_CELLS = 25_000_000


def _radial_edges(geometry: Geometry, binning: CaloChallengeBinning | None) -> np.ndarray:
    if binning is not None:
        return np.asarray(binning.r_edges_mm)
    radius = np.hypot(geometry.cell_centres_mm[:, 0], geometry.cell_centres_mm[:, 1])
    top = float(radius.max()) * 1.0001 + 1e-6
    return np.linspace(0.0, top, 31)


def _radial_matrix(geometry: Geometry, edges: np.ndarray) -> scipy.sparse.csr_matrix:
    radius = np.hypot(geometry.cell_centres_mm[:, 0], geometry.cell_centres_mm[:, 1])
    index = np.clip(np.searchsorted(edges, radius, side="right") - 1, 0, len(edges) - 2)
    return one_hot_matrix(index, len(edges) - 1)


# -- concatenation helpers ---------------------------------------------------------------------------
def concatenate_observables(parts: Sequence[ShowerObservables]) -> ShowerObservables:
    """Join the observables of consecutive batches of showers into one (cell indices shifted)."""
    if not parts:
        raise InputError("no observables to concatenate")
    n_layers = {p.n_layers for p in parts}
    if len(n_layers) != 1:
        raise InputError(f"cannot concatenate observables with {sorted(n_layers)} layers")
    starts = np.cumsum([0] + [p.n_showers for p in parts[:-1]])
    total = int(starts[-1]) + parts[-1].n_showers
    index_dtype = np.result_type(*(p.cell_shower_index.dtype for p in parts))
    if total > np.iinfo(index_dtype).max:
        index_dtype = np.dtype(np.int64)
    return ShowerObservables(
        incident_energy_mev=np.concatenate([p.incident_energy_mev for p in parts]),
        per_shower={k: np.concatenate([p.per_shower[k] for p in parts]) for k in parts[0].per_shower},
        layer_energy_mev=np.concatenate([p.layer_energy_mev for p in parts]),
        layer_hits=np.concatenate([p.layer_hits for p in parts]),
        cell_energy_mev=np.concatenate([p.cell_energy_mev for p in parts]),
        cell_shower_index=np.concatenate([p.cell_shower_index.astype(index_dtype, copy=False)
                                          + index_dtype.type(s) for p, s in zip(parts, starts, strict=True)]),
        n_cells=parts[0].n_cells,
        theta_deg=None if all(p.theta_deg is None for p in parts) else np.concatenate(
            [np.full(p.n_showers, 90.0) if p.theta_deg is None else p.theta_deg for p in parts]),
    )


def concatenate_high_level_features(parts: Sequence[HighLevelFeatures]) -> HighLevelFeatures:
    """Join the high-level features of consecutive batches (``voxel_max_mev``: the largest)."""
    if not parts:
        raise InputError("no features to concatenate")
    arrays = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
              for f in fields(HighLevelFeatures) if f.name != "voxel_max_mev"}
    return HighLevelFeatures(**arrays, voxel_max_mev=max(p.voxel_max_mev for p in parts))


# -- streaming ------------------------------------------------------------------------------------
@dataclass
class SampleSummary:
    """Everything the metrics and plots need from one file, accumulated chunk by chunk.

    Attributes:
        path: the file; format: its layout; geometry: its own geometry name; particle.
        n_in_file: showers in the file; n_used: showers read (``max_showers``).
        observables: per-shower observables in the target geometry (after the threshold).
        features: official high-level features (uniform cylindrical targets), else None.
        low_level: ``(n, 1 + n_cells)`` float32 low-level classifier inputs of the first n showers,
            or None.
        energy_edges_mev: incident-energy bin edges of the average showers.
        voxel_sums_mev: ``(n_bins + 1, n_cells)`` sums of the thresholded voxels per energy bin and,
            in the last row, over all showers.
        voxel_counts: ``(n_bins + 1,)`` showers summed in each row.
        radial_edges_mm: radial bin edges; radial_energy_mev: ``(n, n_r)`` energy per radial bin.
        examples_mev: ``(k, n_cells)`` first showers (event display); examples_incident_mev: ``(k,)``;
            examples_direction: ``(k, 3)`` their unit direction in the shower frame of the target
            (its axis: (0, 0, 1) at normal incidence and in a mesh along the particle).
        energy_total_mev, energy_outside_mev: point energy read, and the part outside the target
            readout.
        n_showers_with_cells: the first showers whose hit cells are pooled (``max_cells``).
    """

    path: Path
    format: str
    geometry: str
    particle: str
    n_in_file: int
    n_used: int
    observables: ShowerObservables
    features: HighLevelFeatures | None
    low_level: np.ndarray | None
    energy_edges_mev: tuple[float, ...]
    voxel_sums_mev: np.ndarray
    voxel_counts: np.ndarray
    radial_edges_mm: np.ndarray
    radial_energy_mev: np.ndarray
    examples_mev: np.ndarray
    examples_incident_mev: np.ndarray
    examples_direction: np.ndarray
    energy_total_mev: float
    energy_outside_mev: float
    n_showers_with_cells: int = 0

    @property
    def outside_fraction(self) -> float:
        return self.energy_outside_mev / self.energy_total_mev if self.energy_total_mev > 0 else 0.0

    def average_shower(self, row: int = -1) -> np.ndarray:
        """Mean thresholded voxels of an energy bin (``-1``: all showers); NaN when the bin is empty."""
        count = self.voxel_counts[row]
        return self.voxel_sums_mev[row] / count if count else np.full(self.voxel_sums_mev.shape[1], np.nan)

    def record(self) -> dict:
        return {"path": str(self.path), "size_bytes": _file_size(self.path), "format": self.format,
                "geometry": self.geometry, "particle": self.particle,
                "n_showers_in_file": self.n_in_file, "n_showers_used": self.n_used,
                "incident_energy_gev": [float(self.observables.incident_energy_mev.min() / 1e3),
                                        float(self.observables.incident_energy_mev.max() / 1e3)],
                "energy_outside_target_fraction": self.outside_fraction,
                "n_showers_with_pooled_cells": self.n_showers_with_cells,
                "n_pooled_cells": int(self.observables.cell_energy_mev.size)}


def _file_size(path: Path) -> int | None:
    try:
        return int(os.path.getsize(path))
    except OSError:
        return None


def source_geometry(path: Path, target: Geometry) -> tuple[str, Geometry]:
    """Layout and own geometry of a file; clear errors for missing, empty or unfitting files."""
    fmt = detect_format(path)  # InputError: missing, not HDF5, unknown layout
    if count_showers(path) == 0:
        raise InputError(f"{path}: file holds no showers")
    if fmt != "calochallenge":
        return fmt, file_geometry(path, None)
    with h5py.File(path, "r") as f:
        showers = f.get("showers")
        n_cells = showers.shape[1] if isinstance(showers, h5py.Dataset) and showers.ndim == 2 else None
    if n_cells is None or n_cells == target.n_cells:
        return fmt, file_geometry(path, target)
    try:
        return fmt, file_geometry(path, None)
    except InputError:
        raise InputError(f"{path}: {n_cells} voxels per shower fit neither the target geometry "
                         f"{target.name!r} ({target.n_cells} cells) nor a built-in CaloChallenge "
                         "geometry") from None


def stream_sample(path: str | os.PathLike[str], target: Geometry, *, chunk_size: int = 500,
                  max_showers: int | None = None, n_low_level: int = 0,
                  binning: CaloChallengeBinning | None = None, n_examples: int = 3,
                  energy_edges_mev: Sequence[float] = ENERGY_DECADES_MEV, max_cells: int | None = None,
                  progress: bool = False, label: str = "") -> SampleSummary:
    """Read a shower file chunk by chunk, voxelise into ``target`` and accumulate a :class:`SampleSummary`.

    Memory: one dense ``(chunk_size, n_cells)`` chunk at a time (fewer showers for a large readout:
    :data:`DENSE_CHUNK_CELLS`) plus the accumulated per-shower
    quantities (observables, pooled hit cells, features, and the low-level inputs of the first
    ``n_low_level`` showers). With ``max_cells`` only the hit cells of the first showers (whole
    showers, at most ``max_cells`` cells) are pooled; the other showers keep their per-shower
    observables but contribute no cells (``SampleSummary.n_showers_with_cells``).

    Raises:
        InputError: missing or empty file, a layout that fits neither the target nor a built-in
            geometry, non-finite energies (from the reader), a target without cells.
    """
    path = Path(path)
    layout = layout_of(target)
    threshold = layout.threshold_mev
    chunk_size = min(chunk_size, max(1, DENSE_CHUNK_CELLS // target.n_cells))
    fmt, source = source_geometry(path, target)
    n_in_file = count_showers(path)
    n_used = n_in_file if max_showers is None else min(n_in_file, int(max_showers))
    radial_edges = _radial_edges(target, binning)
    radial_matrix = _radial_matrix(target, radial_edges)
    edges = tuple(float(e) for e in energy_edges_mev)
    n_bins = len(edges) - 1
    sums = np.zeros((n_bins + 1, target.n_cells))
    counts = np.zeros(n_bins + 1, dtype=np.int64)
    obs_parts, feature_parts, low_parts, radial_parts, example_parts, example_energy = [], [], [], [], [], []
    example_direction = []
    n_seen, total_energy, outside_energy, particle = 0, 0.0, 0.0, "electron"
    n_cells_kept, n_showers_with_cells, cells_full = 0, 0, False
    with tqdm(total=n_used, unit="shower", desc=f"read {label or path.name}", disable=not progress,
              leave=False) as bar:
        for chunk in iter_showers(path, source, chunk_size=chunk_size, stop=n_used):
            particle = chunk.particle
            if chunk.geometry != target.name:  # same physical frame: voxelise into the target
                chunk = Showers(chunk.points, chunk.offsets, chunk.incident_energy_mev, chunk.particle,
                                target.name, dict(chunk.meta))
            voxels, outside = target.voxelise(chunk, threshold=True, return_outside=True)
            voxels[voxels < threshold] = 0.0
            incident = chunk.incident_energy_mev
            total_energy += float(chunk.points[:, ENERGY].sum(dtype=np.float64))
            outside_energy += float(outside.sum())

            obs = shower_observables(voxels, incident, layout, chunk_size=max(len(voxels), 1))
            cell_energy, cell_index = obs.cell_energy_mev, obs.cell_shower_index
            if cells_full:
                keep_showers = 0
            elif max_cells is not None and n_cells_kept + len(cell_energy) > max_cells:
                per_shower = np.cumsum(np.bincount(cell_index, minlength=len(voxels)))
                keep_showers = int(np.searchsorted(per_shower, max_cells - n_cells_kept, side="right"))
                cells_full = True
            else:
                keep_showers = len(voxels)
            if keep_showers < len(voxels):
                keep = cell_index < keep_showers  # cells are ordered by shower
                cell_energy, cell_index = cell_energy[keep], cell_index[keep]
            n_cells_kept += len(cell_energy)
            n_showers_with_cells += keep_showers
            obs_parts.append(dataclasses.replace(
                obs, cell_energy_mev=cell_energy.astype(np.float32),  # lossless: float32 voxels
                cell_shower_index=cell_index.astype(np.int32 if n_used < 2**31 else np.int64),
                theta_deg=chunk.theta_deg if "theta_deg" in chunk.meta else None))
            if binning is not None:
                feature_parts.append(high_level_features(voxels, binning, threshold_mev=threshold,
                                                         chunk_size=max(len(voxels), 1)))
            n_keep = min(len(voxels), max(0, n_low_level - n_seen))
            if n_keep:
                low_parts.append(low_level_vector(voxels[:n_keep], incident[:n_keep], threshold_mev=threshold,
                                                  dtype=np.float32))
            masks = energy_bin_masks(incident, edges, closed_last=True)
            for i, (_, _, mask) in enumerate(masks):
                if mask.any():
                    sums[i] += voxels[mask].sum(axis=0, dtype=np.float64)
                    counts[i] += int(mask.sum())
            sums[-1] += voxels.sum(axis=0, dtype=np.float64)
            counts[-1] += len(voxels)
            radial_parts.append(voxels.astype(np.float64) @ radial_matrix)
            take = min(len(voxels), max(0, n_examples - n_seen))
            if take:
                example_parts.append(voxels[:take].copy())
                example_energy.append(incident[:take].copy())
                example_direction.append(target.axis_direction(chunk.theta_deg[:take], chunk.phi_deg[:take]))
            n_seen += len(voxels)
            bar.update(len(voxels))
    if n_seen == 0:
        raise InputError(f"{path}: no showers read")
    n_cells = target.n_cells
    return SampleSummary(
        path=path, format=fmt, geometry=source.name, particle=particle, n_in_file=n_in_file, n_used=n_seen,
        observables=concatenate_observables(obs_parts),
        features=concatenate_high_level_features(feature_parts) if feature_parts else None,
        low_level=np.concatenate(low_parts) if low_parts else None,
        energy_edges_mev=edges, voxel_sums_mev=sums, voxel_counts=counts,
        radial_edges_mm=radial_edges, radial_energy_mev=np.concatenate(radial_parts),
        examples_mev=np.concatenate(example_parts) if example_parts else np.zeros((0, n_cells), np.float32),
        examples_incident_mev=np.concatenate(example_energy) if example_energy else np.zeros(0),
        examples_direction=np.concatenate(example_direction) if example_direction else np.zeros((0, 3)),
        energy_total_mev=total_energy, energy_outside_mev=outside_energy,
        n_showers_with_cells=n_showers_with_cells,
    )
