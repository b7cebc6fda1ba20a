"""How showers of any geometry enter the model: point features, shower statistics, conditioning.

**Point frame.** ``physical`` (default): transverse position in Moliere radii of the layer the
point is in, depth in radiation lengths from the front face, and ln of the point's
deposited-energy equivalent (cell energy / (calibration x visible fraction of its layer)) relative
to the incident energy. Showers of the ILD-like and the CaloChallenge detectors then share one
physical scale. With ``transverse_scale_rm`` = r0 > 0 the transverse position is compressed
radially, r -> r0 asinh(r / r0) along the same direction (linear in the core, logarithmic in the
halo): the point density of an electromagnetic shower falls by orders of magnitude over a few
Moliere radii while its energy sits in a core of about 0.1 R_M, so on a linear scale the core
that holds a third of the energy occupies a few per cent of the feature range
(``docs/fidelity.md``). ``box``: the published normalisation (arXiv:2512.00187): transverse position
divided by the half-size of the readout, depth as layer position mapped to [-1, 1], ln of the
visible energy in MeV; kept to measure what the physical frame buys.

**Shower statistics for the flow.** Longitudinal development on a fixed grid in X0 (independent
of the number of layers of any detector): energy fraction and number of points per grid bin, and
the transverse centre of gravity in Moliere radii. A layer's value is spread uniformly in X0 over
the layer's extent; back-mapping integrates the grid over each layer of the target geometry, so
a flow trained on 30 layers serves 45.

**Conditioning** never changes meaning between pre-training and fine-tuning (a flaw of the
reference): ``ln(E_inc / 1 GeV) / ln(1000)`` and ``ln(N) / ln(20000)``, fixed constants; the
incidence direction enters as the transverse components (d_x, d_y) of the particle's unit
direction in the shower frame (0, 0 at normal incidence), as CaloClouds-3 conditions on the local
direction (docs/inclined.md).

**Along the shower axis.** An inclined shower's axis crosses depth z at z (d_x, d_y) / d_z
(docs/inclined.md). Transverse positions and the centre of gravity are taken relative to the axis
at the point's depth (:func:`axis_slope`), so the network and the flow see a shower centred on
its axis whatever its angle, and generation puts the points back along the axis
(:func:`along_axis`): the shift of the centre of gravity from layer to layer, tan(inclination) x
depth, is applied, not learnt. At normal incidence the slope is exactly 0 and nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..geometry import Geometry, PlanarReadout
from ..geometry.layer_units import depth_to_layer_units
from ..incidence import local_direction
from ..showers import ENERGY, Showers
from ..simulate.engine import gflash_medium
from ..simulate.gflash import spot_count

__all__ = ["FRAMES", "OUTSIDE_BOUND", "DepthGrid", "PointFrame", "shower_statistics", "statistics_to_layers",
           "energy_condition", "points_condition", "shower_depth_condition", "layer_energy_depth_x0",
           "shower_depth_x0", "hits_as_spots", "n_statistics", "direction_condition", "axis_slope", "along_axis"]

FRAMES = ("physical", "box")
#: small offsets that keep empty grid bins away from ln(0); dequantisation noise is added on top
ENERGY_FLOOR = 1e-5
COUNT_FLOOR = 1.0
#: generated points are kept within this multiple of the readout's reach (``readout.max_radius_mm``).
#: A point beyond the readout is never read out, so the bound changes no cell; it stops a sampler
#: error far from the core, which the inverse compression r0 sinh(u / r0) amplifies exponentially,
#: from placing points metres from the axis (docs/fidelity.md, "Few sampler steps fail").
OUTSIDE_BOUND = 2.0


def energy_condition(incident_energy_mev: np.ndarray) -> np.ndarray:
    """Normalised incident energy: 0 at 1 GeV, 1 at 1 TeV (fixed, geometry-independent)."""
    return np.log(np.asarray(incident_energy_mev, np.float64) / 1000.0) / np.log(1000.0)


def points_condition(n_points: np.ndarray) -> np.ndarray:
    """Normalised number of points: ln(N) / ln(20000)."""
    return np.log(np.maximum(np.asarray(n_points, np.float64), 1.0)) / np.log(20000.0)


def shower_depth_condition(depth_x0: np.ndarray) -> np.ndarray:
    """Normalised longitudinal centre of gravity of a shower: depth / 20 X0 (fixed, any detector)."""
    return np.asarray(depth_x0, np.float64) / 20.0


def direction_condition(geometry: Geometry, theta_deg: np.ndarray, phi_deg: np.ndarray) -> np.ndarray:
    """``(N, 2)`` condition of the incidence direction: (d_x, d_y) of the unit direction in the shower
    frame of ``geometry`` (its barrel faces decide phi's share, docs/inclined.md); (0, 0) at normal
    incidence."""
    return local_direction(theta_deg, phi_deg, geometry.barrel_sides)[:, :2]


def axis_slope(geometry: Geometry, theta_deg: np.ndarray, phi_deg: np.ndarray) -> np.ndarray:
    """``(N, 2)`` transverse displacement of each shower's axis per mm of depth, (d_x, d_y) / d_z.

    Zero at normal incidence, and in a mesh that follows the particle, whose showers are held in
    the particle's own frame (``readout.along_particle``, docs/inclined.md).
    """
    direction = geometry.axis_direction(theta_deg, phi_deg)
    return direction[:, :2] / direction[:, 2:3]


def along_axis(points: np.ndarray, slope: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """``points`` (P, >= 3, mm) with ``sign`` x the axis position at their depth added to x and y
    (``slope`` per point, :func:`axis_slope`): -1 takes detector-frame points to axis-relative ones,
    +1 brings them back. A copy, unless every slope is 0."""
    if not np.any(slope):
        return points
    moved = np.array(points, dtype=np.float64)
    moved[:, :2] += sign * slope * moved[:, 2:3]
    return moved


def _axis_relative(geometry: Geometry, showers: Showers) -> np.ndarray:
    """``(P, 4)`` float64 points with x, y taken from the shower's axis at their depth."""
    slope = axis_slope(geometry, showers.theta_deg, showers.phi_deg)[showers.shower_index]
    return along_axis(showers.points.astype(np.float64), slope, -1.0)


def layer_energy_depth_x0(geometry: Geometry, layer_energy: np.ndarray) -> np.ndarray:
    """``(N,)`` energy-weighted mean depth [X0] of showers given their ``(N, n_layers)`` layer energies,
    each layer at its centre (the flow's layer energies in generation, the data's in training)."""
    depth = geometry.stack.x0_at(geometry.layer_centres_mm)
    total = layer_energy.sum(axis=1)
    return np.divide(layer_energy @ depth, total, out=np.zeros_like(total, dtype=np.float64), where=total > 0)


def shower_depth_x0(geometry: Geometry, showers: Showers) -> np.ndarray:
    """``(N,)`` energy-weighted mean layer depth [X0] of data showers (cell energies, each point at
    its layer's centre): what :func:`layer_energy_depth_x0` gives for the flow's layer energies."""
    n, n_layers = len(showers), geometry.n_layers
    flat = showers.shower_index * n_layers + _hit_layers(geometry, showers)
    layer_energy = np.bincount(flat, showers.points[:, 3].astype(np.float64), n * n_layers)
    return layer_energy_depth_x0(geometry, layer_energy.reshape(n, n_layers))


def hits_as_spots(geometry: Geometry, showers: Showers, rng: np.random.Generator) -> Showers:
    """Cell-level hits split into spot-like points, at the hit's cell centre (smeared inside the cell
    afterwards like any hit, :meth:`Geometry.dequantise`); sub-cell points are returned unchanged.

    A hit holding the share f of its shower's energy becomes k points of equal energy, k the
    stochastically rounded f x N_spot (at least one), N_spot the GFlash spot count of a shower of the
    incident energy in this detector (:func:`caloadapt.simulate.gflash.spot_count`, hep-ex/0001020):
    the core's energy is then carried by many points, as in the spots a model pre-trained on the
    simulator's spots knows, and no longer by a few points of very high energy, which a point network
    places too far out (docs/fidelity.md, "Adapting a spot model to hits"). Cell energies are kept.
    """
    if not len(showers.points) or not geometry.holds_hits(showers):
        return showers
    energy = showers.points[:, ENERGY].astype(np.float64)
    shower = showers.shower_index
    total = np.bincount(shower, energy, len(showers))
    n_spots = spot_count(gflash_medium(geometry), showers.incident_energy_mev / 1000.0, geometry.shower.sampling_term)
    expected = n_spots[shower] * energy / np.maximum(total[shower], 1e-30)
    k = np.maximum(np.floor(expected + rng.random(len(expected))), 1).astype(np.int64)
    points = np.repeat(showers.points, k, axis=0)
    points[:, ENERGY] /= np.repeat(k, k).astype(np.float32)
    counts = np.bincount(shower, k, len(showers)).astype(np.int64)
    return Showers.from_counts(points, counts, showers.incident_energy_mev, particle=showers.particle,
                               geometry=showers.geometry, meta=dict(showers.meta))


@dataclass(frozen=True)
class DepthGrid:
    """Fixed longitudinal grid in radiation lengths: ``n_bins`` bins of ``step_x0`` from 0."""

    step_x0: float = 0.5
    depth_x0: float = 40.0

    @property
    def n_bins(self) -> int:
        return int(round(self.depth_x0 / self.step_x0))

    @property
    def edges_x0(self) -> np.ndarray:
        return self.step_x0 * np.arange(self.n_bins + 1)

    def overlap(self, geometry: Geometry) -> np.ndarray:
        """``(n_layers, n_bins)`` length in X0 shared by each readout layer and each grid bin."""
        return _overlap(self, geometry)

    def layers_to_grid(self, geometry: Geometry, per_layer: np.ndarray) -> np.ndarray:
        """Spread ``(N, n_layers)`` per-layer amounts uniformly in X0 onto the grid (sums kept)."""
        overlap = self.overlap(geometry)
        width = overlap.sum(axis=1, keepdims=True)
        return per_layer @ np.divide(overlap, width, out=np.zeros_like(overlap), where=width > 0)

    def grid_to_layers(self, geometry: Geometry, per_bin: np.ndarray) -> np.ndarray:
        """Share each bin's ``(N, n_bins)`` amount among the layers covering it, by overlap.

        Sums are kept, except for bins no layer covers (behind the detector: leakage).
        """
        overlap = self.overlap(geometry)
        covered = overlap.sum(axis=0, keepdims=True)
        return per_bin @ np.divide(overlap, covered, out=np.zeros_like(overlap), where=covered > 0).T


@lru_cache(maxsize=32)
def _overlap(grid: DepthGrid, geometry: Geometry) -> np.ndarray:
    layer_x0 = geometry.stack.x0_at(geometry.layer_edges_mm)
    lo = np.maximum(layer_x0[:-1, None], grid.edges_x0[None, :-1])
    hi = np.minimum(layer_x0[1:, None], grid.edges_x0[None, 1:])
    return np.clip(hi - lo, 0.0, None)


def n_statistics(grid: DepthGrid) -> int:
    """Length of the shower-statistics vector: energy and points per bin, centre of gravity."""
    return 2 * grid.n_bins + 2


def _hit_layers(geometry: Geometry, showers: Showers) -> np.ndarray:
    layer = geometry.layer_index(showers.points[:, 2])
    if np.any(layer < 0):
        raise ValueError(f"{np.sum(layer < 0)} points lie outside the readout layers of {geometry.name!r}")
    return layer


def deposited_equivalent_mev(geometry: Geometry, showers: Showers, layer: np.ndarray) -> np.ndarray:
    """Cell energy turned back into deposited energy: E / (calibration x visible fraction)."""
    scale = geometry.energy.calibration * geometry.layer_visible_fraction[layer]
    return showers.points[:, 3].astype(np.float64) / scale


def shower_statistics(geometry: Geometry, showers: Showers, rng: np.random.Generator,
                      grid: DepthGrid) -> np.ndarray:
    """``(N, 2 K + 2)`` flow inputs: ln energy fraction per bin, ln points per bin, centre of gravity.

    Uniform dequantisation noise keeps empty bins (beyond a short detector) from being exact
    point masses, which a flow cannot fit.
    """
    layer = _hit_layers(geometry, showers)
    index = showers.shower_index
    n, n_layers = len(showers), geometry.n_layers
    flat = index * n_layers + layer
    energy = np.bincount(flat, deposited_equivalent_mev(geometry, showers, layer), n * n_layers).reshape(n, n_layers)
    counts = np.bincount(flat, minlength=n * n_layers).reshape(n, n_layers).astype(np.float64)
    energy_grid = grid.layers_to_grid(geometry, energy / showers.incident_energy_mev[:, None])
    count_grid = grid.layers_to_grid(geometry, counts)
    log_energy = np.log(energy_grid + ENERGY_FLOOR * (1 + rng.random(energy_grid.shape)))
    log_count = np.log(count_grid + COUNT_FLOOR + rng.random(count_grid.shape))
    weight = showers.points[:, 3].astype(np.float64)
    total = np.maximum(np.bincount(index, weight, n), 1e-12)
    rm = geometry.layer_moliere_radius_mm[layer]
    position = _axis_relative(geometry, showers)  # centre of gravity about the axis
    cog = [np.bincount(index, weight * position[:, k] / rm, n) / total for k in (0, 1)]
    return np.concatenate([log_energy, log_count, np.stack(cog, axis=1)], axis=1)


def statistics_to_layers(geometry: Geometry, statistics: np.ndarray, incident_energy_mev: np.ndarray,
                         grid: DepthGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Invert :func:`shower_statistics` for a target geometry.

    Returns ``(N, n_layers)`` integer points per layer, ``(N, n_layers)`` cell-energy sum per layer
    in readout MeV, and ``(N, 2)`` centre of gravity in Moliere radii.
    """
    k = grid.n_bins
    energy_grid = np.clip(np.exp(statistics[:, :k]) - 1.5 * ENERGY_FLOOR, 0.0, 1.0)  # fractions of E_inc
    count_grid = np.clip(np.exp(statistics[:, k:2 * k]) - COUNT_FLOOR - 0.5, 0.0, None)
    counts = np.rint(grid.grid_to_layers(geometry, count_grid)).astype(np.int64)
    deposited = grid.grid_to_layers(geometry, energy_grid) * np.asarray(incident_energy_mev)[:, None]
    energy = deposited * geometry.energy.calibration * geometry.layer_visible_fraction[None, :]
    return counts, energy, statistics[:, 2 * k:2 * k + 2]


@dataclass(frozen=True)
class PointFrame:
    """Maps points (x, y, z mm, cell energy MeV) to model features and back for one geometry."""

    geometry: Geometry
    frame: str = "physical"
    #: r0 of the radial compression r -> r0 asinh(r / r0) in Moliere radii; 0 keeps the linear scale
    transverse_scale_rm: float = 0.0
    #: depth feature at the centre of the point's layer (a condition when the layer is given,
    #: ``ModelConfig.depth_given``) instead of the point's own depth
    layer_depth: bool = False

    def __post_init__(self) -> None:
        if self.frame not in FRAMES:
            raise ValueError(f"unknown frame {self.frame!r}; expected one of {FRAMES}")
        if not self.transverse_scale_rm >= 0:
            raise ValueError(f"transverse_scale_rm must be >= 0, got {self.transverse_scale_rm}")
        if self.transverse_scale_rm > 0 and self.frame != "physical":
            raise ValueError("the radial compression (transverse_scale_rm > 0) needs the physical frame")
        if self.layer_depth and self.frame != "physical":
            raise ValueError("a given layer depth needs the physical frame")

    def _compress(self, x: np.ndarray, y: np.ndarray, inverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Radial compression of (x, y) in Moliere radii (or its inverse), direction kept."""
        ratio, _ = self._radial_ratio(x, y, inverse)
        return x * ratio, y * ratio

    def _radial_ratio(self, x: np.ndarray, y: np.ndarray, inverse: bool) -> tuple[np.ndarray | float, np.ndarray]:
        """The factor :meth:`_compress` multiplies (x, y) by (1 without compression), and their radius."""
        # np.hypot guards against overflow at ten times the cost
        r = np.sqrt(x * x + y * y)
        r0 = self.transverse_scale_rm
        if r0 == 0:
            return 1.0, r
        # u > 0 keeps the axis finite: new_r / r = sinh(u) / u (arcsinh(u) / u) is exactly 1 in
        # floating point for tiny u
        u = np.maximum(r / r0, 1e-30)
        return (np.sinh(np.minimum(u, 50.0)) / u if inverse else np.arcsinh(u) / u), r

    def depth_x0(self, layer: np.ndarray) -> np.ndarray:
        """Depth feature of points in readout layers ``layer``: X0 at the layer centres."""
        return self.geometry.stack.x0_at(self.geometry.layer_centres_mm[layer])

    @property
    def _half_size_mm(self) -> float:
        readout = self.geometry.readout
        if isinstance(readout, PlanarReadout):
            return 0.5 * max(readout.n_x, readout.n_y) * readout.pitch_mm
        return float(max(e[-1] for e in readout.r_edges_mm if len(e) > 1))

    def to_features(self, showers: Showers) -> np.ndarray:
        """``(P, 4)`` float32 features of the points of ``showers`` (at their current positions, x and y
        about the shower's axis)."""
        g, p = self.geometry, _axis_relative(self.geometry, showers)
        layer = _hit_layers(g, showers)
        if self.frame == "physical":
            rm = g.layer_moliere_radius_mm[layer]
            e_inc = np.repeat(showers.incident_energy_mev, showers.n_points)
            energy = np.log(np.maximum(deposited_equivalent_mev(g, showers, layer), 1e-12) / e_inc)
            x, y = self._compress(p[:, 0] / rm, p[:, 1] / rm)
            features = [x, y, self.depth_x0(layer) if self.layer_depth else g.stack.x0_at(p[:, 2]), energy]
        else:
            half = self._half_size_mm
            depth = depth_to_layer_units(g, p[:, 2]) / g.n_layers * 2 - 1
            energy = np.log(np.maximum(p[:, 3] / g.energy.calibration, 1e-12))
            features = [p[:, 0] / half, p[:, 1] / half, depth, energy]
        return np.stack(features, axis=1).astype(np.float32)

    def to_points(self, features: np.ndarray, layer: np.ndarray, incident_energy_mev: np.ndarray) -> np.ndarray:
        """``(P, 4)`` column-major points (x, y mm about the shower's axis; z at the layer centre; cell
        energy MeV) from features (:func:`along_axis` puts them on an inclined axis).

        ``layer`` is the readout layer each point was assigned to; ``incident_energy_mev`` is per point.
        """
        g = self.geometry
        f = np.asarray(features, np.float64)
        # the points are filled column by column, column-major (as ShowerModel.generate hands over the
        # features): every column operation here and after runs over contiguous memory
        points = np.empty((4, len(f))).T
        # x and y in mm are the features times one factor per point, found from the features' radius;
        # a cell never holds more than the incident energy: the log energy is clipped before exp
        if self.frame == "physical":
            ratio, radius = self._radial_ratio(f[:, 0], f[:, 1], inverse=True)
            scale = ratio * g.layer_moliere_radius_mm[layer]
            fraction = np.exp(np.clip(f[:, 3], -50.0, 0.0))
            energy = fraction * incident_energy_mev * g.energy.calibration * g.layer_visible_fraction[layer]
        else:
            _, radius = self._radial_ratio(f[:, 0], f[:, 1], inverse=True)
            scale = np.full(len(f), self._half_size_mm)
            energy = np.exp(np.minimum(f[:, 3], np.log(incident_energy_mev))) * g.energy.calibration
        bound = OUTSIDE_BOUND * g.readout.max_radius_mm
        radius *= scale
        scale *= bound / np.maximum(radius, bound)  # points beyond the bound are pulled onto it
        np.multiply(f[:, 0], scale, out=points[:, 0])
        np.multiply(f[:, 1], scale, out=points[:, 1])
        points[:, 2] = g.layer_centres_mm[layer]
        points[:, 3] = energy
        return points
