"""Transverse readout segmentations: a planar square grid and a cylindrical (r, alpha) mesh.

Both work in the shower frame: ``x``, ``y`` in mm relative to the impact point. A cell is
addressed by its layer and a local index inside the layer; layers are flattened one after the
other, so the global cell index is ``layer_offsets[layer] + local``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import GeometryError

__all__ = ["PlanarReadout", "CylindricalReadout", "Readout"]


#: fraction of a cell kept free at its edges when sampling inside it: float32 storage of the
#: sampled coordinate (relative precision 6e-8 at up to a few hundred mm) then stays in the cell
EDGE_MARGIN = 1e-4


def uniform_inside(rng: np.random.Generator, shape) -> np.ndarray:
    """Uniform numbers in [EDGE_MARGIN, 1 - EDGE_MARGIN]."""
    return EDGE_MARGIN + (1 - 2 * EDGE_MARGIN) * rng.random(shape)


#: steepest fall of a ring's density followed inside it [1/mm]: a factor e^10 across a millimetre
MAX_DENSITY_SLOPE_PER_MM = 10.0


def radial_density_slopes(r_edges_mm: np.ndarray, ring_energy_mev: np.ndarray) -> np.ndarray:
    """Per ring, the slope [1/mm] of ln(energy per unit area) against the radius: the central difference
    between the neighbouring rings' densities (one-sided at the first and the last ring), never rising
    (a density rising outwards is noise of a few points), 0 where a neighbour holds no energy."""
    area = np.pi * np.diff(np.square(r_edges_mm))
    centre = 0.5 * (r_edges_mm[1:] + r_edges_mm[:-1])
    with np.errstate(divide="ignore"):
        log_density = np.log(ring_energy_mev / area)
    if len(log_density) < 2:
        return np.zeros(len(log_density))
    slope = np.gradient(log_density, centre)
    return np.clip(np.nan_to_num(slope, nan=0.0, posinf=0.0, neginf=0.0), -MAX_DENSITY_SLOPE_PER_MM, 0.0)


def sample_radius(r0_mm: np.ndarray, r1_mm: np.ndarray, slope_per_mm: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Radii in [r0, r1] with the area density exp(slope r), by inverting the cumulative distribution of
    r exp(slope r) at the uniform numbers ``u`` (bisection; slope 0: uniform in area, in closed form)."""
    r0, r1, s = (np.broadcast_to(np.asarray(a, np.float64), np.shape(u)) for a in (r0_mm, r1_mm, slope_per_mm))
    radius = np.sqrt(r0**2 + u * (r1**2 - r0**2))
    steep = np.abs(s) * (r1 - r0) >= 1e-6
    if np.any(steep):
        radius[steep] = _invert_exponential_disc(r0[steep], r1[steep], s[steep], np.asarray(u)[steep])
    return radius


def _invert_exponential_disc(r0: np.ndarray, r1: np.ndarray, s: np.ndarray, u: np.ndarray) -> np.ndarray:
    """:func:`sample_radius` for slopes away from 0."""
    def primitive(r):  # integral of r exp(s (r - r0)), up to a constant
        return np.exp(s * (r - r0)) * (r / s - 1.0 / s**2)

    target = primitive(r0) + u * (primitive(r1) - primitive(r0))
    lo, hi = r0.copy(), r1.copy()
    for _ in range(40):  # (r1 - r0) / 2^40: far below a micrometre
        mid = 0.5 * (lo + hi)
        below = primitive(mid) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


#: most cells a readout may have (50 times the ILD ECAL's 187 230): every cell has its own entries in
#: the geometry's tables and in each voxelised shower
MAX_CELLS = 10_000_000


def _check_cell_count(n_cells: int) -> None:
    """A geometry error for more cells than :data:`MAX_CELLS` (``n_cells`` a Python integer: no overflow)."""
    if n_cells > MAX_CELLS:
        raise GeometryError(f"the readout has {n_cells:,} cells, more than the {MAX_CELLS:,} caloadapt handles; "
                            "use fewer or larger cells")


def _offsets(cells_per_layer: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(cells_per_layer)]).astype(np.int64)


