"""A ragged batch of calorimeter showers held as one flat point array (the type every stage passes on).

Coordinates are those of the shower frame shared by every geometry of the package:

- ``x``, ``y``: transverse position in mm, relative to the particle's impact point;
- ``z``: depth in mm along the particle direction, measured from the calorimeter front face;
- ``energy``: cell (or spot) energy in MeV, on the readout energy scale of the geometry
  (visible silicon energy for ``ild-ecal``; silicon energy / 0.033 for the CaloChallenge
  geometries, so that a shower sums to about its incident energy).

``z`` is the depth along the layer normal; a particle may arrive inclined to it, with the
incidence angles ``meta['theta_deg']``, ``meta['phi_deg']`` of docs/inclined.md (showers without
them are at normal incidence, see :attr:`Showers.theta_deg`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .incidence import NORMAL_PHI_DEG, NORMAL_THETA_DEG

__all__ = ["Showers", "PARTICLES", "X", "Y", "Z", "ENERGY"]

#: column indices of :attr:`Showers.points`
X, Y, Z, ENERGY = 0, 1, 2, 3

#: particle names understood across the package, with their PDG codes
PARTICLES = {"photon": 22, "electron": 11, "positron": -11}


@dataclass
class Showers:
    """N showers of different sizes: all points in one ``(P, 4)`` float32 array plus offsets.

    Shower ``i`` owns ``points[offsets[i]:offsets[i + 1]]``. No per-point Python objects exist;
    slicing with a contiguous range is a view, fancy indexing gathers once.

    Attributes:
        points: ``(P, 4)`` float32, columns ``x, y, z`` in mm and ``energy`` in MeV.
        offsets: ``(N + 1,)`` int64, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == P``.
        incident_energy_mev: ``(N,)`` float64, energy of the incoming particle in MeV.
        particle: particle name, a key of :data:`PARTICLES`.
        geometry: name of the detector geometry the showers belong to.
        meta: optional per-shower float arrays of length N (e.g. ``deposited_energy_mev``).
    """

    points: np.ndarray
    offsets: np.ndarray
    incident_energy_mev: np.ndarray
    particle: str = "electron"
    geometry: str = ""
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.points = np.ascontiguousarray(self.points, dtype=np.float32).reshape(-1, 4)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.incident_energy_mev = np.asarray(self.incident_energy_mev, dtype=np.float64).reshape(-1)
        n = len(self.incident_energy_mev)
        if self.offsets.shape != (n + 1,):
            raise InputError(f"offsets must have length {n + 1} for {n} showers, got {self.offsets.shape}")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.points) or np.any(np.diff(self.offsets) < 0):
            raise InputError("offsets must start at 0, end at the number of points and never decrease")
        if self.particle not in PARTICLES:
            raise InputError(f"unknown particle {self.particle!r}; expected one of {sorted(PARTICLES)}")
        for key, values in self.meta.items():
            values = np.asarray(values).reshape(-1)
            if len(values) != n:
                raise InputError(f"meta {key!r} has {len(values)} entries for {n} showers")
            self.meta[key] = values

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_counts(cls, points: np.ndarray, counts: np.ndarray, incident_energy_mev: np.ndarray,
                    **kwargs) -> Showers:
        """Build from the flat point array and the number of points of each shower."""
        offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
        return cls(points, offsets, incident_energy_mev, **kwargs)

    @classmethod
    def from_list(cls, showers: Sequence[np.ndarray], incident_energy_mev: np.ndarray,
                  **kwargs) -> Showers:
        """Build from one ``(n_i, 4)`` array per shower."""
        counts = [len(s) for s in showers]
        points = np.concatenate([np.asarray(s, np.float32).reshape(-1, 4) for s in showers]) if showers \
            else np.zeros((0, 4), np.float32)
        return cls.from_counts(points, counts, incident_energy_mev, **kwargs)

    @classmethod
    def empty(cls, particle: str = "electron", geometry: str = "") -> Showers:
        return cls(np.zeros((0, 4), np.float32), np.zeros(1, np.int64), np.zeros(0), particle, geometry)

    @staticmethod
    def concatenate(batches: Sequence[Showers]) -> Showers:
        """Join batches of the same particle and geometry, in order."""
        if not batches:
            raise InputError("cannot concatenate an empty list of shower batches")
        first = batches[0]
        for b in batches[1:]:
            if (b.particle, b.geometry) != (first.particle, first.geometry):
                raise InputError(f"cannot concatenate showers of {b.particle}/{b.geometry!r} "
                                 f"with {first.particle}/{first.geometry!r}")
        counts = np.concatenate([b.n_points for b in batches])
        meta_keys = set.intersection(*(set(b.meta) for b in batches))
        meta = {k: np.concatenate([b.meta[k] for b in batches]) for k in sorted(meta_keys)}
        if any("theta_deg" in b.meta or "phi_deg" in b.meta for b in batches):
            # a batch without angles is at normal incidence: keep the angles of the others
            meta["theta_deg"] = np.concatenate([b.theta_deg for b in batches])
            meta["phi_deg"] = np.concatenate([b.phi_deg for b in batches])
        return Showers.from_counts(
            np.concatenate([b.points for b in batches]), counts,
            np.concatenate([b.incident_energy_mev for b in batches]),
            particle=first.particle, geometry=first.geometry, meta=meta,
        )

    # -- size and access ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.incident_energy_mev)

    @property
    def n_points(self) -> np.ndarray:
        """``(N,)`` number of points of each shower."""
        return np.diff(self.offsets)

    @property
    def theta_deg(self) -> np.ndarray:
        """``(N,)`` polar angle of incidence to the beam axis in degrees; 90 (normal) when not recorded."""
        return np.asarray(self.meta.get("theta_deg", np.full(len(self), NORMAL_THETA_DEG)), np.float64)

    @property
    def phi_deg(self) -> np.ndarray:
        """``(N,)`` azimuth of incidence in degrees; 90 (normal) when not recorded."""
        return np.asarray(self.meta.get("phi_deg", np.full(len(self), NORMAL_PHI_DEG)), np.float64)

    @property
    def shower_index(self) -> np.ndarray:
        """``(P,)`` index of the shower each point belongs to."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.n_points)

    @property
    def energy_sum_mev(self) -> np.ndarray:
        """``(N,)`` sum of point energies of each shower, in MeV."""
        return np.bincount(self.shower_index, weights=self.points[:, ENERGY], minlength=len(self))

    def meta_with_outside(self, missed: np.ndarray, shower_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """A copy of ``meta`` whose ``outside_energy_mev`` adds the energy of the points where ``missed``
        (``(P,)`` bool) to what already missed the readout (e.g. spots dropped in front of its layers);
        ``shower_index``: :attr:`shower_index`, when the caller has it already."""
        index = self.shower_index if shower_index is None else shower_index
        meta = dict(self.meta)
        meta["outside_energy_mev"] = meta.get("outside_energy_mev", 0.0) + np.bincount(
            index[missed], weights=self.points[missed, ENERGY], minlength=len(self))
        return meta

    def shower(self, i: int) -> np.ndarray:
        """The ``(n_i, 4)`` points of shower ``i`` (a view)."""
        return self.points[self.offsets[i]:self.offsets[i + 1]]

    def __getitem__(self, index: int | slice | np.ndarray | Sequence[int]) -> Showers:
        """Select showers: an int or slice gives views, an index array or mask gathers."""
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"shower {index} out of range for {len(self)} showers")
            index = slice(i, i + 1)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                stop = max(start, stop)
                p0, p1 = self.offsets[start], self.offsets[stop]
                return Showers(self.points[p0:p1], self.offsets[start:stop + 1] - p0,
                               self.incident_energy_mev[start:stop], self.particle, self.geometry,
                               {k: v[start:stop] for k, v in self.meta.items()})
            index = np.arange(start, stop, step)
        index = np.asarray(index)
        if index.dtype != bool:
            index = index.astype(np.int64)  # an empty list arrives as float64
        else:
            if index.shape != (len(self),):
                raise IndexError(f"boolean mask of shape {index.shape} for {len(self)} showers")
            index = np.flatnonzero(index)
        counts = self.n_points[index]
        starts = self.offsets[:-1][index]
        # gather all point rows at once: for each selected shower, its contiguous range
        local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = np.repeat(starts, counts) + local
        return Showers.from_counts(self.points[rows], counts, self.incident_energy_mev[index],
                                   particle=self.particle, geometry=self.geometry,
                                   meta={k: v[index] for k, v in self.meta.items()})

    def chunks(self, size: int) -> Iterator[Showers]:
        """Iterate over consecutive batches of at most ``size`` showers (views, no copies)."""
        if size < 1:
            raise ValueError("chunk size must be positive")
        for start in range(0, len(self), size):
            yield self[start:start + size]

    def padded(self, max_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Dense ``(N, M, 4)`` copy zero-padded at the end, and its ``(N, M)`` boolean mask."""
        counts = self.n_points
        width = int(counts.max(initial=0)) if max_points is None else int(max_points)
        if np.any(counts > width):
            raise ValueError(f"a shower has {counts.max()} points, more than max_points={width}")
        dense = np.zeros((len(self), width, 4), np.float32)
        mask = np.arange(width)[None, :] < counts[:, None]
        dense[mask] = self.points
        return dense, mask

    def __repr__(self) -> str:
        return (f"Showers(n={len(self)}, points={len(self.points)}, particle={self.particle!r}, "
                f"geometry={self.geometry!r})")
