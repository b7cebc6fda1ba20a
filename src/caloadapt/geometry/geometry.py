"""A detector geometry: material stack, readout layers and cells, energy scale."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.sparse

from ..showers import ENERGY, X, Y, Z, Showers
from ..errors import GeometryError, InputError
from ..incidence import from_particle_frame, local_direction
from .materials import Mixture
from .readout import CylindricalReadout, PlanarReadout, uniform_inside
from .stack import MaterialStack

__all__ = ["Geometry", "EnergyScale", "ShowerParameters"]


@dataclass(frozen=True)
class EnergyScale:
    """How deposited energy becomes the cell energies written in files.

    visible energy = ``e_vis`` * f_mip(layer) * deposited energy (simulator reference §1.2, §6.1);
    cell energy [MeV] = ``calibration`` * visible energy [MeV], cut at ``threshold_mev`` (cell units).

    Attributes:
        e_vis: e/mip calibration of the visible energy (0.78 ILD; 0.033 / f_mip for Par04).
        calibration: readout MeV per visible MeV (1 for ILD, 1/0.033 for CaloChallenge).
        threshold_mev: cell threshold in readout MeV (0.1 ILD; 0.5e-3/0.033 CaloChallenge).
    """

    e_vis: float
    calibration: float
    threshold_mev: float


@dataclass(frozen=True)
class ShowerParameters:
    """Per-geometry settings of the embedded GFlash simulator (simulator reference §1.2, §4.5).

    Attributes:
        sampling_term: stochastic term c in sqrt(GeV) (0.166 ILD, 0.13 Par04).
        kappa: Mode B spot energy in units of the mean mip loss in one sensor (1.7 ILD, 1.3 Par04).
        moyal_sigma: width of the Moyal spot-energy weights (0.065-0.12).
        shape_region_mm: depth range whose material defines Z_eff, E_c, F_s of the shower shape.
        local_moliere: convert radii with the Moliere radius of the local layer (True) or the
            shape medium (False), simulator reference §3.4.
    """

    sampling_term: float
    kappa: float
    moyal_sigma: float
    shape_region_mm: tuple[float, float]
    local_moliere: bool = True


@dataclass(frozen=True, eq=False)
class Geometry:
    """A calorimeter in the shower frame (x, y transverse mm from the impact point, z depth mm).

    Readout layer ``l`` collects everything deposited at depths ``[layer_edges_mm[l],
    layer_edges_mm[l+1])``; its cell-centre points sit at depth ``layer_centres_mm[l]`` (the
    sensor centre for a per-sensor readout, the slice centre for a sliced mesh).

    ``barrel_sides`` is the number of faces of the barrel the calorimeter is a module of (0: a
    cylinder); it turns incidence angles into a direction in the shower frame (docs/inclined.md).
    A readout ``along_particle`` (a mesh following the particle) makes the shower frame the
    particle's own: z along the particle axis from the entrance point, x and y across it
    (:meth:`detector_frame_points` turns such showers back into the detector frame).
    """

    name: str
    stack: MaterialStack
    layer_edges_mm: np.ndarray
    layer_centres_mm: np.ndarray
    readout: PlanarReadout | CylindricalReadout
    energy: EnergyScale
    shower: ShowerParameters
    particle: str = "electron"
    description: str = ""
    barrel_sides: int = 0
    spec: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        edges = np.asarray(self.layer_edges_mm, np.float64)
        centres = np.asarray(self.layer_centres_mm, np.float64)
        object.__setattr__(self, "layer_edges_mm", edges)
        object.__setattr__(self, "layer_centres_mm", centres)
        if len(edges) != len(centres) + 1 or np.any(np.diff(edges) <= 0):
            raise GeometryError(f"geometry {self.name!r}: layer edges must increase, one more than layers")
        if np.any(centres < edges[:-1]) or np.any(centres >= edges[1:]):
            raise GeometryError(f"geometry {self.name!r}: layer centres must lie inside their layers")
        if self.barrel_sides < 0 or self.barrel_sides in (1, 2):
            raise GeometryError(f"geometry {self.name!r}: barrel_sides must be 0 (a cylinder) or at least 3, "
                                f"got {self.barrel_sides}")
        if self.readout.n_layers != len(centres):
            raise GeometryError(f"geometry {self.name!r}: readout has {self.readout.n_layers} layers, "
                                f"depth segmentation {len(centres)}")

    # -- sizes -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layer_centres_mm)

    @cached_property
    def n_cells(self) -> int:
        return int(self.readout.cells_per_layer.sum())

    @cached_property
    def cell_layer(self) -> np.ndarray:
        """``(n_cells,)`` readout layer of each cell."""
        return np.repeat(np.arange(self.n_layers), self.readout.cells_per_layer)

    @cached_property
    def _cell_local(self) -> np.ndarray:
        return np.arange(self.n_cells) - self.readout.layer_offsets[self.cell_layer]

    @cached_property
    def cell_centres_mm(self) -> np.ndarray:
        """``(n_cells, 3)`` cell centres (x, y, z) in mm."""
        x, y = self.readout.centres(self.cell_layer, self._cell_local)
        return np.stack([x, y, self.layer_centres_mm[self.cell_layer]], axis=1)

    # -- media -------------------------------------------------------------------------------
    @cached_property
    def shape_medium(self) -> Mixture:
        """Effective medium that sets the shower shape (Z_eff, E_c, F_s, e/mip)."""
        return self.stack.mixture(*self.shower.shape_region_mm)

    @cached_property
    def layer_media(self) -> tuple[Mixture, ...]:
        """Effective medium of the material inside each readout layer."""
        return tuple(self.stack.mixture(a, b) for a, b in zip(self.layer_edges_mm[:-1], self.layer_edges_mm[1:]))

    @property
    def x0_mm(self) -> float:
        """Effective radiation length of the shape medium, mm."""
        return self.shape_medium.x0_mm

    @property
    def moliere_radius_mm(self) -> float:
        """Effective Moliere radius of the shape medium, mm."""
        return self.shape_medium.moliere_radius_mm

    @property
    def critical_energy_mev(self) -> float:
        """Effective critical energy of the shape medium, MeV."""
        return self.shape_medium.critical_energy_mev

    @property
    def sampling_fraction(self) -> float:
        """Mip sampling fraction f_mip of the shape medium."""
        return self.shape_medium.mip_fraction

    @cached_property
    def layer_visible_fraction(self) -> np.ndarray:
        """``(n_layers,)`` visible / deposited energy in each layer, e_vis * f_mip(layer)."""
        f_mip = np.array([m.mip_fraction if m.has_active else 0.0 for m in self.layer_media])
        if not self.shape_medium.has_passive:
            f_mip = np.ones(self.n_layers)  # homogeneous: everything deposited is seen
        return self.energy.e_vis * f_mip

    @cached_property
    def layer_moliere_radius_mm(self) -> np.ndarray:
        """``(n_layers,)`` Moliere radius used to convert radii in each layer, mm."""
        if not self.shower.local_moliere:
            return np.full(self.n_layers, self.moliere_radius_mm)
        return np.array([m.moliere_radius_mm for m in self.layer_media])

    # -- point <-> cell ----------------------------------------------------------------------
    def layer_index(self, depth_mm: np.ndarray) -> np.ndarray:
        """Readout layer of each depth, -1 in front of or behind the readout."""
        layer = np.searchsorted(self.layer_edges_mm, depth_mm, side="right") - 1
        return np.where((layer >= 0) & (layer < self.n_layers), layer, -1)

    def cell_index(self, points: np.ndarray) -> np.ndarray:
        """Global cell index of each ``(x, y, z)`` point in mm, -1 outside the readout."""
        points = np.asarray(points)
        layer = self.layer_index(points[:, Z])
        # every point is looked up (in layer 0 if it is outside the layers): cheaper than selecting
        # those inside first, and the answer for a point outside the layers is dropped below
        in_layer = np.maximum(layer, 0)
        local = self.readout.local_index(in_layer, points[:, X], points[:, Y])
        return np.where((layer >= 0) & (local >= 0), self.readout.layer_offsets[in_layer] + local, -1)

    def voxelise(self, showers: Showers, *, sparse: bool = False, threshold: bool = False,
                 return_outside: bool = False):
        """Sum point energies into cells.

        Returns a dense ``(N, n_cells)`` float32 array of cell energies in MeV (a scipy CSR
        matrix with ``sparse=True``); with ``threshold`` cells below the geometry's threshold are
        zeroed; with ``return_outside`` also the ``(N,)`` energy in MeV that missed the readout.
        """
        self.check_showers(showers)
        cells = self.cell_index(showers.points)
        inside = cells >= 0
        shower = showers.shower_index
        energy = showers.points[:, ENERGY].astype(np.float64)
        matrix = scipy.sparse.csr_matrix((energy[inside], (shower[inside], cells[inside])),
                                         shape=(len(showers), self.n_cells))
        matrix.sum_duplicates()
        if threshold:
            matrix.data[matrix.data < self.energy.threshold_mev] = 0.0
            matrix.eliminate_zeros()
        voxels = matrix.astype(np.float32) if sparse else matrix.toarray().astype(np.float32)
        if return_outside:
            outside = np.bincount(shower[~inside], weights=energy[~inside], minlength=len(showers))
            return voxels, outside
        return voxels

    def points_from_voxels(self, voxels, incident_energy_mev: np.ndarray, particle: str | None = None, *,
                           smear: bool = False, rng: np.random.Generator | None = None) -> Showers:
        """One point per non-empty cell: at the cell centre, or uniform inside the cell.

        ``voxels`` is ``(N, n_cells)`` dense or sparse, in MeV. Smearing is uniform in depth over
        the layer and uniform in area transversally, so voxelising the points gives back the cells.
        """
        matrix = scipy.sparse.csr_matrix(voxels)
        if matrix.shape[1] != self.n_cells:
            raise InputError(f"voxel array has {matrix.shape[1]} cells per shower, geometry "
                             f"{self.name!r} has {self.n_cells}")
        matrix.eliminate_zeros()
        matrix.sort_indices()
        cells = matrix.indices.astype(np.int64)
        points = np.concatenate([self.cell_centres_mm[cells], matrix.data[:, None]], axis=1)
        hits = Showers(points, matrix.indptr.astype(np.int64), incident_energy_mev, particle or self.particle, self.name)
        return self.smear_hits(hits, rng if rng is not None else np.random.default_rng()) if smear else hits

    def digitise(self, showers: Showers) -> Showers:
        """Hits: one point per cell above threshold, at the cell centre, energy in readout MeV.

        ``meta['outside_energy_mev']`` records the energy of points that missed the readout.
        """
        shower = showers.shower_index
        inside, keys, inverse = self.group_into_cells(showers.points, shower)
        energy = np.bincount(inverse, weights=showers.points[inside, ENERGY], minlength=len(keys))
        return self.hits_from_cells(keys, energy, showers.incident_energy_mev, showers.particle,
                                    showers.meta_with_outside(~inside, shower))

    def group_into_cells(self, points: np.ndarray, shower: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The cells that ``(x, y, z, ...)`` points of showers ``shower`` (``(P,)`` index) fall in.

        Returns ``inside`` (``(P,)`` bool: the point is in the readout), ``keys`` (the distinct
        ``shower * n_cells + cell`` of those points, sorted) and ``inverse`` (each inside point's
        position in ``keys``): ``np.bincount(inverse, energy[inside])`` are the cell energies.
        """
        cells = self.cell_index(points)
        inside = cells >= 0
        return inside, *_distinct(shower[inside] * self.n_cells + cells[inside],
                                  (int(shower.max(initial=-1)) + 1) * self.n_cells)

    def hits_from_cells(self, keys: np.ndarray, cell_energy_mev: np.ndarray, incident_energy_mev: np.ndarray,
                        particle: str, meta: dict[str, np.ndarray]) -> Showers:
        """:meth:`digitise`'s hits from the cells :meth:`group_into_cells` found (``keys``) and their
        energies in MeV, cut at the threshold here; ``meta`` is the showers' (with the energy that
        missed the readout)."""
        keep = cell_energy_mev >= self.energy.threshold_mev
        hit_shower, hit_cell = np.divmod(keys[keep], self.n_cells)
        points = np.concatenate([self.cell_centres_mm[hit_cell], cell_energy_mev[keep, None]], axis=1)
        return Showers.from_counts(points, np.bincount(hit_shower, minlength=len(incident_energy_mev)),
                                   incident_energy_mev, particle=particle, geometry=self.name, meta=meta)

    def smear_hits(self, showers: Showers, rng: np.random.Generator, radial_profile: bool = False) -> Showers:
        """Move each hit uniformly inside its cell (area-correct; depth over the layer extent), or with
        ``radial_profile`` along the fall of the energy density inside the rings (:meth:`dequantise`).

        The dequantisation used for training on cell-level data: voxelising the result gives
        back the same cells.
        """
        return self._smear_in_cells(showers, self.cell_index(showers.points), rng, radial_profile)

    def _smear_in_cells(self, showers: Showers, cells: np.ndarray, rng: np.random.Generator,
                        radial_profile: bool = False) -> Showers:
        """:meth:`smear_hits` with the points' cell indices already known; ``radial_profile``: inside the
        rings of a cylindrical readout, follow the fall of the points' energy density (its ``sample``)."""
        if np.any(cells < 0):
            raise InputError(f"{np.sum(cells < 0)} hits lie outside the readout of {self.name!r}")
        layer = self.cell_layer[cells]
        x, y = self.readout.sample(layer, self._cell_local[cells], rng,
                                   showers.points[:, ENERGY].astype(np.float64) if radial_profile else None)
        lo, hi = self.layer_edges_mm[layer], self.layer_edges_mm[layer + 1]
        z = lo + uniform_inside(rng, len(cells)) * (hi - lo)
        points = np.stack([x, y, z, showers.points[:, ENERGY]], axis=1)
        return Showers(points, showers.offsets, showers.incident_energy_mev, showers.particle, showers.geometry,
                       dict(showers.meta))

    def dequantise(self, showers: Showers, rng: np.random.Generator, radial_profile: bool = False) -> Showers:
        """Points to train on: cell-level hits smeared inside their cells, sub-cell points kept.

        Hits sit at their cells' centres, a lattice a continuous model can only smear; moving
        them uniformly inside their cells (:meth:`smear_hits`) keeps the cells they read out.
        Sub-cell points (the simulator's spots, ``--level spots``, or clustered Geant4 steps)
        already carry the positions inside the cells and are returned unchanged: their energy is
        spread over many small points, so the cell energy is a sum the digitisation rebuilds
        (``docs/fidelity.md``, "Training on spots"). ``radial_profile``: hits in the rings of a cylindrical
        readout follow the fall of the energy density of ``showers`` inside their rings instead of
        spreading uniformly (:meth:`~caloadapt.geometry.readout.CylindricalReadout.sample`).
        """
        cells = self.cell_index(showers.points)
        if not self._at_centres(showers, cells):
            return showers
        return self._smear_in_cells(showers, cells, rng, radial_profile)

    def holds_hits(self, showers: Showers) -> bool:
        """True when the points of ``showers`` sit at their cells' centres (cell-level hits, as in
        the real data sets), False for sub-cell points (spots)."""
        return self._at_centres(showers, self.cell_index(showers.points))

    def _at_centres(self, showers: Showers, cells: np.ndarray) -> bool:
        inside = cells >= 0
        return np.allclose(showers.points[inside, :2], self.cell_centres_mm[cells[inside], :2], atol=1e-3)

    def axis_direction(self, theta_deg: np.ndarray, phi_deg: np.ndarray) -> np.ndarray:
        """``(N, 3)`` unit direction of each shower's axis in this geometry's shower frame (x, y, depth).

        The particle's direction (:func:`caloadapt.incidence.local_direction` on this barrel's faces),
        except in a mesh along the particle, whose frame is the particle's own: (0, 0, 1) there.
        """
        if self.readout.along_particle:
            return np.tile([0.0, 0.0, 1.0], (len(np.atleast_1d(theta_deg)), 1))
        return local_direction(theta_deg, phi_deg, self.barrel_sides)

    def detector_frame_points(self, showers: Showers) -> np.ndarray:
        """``(P, 4)`` float64 points of ``showers`` in the detector frame: x, y, z [mm], energy.

        A mesh along the particle (``readout.along_particle``) holds its showers in the particle's
        frame; this turns them, cell centres included, back into the frame of the detector module
        with each shower's incidence angles (docs/inclined.md), e.g. to place generated cells in a
        detector. Other geometries already hold detector-frame points, returned as they are.
        Rows follow ``showers.offsets``.
        """
        self.check_showers(showers)
        points = showers.points.astype(np.float64)
        if not self.readout.along_particle:
            return points
        direction = local_direction(showers.theta_deg, showers.phi_deg, self.barrel_sides)[showers.shower_index]
        return np.concatenate([from_particle_frame(points[:, :ENERGY], direction), points[:, ENERGY:]], axis=1)

    def check_showers(self, showers: Showers) -> None:
        """Raise a clear error when showers belong to another geometry."""
        if showers.geometry and showers.geometry != self.name:
            raise InputError(f"showers belong to geometry {showers.geometry!r}, not {self.name!r}")

    def __repr__(self) -> str:
        return (f"Geometry({self.name!r}, {self.readout.kind}, layers={self.n_layers}, cells={self.n_cells}, "
                f"X0={self.x0_mm:.3f} mm, R_M={self.moliere_radius_mm:.2f} mm)")


#: largest table of cells (5 bytes each) :func:`_distinct` fills instead of sorting
_MAX_CELL_TABLE = 1 << 24


def _distinct(flat: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(flat, return_inverse=True)`` of integers in ``[0, span)``.

    A table over every cell of the batch marks the cells hit: linear in ``span``, where the sort
    of ``np.unique`` is ``P log P`` in the points (ten times faster for a batch of 100 dataset-3
    showers of 9000 points). Sparse batches of large detectors still sort.
    """
    if span > min(_MAX_CELL_TABLE, max(16 * len(flat), 1 << 20)):
        return np.unique(flat, return_inverse=True)
    seen = np.zeros(span, bool)
    seen[flat] = True
    keys = np.flatnonzero(seen)
    position = np.empty(span, np.int32)  # span <= 2**24
    position[keys] = np.arange(len(keys))
    return keys, position[flat].astype(np.int64)