@dataclass(frozen=True, eq=False)
class PlanarReadout:
    """Square cells of ``pitch_mm`` on an ``n_x`` x ``n_y`` grid, the same in every layer.

    The grid is centred on the impact point, so with odd ``n_x``/``n_y`` the impact point sits at
    a cell centre (the ILD default of the simulator reference §5.1). Local index ``ix * n_y + iy``.
    """

    n_layers: int
    pitch_mm: float
    n_x: int
    n_y: int
    kind: str = field(default="planar", init=False)
    #: a planar grid is fixed to the detector: its layers are the detector's
    along_particle: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.pitch_mm) and self.pitch_mm > 0) or self.n_x < 1 or self.n_y < 1 \
                or self.n_layers < 1:
            raise GeometryError("a planar readout needs a positive, finite pitch, layers and cell counts")
        _check_cell_count(int(self.n_layers) * int(self.n_x) * int(self.n_y))

    @property
    def x_min_mm(self) -> float:
        return -0.5 * self.n_x * self.pitch_mm

    @property
    def y_min_mm(self) -> float:
        return -0.5 * self.n_y * self.pitch_mm

    @property
    def cells_per_layer(self) -> np.ndarray:
        return np.full(self.n_layers, self.n_x * self.n_y, np.int64)

    @property
    def max_radius_mm(self) -> float:
        """Distance of the farthest cell corner from the axis: no point beyond it is read out."""
        return float(np.hypot(self.x_min_mm, self.y_min_mm))

    @property
    def layer_offsets(self) -> np.ndarray:
        return _offsets(self.cells_per_layer)

    def local_index(self, layer: np.ndarray, x_mm: np.ndarray, y_mm: np.ndarray) -> np.ndarray:
        """Cell index inside the layer, -1 where the point misses the grid."""
        ix = np.floor((x_mm - self.x_min_mm) / self.pitch_mm).astype(np.int64)
        iy = np.floor((y_mm - self.y_min_mm) / self.pitch_mm).astype(np.int64)
        inside = (ix >= 0) & (ix < self.n_x) & (iy >= 0) & (iy < self.n_y)
        return np.where(inside, ix * self.n_y + iy, -1)

    def _grid(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return local // self.n_y, local % self.n_y

    def centres(self, layer: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Transverse centre in mm of the given cells."""
        ix, iy = self._grid(local)
        return self.x_min_mm + (ix + 0.5) * self.pitch_mm, self.y_min_mm + (iy + 0.5) * self.pitch_mm

    def sample(self, layer: np.ndarray, local: np.ndarray, rng: np.random.Generator,
               energy_mev: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Points uniform inside the given cells (square cells: ``energy_mev`` is not used)."""
        ix, iy = self._grid(local)
        u, v = uniform_inside(rng, (2, len(local)))
        return self.x_min_mm + (ix + u) * self.pitch_mm, self.y_min_mm + (iy + v) * self.pitch_mm

    def to_spec(self) -> dict:
        return {"kind": "planar", "pitch_mm": self.pitch_mm, "n_x": self.n_x, "n_y": self.n_y}


@dataclass(frozen=True, eq=False)
class CylindricalReadout:
    """Rings and angular sectors around the shower axis, possibly different per layer.

    Follows the CaloChallenge convention (XMLHandler.py): angular bin ``j`` covers
    ``[-pi + j * 2pi/n_alpha, -pi + (j + 1) * 2pi/n_alpha)``, radial bin ``k`` covers
    ``[r_edges[k], r_edges[k+1])``; local index ``j * n_r + k`` (radius fastest). A layer with a
    single edge has no cells (the CaloChallenge dataset-1 placeholder layers).

    With ``along_particle`` the mesh follows the incoming particle, as the scoring mesh of the CERN
    fast simulation (Geant4 Par04 ``Par04SensitiveDetector::RetrieveAndSetupHit``): its axis is the
    particle direction through the entrance point, its layers are slices along that axis, and the
    shower frame of such a geometry is the particle's frame (docs/inclined.md). Otherwise the axis is
    the normal through the impact point and the layers are depth slices of the detector.
    """

    r_edges_mm: tuple[np.ndarray, ...]
    n_alpha: tuple[int, ...]
    along_particle: bool = False
    kind: str = field(default="cylindrical", init=False)

    def __post_init__(self) -> None:
        if len(self.r_edges_mm) != len(self.n_alpha) or not self.r_edges_mm:
            raise GeometryError("a cylindrical readout needs one set of radial edges and n_alpha per layer")
        for edges, n_alpha in zip(self.r_edges_mm, self.n_alpha):
            if not np.all(np.isfinite(edges)):
                raise GeometryError(f"radial edges must be finite numbers, got {list(edges)}")
            if len(edges) > 1 and (np.any(np.diff(edges) <= 0) or edges[0] < 0 or n_alpha < 1):
                raise GeometryError("radial edges must increase from >= 0 mm and n_alpha must be >= 1")
        _check_cell_count(sum(max(len(edges) - 1, 0) * int(n_alpha)
                              for edges, n_alpha in zip(self.r_edges_mm, self.n_alpha)))

    @classmethod
    def uniform(cls, n_layers: int, r_edges_mm: Sequence[float], n_alpha: int,
                along_particle: bool = False) -> CylindricalReadout:
        edges = np.asarray(r_edges_mm, dtype=np.float64)
        return cls(tuple(edges for _ in range(n_layers)), tuple(int(n_alpha) for _ in range(n_layers)), along_particle)

    @property
    def n_layers(self) -> int:
        return len(self.r_edges_mm)

    @property
    def n_r(self) -> np.ndarray:
        return np.array([max(len(e) - 1, 0) for e in self.r_edges_mm], np.int64)

    @property
    def cells_per_layer(self) -> np.ndarray:
        return np.where(self.n_r > 0, self.n_r * np.asarray(self.n_alpha), 0).astype(np.int64)

    @property
    def max_radius_mm(self) -> float:
        """Outermost ring edge of any layer: no point beyond it is read out."""
        return float(max(edges[-1] for edges in self.r_edges_mm))

    @property
    def layer_offsets(self) -> np.ndarray:
        return _offsets(self.cells_per_layer)

    @property
    def is_uniform(self) -> bool:
        """True when every layer has the same binning (the CaloChallenge datasets 2 and 3)."""
        first = self.r_edges_mm[0]
        return all(len(e) == len(first) and np.array_equal(e, first) for e in self.r_edges_mm) \
            and len(set(self.n_alpha)) == 1

    def _layer_groups(self, layer: np.ndarray):
        """Yield (layer id, point mask) per layer present (or once for uniform binning)."""
        if self.is_uniform:
            yield 0, np.ones(len(layer), bool)
            return
        for lay in np.unique(layer):
            yield int(lay), layer == lay

    def local_index(self, layer: np.ndarray, x_mm: np.ndarray, y_mm: np.ndarray) -> np.ndarray:
        """Cell index inside the layer, -1 where the point lies outside the mesh."""
        out = np.full(len(layer), -1, np.int64)
        r = np.hypot(x_mm, y_mm)
        alpha = np.arctan2(y_mm, x_mm)
        for lay, sel in self._layer_groups(layer):
            edges, n_alpha = self.r_edges_mm[lay], self.n_alpha[lay]
            n_r = len(edges) - 1
            if n_r < 1:
                continue
            ir = np.searchsorted(edges, r[sel], side="right") - 1
            ia = np.floor((alpha[sel] + np.pi) * (n_alpha / (2 * np.pi))).astype(np.int64) % n_alpha
            out[sel] = np.where((ir >= 0) & (ir < n_r), ia * n_r + ir, -1)
        return out

    def _polar_bins(self, layer: np.ndarray, local: np.ndarray):
        for lay, sel in self._layer_groups(layer):
            edges, n_alpha = self.r_edges_mm[lay], self.n_alpha[lay]
            n_r = len(edges) - 1
            yield sel, edges, 2 * np.pi / n_alpha, local[sel] // n_r, local[sel] % n_r

    def centres(self, layer: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell centre in mm: radial bin midpoint at the angular bin centre (CaloChallenge)."""
        x, y = np.empty(len(local)), np.empty(len(local))
        for sel, edges, d_alpha, ia, ir in self._polar_bins(layer, local):
            r_mid = 0.5 * (edges[ir] + edges[ir + 1])
            alpha = -np.pi + (ia + 0.5) * d_alpha
            x[sel], y[sel] = r_mid * np.cos(alpha), r_mid * np.sin(alpha)
        return x, y

    def sample(self, layer: np.ndarray, local: np.ndarray, rng: np.random.Generator,
               energy_mev: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Points inside the given cells: uniform in area (r^2 uniform), or, given the points' energies,
        with an area density that falls inside each ring as the energy density of these points falls
        from ring to ring (:func:`radial_density_slopes`, :func:`sample_radius`).

        A shower's energy density drops by an order of magnitude across the innermost ring of a
        CaloChallenge readout: its deposits sit close to the axis, where uniform smearing puts most of
        a ring's area, and so most of its points, at the outer edge (docs/fidelity.md, "Adapting a spot
        model to hits").
        """
        x, y = np.empty(len(local)), np.empty(len(local))
        u, v = uniform_inside(rng, (2, len(local)))
        for sel, edges, d_alpha, ia, ir in self._polar_bins(layer, local):
            if energy_mev is None:
                slope = np.zeros(len(ir))
            else:
                slope = radial_density_slopes(edges, np.bincount(ir, energy_mev[sel], len(edges) - 1))[ir]
            r = sample_radius(edges[ir], edges[ir + 1], slope, u[sel])
            alpha = -np.pi + (ia + v[sel]) * d_alpha
            x[sel], y[sel] = r * np.cos(alpha), r * np.sin(alpha)
        return x, y

    def to_spec(self) -> dict:
        oriented = {"along_particle": True} if self.along_particle else {}
        if self.is_uniform:
            return {"kind": "cylindrical", "r_edges_mm": [float(e) for e in self.r_edges_mm[0]],
                    "n_alpha": int(self.n_alpha[0]), **oriented}
        return {"kind": "cylindrical",
                "layers": [{"r_edges_mm": [float(e) for e in edges], "n_alpha": int(n)}
                           for edges, n in zip(self.r_edges_mm, self.n_alpha)], **oriented}


Readout = PlanarReadout | CylindricalReadout
