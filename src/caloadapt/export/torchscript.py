"""TorchScript export of the whole generator: (energy, direction) in, a shower out, torch alone.

:func:`export_torchscript` writes one file that holds everything :meth:`ShowerModel.generate` does
for a one-step (distilled) model in one geometry: the flow's sampling, the occupancy calibration,
the points per layer, the consistency function, the layer energies, the centre of gravity, the
axis of an inclined shower and the calibration of the cells above threshold, with its own random
numbers (``torch.manual_seed`` of the caller seeds them). ``torch.jit.load`` reads it and it runs
with torch alone; caloadapt need not be installed where it runs.

What is reused and what is rewritten (docs/geant4.md):

- the flow's inverse (:meth:`ShowerFlow._invert`) and the consistency function
  (:class:`~caloadapt.models.consistency.ConsistencyPrecond` around the model's point network)
  are the model's own modules, traced (``torch.jit.trace``: both are plain tensor code at batch 1);
- the numpy steps of :meth:`ShowerModel.generate` are rewritten here as TorchScript functions of
  one shower (``layers_from_statistics``, ``points_for_hits``, ``features_to_points``,
  ``scale_layers``, ``shift_centre_of_gravity``, ``visible_cell_factor``); the tests check each
  against the original on the same input.

Two contracts wrap the same generator (:data:`CONTRACTS`):

- ``ddml`` (key4hep/DDML ``CaloCloudsTwoAngleModel``): ``forward(energy_gev[1], theta_deg[1],
  phi_deg[1]) -> float32[4 * max_points]``, a header of ``n_layers`` quadruples whose first entry
  is the points in that layer, then ``(x, y, layer, energy)`` per point;
- ``par04`` (Geant4 ``examples/extended/parameterisations/Par04``): ``forward(gen_vector) ->
  float32[n_r * n_phi * n_z]``, the energy of every cell of the cylindrical scoring mesh over the
  particle's energy.
"""

import copy
import json
import math
import os
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from .._atomic import atomic_path, output_target
from ..errors import InputError
from ..geometry import Geometry
from ..geometry.descriptor import geometry_descriptor
from ..geometry.readout import CylindricalReadout, PlanarReadout
from ..incidence import MAX_INCLINATION_DEG
from ..models.consistency import CONSISTENCY_KEY, ConsistencyPrecond, multistep_sigmas
from ..models.representation import COUNT_FLOOR, ENERGY_FLOOR, OUTSIDE_BOUND
from ..models.sampling import Sampler

__all__ = ["CONTRACTS", "METADATA_FILE", "DDML_MAX_POINTS", "PAR04_MAX_ENERGY_MEV", "PAR04_MAX_ANGLE_DEG",
           "ShowerGenerator", "DDMLPointCloud", "Par04Mesh", "export_torchscript", "export_checkpoint_torchscript",
           "torchscript_metadata", "parse_ddml_output", "layers_from_statistics", "points_for_hits",
           "features_to_points", "scale_layers", "shift_centre_of_gravity", "visible_cell_factor",
           "ddml_direction", "par04_direction"]

#: the contracts an exported file can follow: DDML's point cloud or Par04's scoring mesh
CONTRACTS = ("ddml", "par04")
#: name of the JSON metadata inside the file (``torch.jit.load(path, _extra_files={METADATA_FILE: ""})``)
METADATA_FILE = "caloadapt.json"
#: quadruples of the DDML output by default: key4hep/DDML ``CaloCloudsTwoAngleModel.h`` allocates
#: ``m_maxNumElements = 6868`` floats and copies that many out of the model's tensor
DDML_MAX_POINTS = 6868 // 4
#: Par04's condition encoding (``Par04InferenceSetup.hh``): energy over 1024 GeV, angle over 90 degrees
PAR04_MAX_ENERGY_MEV = 1024000.0
PAR04_MAX_ANGLE_DEG = 90.0
#: points per layer at most, as ``ShowerModel.generate``'s default ``max_points`` (40 000) allows
GENERATE_MAX_POINTS = 40_000


# -- the numpy steps of ShowerModel.generate, rewritten for one shower ---------------------------------

def layers_from_statistics(statistics: Tensor, energy_mev: float, grid_to_layers: Tensor,
                           cell_mev_per_deposited_mev: Tensor, energy_floor: float = 1e-5,
                           count_floor: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`~caloadapt.models.representation.statistics_to_layers` of one shower.

    ``statistics`` (2 K + 2,) float64 flow output (un-normalised), ``grid_to_layers`` (K, L) each
    grid bin's share of every layer, ``cell_mev_per_deposited_mev`` (L,) calibration x visible
    fraction, ``energy_floor`` and ``count_floor`` the offsets of empty grid bins (``ENERGY_FLOOR``,
    ``COUNT_FLOOR``). Returns hits per layer (L,) int64, cell energy per layer (L,) MeV and the centre of
    gravity (2,) in Moliere radii.
    """
    k = grid_to_layers.shape[0]
    energy_grid = torch.clamp(torch.exp(statistics[:k]) - 1.5 * energy_floor, 0.0, 1.0)
    count_grid = torch.clamp(torch.exp(statistics[k:2 * k]) - count_floor - 0.5, min=0.0)
    hits = torch.round(count_grid @ grid_to_layers).to(torch.int64)  # half to even, as np.rint
    layer_energy = (energy_grid @ grid_to_layers) * energy_mev * cell_mev_per_deposited_mev
    return hits, layer_energy, statistics[2 * k:2 * k + 2]


def points_for_hits(hits: Tensor, log_efficiency: Tensor, exponent: Tensor, hit_scale: Tensor,
                    uniform: Tensor) -> Tensor:
    """:meth:`~caloadapt.models.occupancy.OccupancyCalibration.points_for_hits` with its stochastic
    rounding driven by ``uniform`` (same shape as ``hits``, uniform in [0, 1))."""
    wanted = hits.to(torch.float64) * hit_scale
    points = torch.exp((torch.log(torch.clamp(wanted, min=1e-12)) - log_efficiency) / (1.0 + exponent))
    points = torch.where(wanted > 0, torch.maximum(points, torch.clamp(wanted, max=1.0)), torch.zeros_like(points))
    low = torch.floor(points)
    return (low + (uniform < points - low).to(torch.float64)).to(torch.int64)


def features_to_points(features: Tensor, layer: Tensor, energy_mev: float, physical: bool,
                       transverse_scale_rm: float, moliere_radius_mm: Tensor, cell_mev_per_deposited_mev: Tensor,
                       calibration: float, half_size_mm: float, bound_mm: float,
                       layer_centres_mm: Tensor) -> Tensor:
    """:meth:`~caloadapt.models.representation.PointFrame.to_points` of one shower's ``(P, 4)`` float64
    features: ``(P, 4)`` points (x, y mm about the axis, z at the layer centre, cell energy MeV)."""
    fx, fy, fe = features[:, 0], features[:, 1], features[:, 3]
    radius = torch.sqrt(fx * fx + fy * fy)
    if physical:
        if transverse_scale_rm > 0:
            u = torch.clamp(radius / transverse_scale_rm, min=1e-30)
            ratio = torch.sinh(torch.clamp(u, max=50.0)) / u
        else:
            ratio = torch.ones_like(radius)
        scale = ratio * moliere_radius_mm[layer]
        energy = torch.exp(torch.clamp(fe, -50.0, 0.0)) * energy_mev * cell_mev_per_deposited_mev[layer]
    else:
        scale = torch.full_like(radius, half_size_mm)
        energy = torch.exp(torch.clamp(fe, max=math.log(energy_mev))) * calibration
    scale = scale * (bound_mm / torch.clamp(radius * scale, min=bound_mm))  # beyond the bound: onto it
    return torch.stack([fx * scale, fy * scale, layer_centres_mm[layer], energy], dim=1)


def scale_layers(energy: Tensor, layer: Tensor, layer_energy: Tensor) -> Tensor:
    """The points' ``energy`` scaled so each layer holds ``layer_energy`` (``_scale_layers``, one shower)."""
    held = torch.zeros_like(layer_energy).index_add_(0, layer, energy)
    factor = torch.where(held > 0, layer_energy / torch.where(held > 0, held, torch.ones_like(held)),
                         torch.ones_like(held))
    return energy * factor[layer]


def shift_centre_of_gravity(points: Tensor, layer: Tensor, cog_rm: Tensor, moliere_radius_mm: Tensor,
                            max_radius_mm: float) -> Tensor:
    """The points moved transversally so that their energy-weighted centre within the readout's reach,
    in Moliere radii, is ``cog_rm`` (``_shift_centre_of_gravity``, one shower)."""
    rm = moliere_radius_mm[layer]
    x, y = points[:, 0], points[:, 1]
    weight = torch.where(x * x + y * y <= max_radius_mm ** 2, points[:, 3], torch.zeros_like(x))
    total = torch.clamp(weight.sum(), min=1e-12)
    weight = weight / rm
    x = x + (cog_rm[0] - (weight * x).sum() / total) * rm
    y = y + (cog_rm[1] - (weight * y).sum() / total) * rm
    return torch.stack([x, y, points[:, 2], points[:, 3]], dim=1)


def cell_index(points: Tensor, layer: Tensor, planar: bool, x_min_mm: float, y_min_mm: float, pitch_mm: float,
               n_x: int, n_y: int, r_edges_mm: Tensor, n_alpha: int, cells_per_layer: int) -> Tensor:
    """The cell of every point in its (assigned) layer, ``layer * cells_per_layer + local`` as
    ``Geometry.cell_index`` numbers them for a readout with the same cells in every layer; -1 outside."""
    x, y = points[:, 0], points[:, 1]
    if planar:
        ix = torch.floor((x - x_min_mm) / pitch_mm).to(torch.int64)
        iy = torch.floor((y - y_min_mm) / pitch_mm).to(torch.int64)
        inside = (ix >= 0) & (ix < n_x) & (iy >= 0) & (iy < n_y)
        local = ix * n_y + iy
    else:
        n_r = r_edges_mm.shape[0] - 1
        ir = torch.searchsorted(r_edges_mm, torch.sqrt(x * x + y * y).contiguous(), right=True) - 1
        alpha = torch.atan2(y, x)
        ia = torch.remainder(torch.floor((alpha + math.pi) * (n_alpha / (2 * math.pi))).to(torch.int64), n_alpha)
        inside = (ir >= 0) & (ir < n_r)
        local = ia * n_r + ir
    return torch.where(inside, layer * cells_per_layer + local, torch.full_like(local, -1))


def visible_cell_factor(cells: Tensor, energy: Tensor, layer_energy: Tensor, cells_per_layer: int,
                        threshold_mev: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``_visible_cell_scale`` of one shower: the cells ``cells`` (``cell_index``, -1 outside) hold the
    points' ``energy``; returns the distinct cells, their energies, each cell's factor that makes
    the cells at or above ``threshold_mev`` of every layer hold ``layer_energy`` (1 below it), and the
    position in the distinct cells of every point inside the readout."""
    inside = cells >= 0
    keys, inverse = torch.unique(cells[inside], sorted=True, return_inverse=True)
    cell_energy = torch.zeros(keys.shape[0], dtype=energy.dtype).index_add_(0, inverse, energy[inside])
    visible = cell_energy >= threshold_mev
    cell_layer = torch.div(keys, cells_per_layer, rounding_mode="floor")
    held = torch.zeros_like(layer_energy).index_add_(0, cell_layer[visible], cell_energy[visible])
    scale = torch.where(held > 0, layer_energy / torch.where(held > 0, held, torch.ones_like(held)),
                        torch.ones_like(held))
    return keys, cell_energy, torch.where(visible, scale[cell_layer], torch.ones_like(cell_energy)), inverse


def ddml_direction(theta_deg: float, phi_deg: float, max_inclination_deg: float = 80.0) -> Tensor:
    """The shower-frame direction (d_x, d_y, d_z) of DDML's local angles (``CaloCloudsTwoAngleModel::
    prepareInput``: theta = arccos(z'), phi = atan2(y', x') of the local direction after its x and y
    sign flips, in which (x', y', z') = (d_y, d_x, d_z), docs/inclined.md), the inclination
    limited to ``max_inclination_deg`` (``MAX_INCLINATION_DEG``)."""
    theta = min(max(theta_deg, 0.0), max_inclination_deg) * math.pi / 180.0
    phi = phi_deg * math.pi / 180.0
    return torch.tensor([math.sin(theta) * math.sin(phi), math.sin(theta) * math.cos(phi), math.cos(theta)],
                        dtype=torch.float64)


def par04_direction(theta_deg: float, max_inclination_deg: float = 80.0) -> Tensor:
    """The shower-frame direction of Par04's angle: the polar angle to the cylinder's axis (the beam),
    normal incidence at 90 degrees, as ``caloadapt.incidence.local_direction`` on a cylinder."""
    elevation = min(max(90.0 - theta_deg, -max_inclination_deg), max_inclination_deg) * math.pi / 180.0
    return torch.tensor([0.0, math.sin(elevation), math.cos(elevation)], dtype=torch.float64)


# -- the generator ----------------------------------------------------------------------------------

class _FlowInverse(nn.Module):
    """The flow's inverse map of base samples (traced)."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, base: Tensor, context: Tensor) -> Tensor:
        return self.flow._invert(base, context)  # noqa: SLF001 - the model's own sampling arithmetic


def _double(values) -> Tensor:
    return torch.as_tensor(np.asarray(values, np.float64), dtype=torch.float64)


class ShowerGenerator(nn.Module):
    """One shower of a one-step model in one geometry, as :meth:`ShowerModel.generate` makes it.

    ``shower(energy_mev, direction)`` returns ``(points (P, 4) float64, layer (P,) int64, counts (L,)
    int64)``: points x, y [mm] in the shower frame (about the impact point, along the axis of an
    inclined shower), z at the layer centre [mm], cell energy [MeV]; the layer of each point (the
    points are in layer order) and the points per layer. The contracts wrap it (:class:`DDMLPointCloud`,
    :class:`Par04Mesh`); :func:`export_torchscript` builds and writes them.
    """

    def __init__(self, model, geometry: Geometry, sampler: Sampler) -> None:
        super().__init__()
        config = model.config
        readout = geometry.readout
        if isinstance(readout, CylindricalReadout) and not readout.is_uniform:
            raise InputError(f"geometry {geometry.name!r}: its cylindrical readout differs from layer to layer; "
                             "the exported generator digitises readouts with the same cells in every layer")
        if config.backbone != "pointwise":
            raise InputError("the exported generator holds the pointwise point network; this model's backbone "
                             f"is {config.backbone!r}")
        n_layers = geometry.n_layers
        self.n_layers = n_layers
        self.layer_cap = GENERATE_MAX_POINTS // n_layers + 1
        self.depth_given = bool(config.depth_given)
        self.shower_depth_condition = bool(config.shower_depth_condition)
        self.angle_conditioning = bool(config.angle_conditioning)
        self.physical = config.frame == "physical"
        self.transverse_scale_rm = float(config.transverse_scale_rm)
        self.calibration = float(geometry.energy.calibration)
        self.threshold_mev = float(geometry.energy.threshold_mev)
        self.max_radius_mm = float(readout.max_radius_mm)
        self.bound_mm = OUTSIDE_BOUND * self.max_radius_mm
        frame = config.point_frame(geometry)
        self.half_size_mm = float(frame._half_size_mm)  # noqa: SLF001 - the box frame's scale
        self.along_particle = bool(readout.along_particle)
        self.planar = isinstance(readout, PlanarReadout)
        if self.planar:
            self.x_min_mm, self.y_min_mm = float(readout.x_min_mm), float(readout.y_min_mm)
            self.pitch_mm, self.n_x, self.n_y, self.n_alpha = float(readout.pitch_mm), readout.n_x, readout.n_y, 1
            self.register_buffer("r_edges_mm", torch.zeros(2, dtype=torch.float64))
        else:
            self.x_min_mm = self.y_min_mm = 0.0
            self.pitch_mm, self.n_x, self.n_y, self.n_alpha = 1.0, 1, 1, int(readout.n_alpha[0])
            self.register_buffer("r_edges_mm", _double(readout.r_edges_mm[0]))
        self.cells_per_layer = int(readout.cells_per_layer[0])
        # the flow's grid shared among the layers (DepthGrid.grid_to_layers as one matrix)
        overlap = config.grid.overlap(geometry)
        covered = overlap.sum(axis=0, keepdims=True)
        share = np.divide(overlap, covered, out=np.zeros_like(overlap), where=covered > 0).T
        self.register_buffer("grid_to_layers", _double(share))
        self.register_buffer("cell_mev_per_deposited_mev",
                             _double(geometry.energy.calibration * geometry.layer_visible_fraction))
        self.register_buffer("moliere_radius_mm", _double(geometry.layer_moliere_radius_mm))
        self.register_buffer("layer_centres_mm", _double(geometry.layer_centres_mm))
        self.register_buffer("layer_depth_x0", _double(geometry.stack.x0_at(geometry.layer_centres_mm)))
        calibration = model.occupancy.get(geometry.name)
        self.calibrated = calibration is not None
        if calibration is not None:
            if calibration.n_layers != n_layers:
                raise InputError(f"the occupancy calibration of {geometry.name!r} has {calibration.n_layers} layers, "
                                 f"the geometry {n_layers}")
            values = (calibration.log_efficiency, calibration.exponent, calibration.hit_scale)
        else:
            values = ((0.0,) * n_layers, (0.0,) * n_layers, (1.0,) * n_layers)
        for name, value in zip(("log_efficiency", "exponent", "hit_scale"), values):
            self.register_buffer(name, _double(value))
        model = copy.deepcopy(model).cpu().float().eval().requires_grad_(False)  # the caller's model stays
        for name in ("point_mean", "point_std", "stats_mean", "stats_std"):
            self.register_buffer(name, getattr(model, name).detach().clone())
        base = model.flow.flow.base().base_dist
        self.register_buffer("base_loc", base.loc.detach().clone().float())
        self.register_buffer("base_scale", base.scale.detach().clone().float())
        self.n_statistics = int(model.flow.n_features)
        descriptor = (geometry_descriptor(geometry) if config.geometry_conditioning else np.zeros(0))
        self.register_buffer("descriptor", torch.as_tensor(np.asarray(descriptor, np.float32)))
        self.flow_context_dim = int(config.flow_condition_dim)
        self.context_dim = int(config.condition_dim)
        # the noise levels of the consistency sampler (sample_consistency)
        levels = multistep_sigmas(sampler.steps, sampler.sigma_min, sampler.sigma_max, sampler.rho)
        self.levels: List[float] = [float(v) for v in levels]
        self.sigma_min = float(sampler.sigma_min)
        function = ConsistencyPrecond.from_edm(model.denoiser, sampler.sigma_min, copy_net=True).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on the shape checks it records as constants
            model.flow._plan()  # noqa: SLF001 - the weights cut once, before the trace: constants in it
            example_points = torch.zeros(1, 7, 4)
            self.consistency = torch.jit.trace(function, (example_points, torch.full((1,), levels[0]),
                                                          torch.zeros(1, self.context_dim)), check_trace=False)
            self.flow_inverse = torch.jit.trace(_FlowInverse(model.flow), (
                torch.zeros(1, self.n_statistics), torch.zeros(1, self.flow_context_dim)), check_trace=False)
        self.depth_feature = 2
        self.energy_floor, self.count_floor = float(ENERGY_FLOOR), float(COUNT_FLOOR)
        self.max_inclination_deg = float(MAX_INCLINATION_DEG)

    def _condition(self, energy_mev: float, direction: Tensor) -> Tensor:
        """``(1, C)`` float32 condition: energy, points, (depth,) (direction,) (descriptor) as
        ``shower_condition`` orders them; points and depth are filled in later."""
        columns = [torch.tensor([math.log(energy_mev / 1000.0) / math.log(1000.0), 0.0], dtype=torch.float32)]
        if self.shower_depth_condition:
            columns.append(torch.zeros(1))
        if self.angle_conditioning:
            columns.append(direction[:2].to(torch.float32))
        columns.append(self.descriptor)
        return torch.cat(columns)[None, :]

    def _flow_condition(self, condition: Tensor) -> Tensor:
        skip = 2 + int(self.shower_depth_condition)
        return torch.cat([condition[:, :1], condition[:, skip:]], dim=1)

    @torch.jit.export
    def shower(self, energy_mev: float, direction: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One shower at ``energy_mev`` along the unit ``direction`` (3,) float64 of the shower frame
        (used by a model trained with angle conditioning; normal incidence otherwise)."""
        if not self.angle_conditioning:
            direction = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        condition = self._condition(energy_mev, direction)
        # 1. the flow: hits and energy per layer, centre of gravity
        base = self.base_loc + self.base_scale * torch.randn(1, self.n_statistics)
        statistics = self.flow_inverse(base, self._flow_condition(condition))
        statistics = (statistics * self.stats_std + self.stats_mean).to(torch.float64)[0]
        hits, layer_energy, cog = layers_from_statistics(statistics, energy_mev, self.grid_to_layers,
                                                         self.cell_mev_per_deposited_mev, self.energy_floor,
                                                         self.count_floor)
        # 2. the occupancy calibration: points per layer
        if self.calibrated:
            counts = points_for_hits(hits, self.log_efficiency, self.exponent, self.hit_scale,
                                     torch.rand(self.n_layers, dtype=torch.float64))
        else:
            counts = hits
        counts = torch.clamp(counts, max=self.layer_cap)
        n_points = int(counts.sum())
        layer = torch.repeat_interleave(torch.arange(self.n_layers), counts)
        if n_points == 0:
            return torch.zeros(0, 4, dtype=torch.float64), layer, counts
        # 3. the point network's condition: the hits asked for, the shower's depth
        condition[0, 1] = math.log(max(float(hits.sum()), 1.0)) / math.log(20000.0)
        if self.shower_depth_condition:
            total_energy = float(layer_energy.sum())
            depth = float(layer_energy @ self.layer_depth_x0) / total_energy if total_energy > 0 else 0.0
            condition[0, 2] = depth / 20.0
        given = torch.full((1, n_points, 4), float("nan"))
        if self.depth_given:
            depth_x0 = self.layer_depth_x0[layer].to(torch.float32)
            given[0, :, self.depth_feature] = (depth_x0 - self.point_mean[self.depth_feature]) \
                / self.point_std[self.depth_feature]
        # 4. the consistency sampler (sample_consistency)
        x = torch.randn(1, n_points, 4) * self.levels[0]
        x = torch.where(torch.isnan(given), x, given)
        x = self.consistency(x, torch.full((1,), self.levels[0]), condition)
        for level in self.levels[1:]:
            noisy = x + math.sqrt(max(level * level - self.sigma_min * self.sigma_min, 0.0)) * torch.randn_like(x)
            x = self.consistency(torch.where(torch.isnan(given), noisy, given), torch.full((1,), level), condition)
        features = (x[0] * self.point_std + self.point_mean).to(torch.float64)
        if not self.depth_given:  # layers by generated depth: the deepest points in the last layers
            features = features[torch.argsort(features[:, self.depth_feature])]
        # 5. points, layer energies, centre of gravity, axis, the cells above threshold
        points = features_to_points(features, layer, energy_mev, self.physical, self.transverse_scale_rm,
                                    self.moliere_radius_mm, self.cell_mev_per_deposited_mev, self.calibration,
                                    self.half_size_mm, self.bound_mm, self.layer_centres_mm)
        points = torch.cat([points[:, :3], scale_layers(points[:, 3], layer, layer_energy)[:, None]], dim=1)
        points = shift_centre_of_gravity(points, layer, cog, self.moliere_radius_mm, self.max_radius_mm)
        if self.angle_conditioning and not self.along_particle:
            slope = direction[:2] / direction[2]
            points = torch.cat([points[:, :2] + slope[None, :] * points[:, 2:3], points[:, 2:]], dim=1)
        cells = self.cells(points, layer)
        _, _, factor, inverse = visible_cell_factor(cells, points[:, 3], layer_energy, self.cells_per_layer,
                                                    self.threshold_mev)
        inside = cells >= 0
        energy = points[:, 3].clone()
        energy[inside] = energy[inside] * factor[inverse]
        points = torch.cat([points[:, :3], energy[:, None]], dim=1)
        return points, layer, counts

    @torch.jit.export
    def cells(self, points: Tensor, layer: Tensor) -> Tensor:
        """The readout cell of each point (``layer * cells_per_layer + local``), -1 outside."""
        return cell_index(points, layer, self.planar, self.x_min_mm, self.y_min_mm, self.pitch_mm, self.n_x,
                          self.n_y, self.r_edges_mm, self.n_alpha, self.cells_per_layer)


class DDMLPointCloud(nn.Module):
    """key4hep/DDML's point-cloud contract (``CaloCloudsTwoAngleModel``), batch 1.

    ``forward(energy_gev, theta_deg, phi_deg)``, each float32 ``[1]``: the particle's kinetic energy
    in GeV and DDML's local polar and azimuthal angles in degrees. Returns float32 ``[4 *
    max_points]``: entries ``4 l`` (l < n_layers) hold the points in layer l (the other header entries
    are 0), then one ``(x, y, layer, energy)`` quadruple per point and zeros. x, y [mm] are in the
    layer plane about the point below the impact point, in the frame ``convertOutput`` negates (x along
    the beam, y across the module, before its sign flips); energy is what the active material of the
    cell absorbs [MeV] (cell energy / calibration), Geant4's deposit.
    """

    def __init__(self, generator: ShowerGenerator, metadata: str, max_points: int) -> None:
        super().__init__()
        self.generator = generator
        self.n_layers = generator.n_layers
        self.max_points = int(max_points)
        self.calibration = generator.calibration
        self.metadata_json = metadata

    def _merged_in_cells(self, points: Tensor, layer: Tensor) -> Tuple[Tensor, Tensor]:
        """One point per readout cell of the model's geometry, at the energy-weighted centre of the points
        in it with their summed energy (what digitisation makes of them is unchanged), in layer order;
        points outside the readout are kept as they are."""
        g = self.generator
        cells = g.cells(points, layer)
        inside = cells >= 0
        keys, inverse = torch.unique(cells[inside], sorted=True, return_inverse=True)
        energy = points[:, 3][inside]
        sums = torch.zeros(keys.shape[0], 3, dtype=points.dtype)
        sums.index_add_(0, inverse, torch.stack([energy, energy * points[:, 0][inside],
                                                 energy * points[:, 1][inside]], dim=1))
        weight = torch.where(sums[:, 0] > 0, sums[:, 0], torch.ones_like(sums[:, 0]))
        cell_layer = torch.div(keys, g.cells_per_layer, rounding_mode="floor")
        merged = torch.stack([sums[:, 1] / weight, sums[:, 2] / weight, g.layer_centres_mm[cell_layer], sums[:, 0]],
                             dim=1)
        points = torch.cat([merged, points[~inside]])
        layer = torch.cat([cell_layer, layer[~inside]])
        order = torch.argsort(layer, stable=True)
        return points[order], layer[order]

    def _within_capacity(self, points: Tensor, layer: Tensor) -> Tuple[Tensor, Tensor]:
        """The points the output holds: all of them if they fit; else merged in their cells; if those do
        not fit either, the most energetic ones, scaled so that every layer keeps its energy."""
        capacity = self.max_points - self.n_layers
        if points.shape[0] <= capacity:
            return points, layer
        points, layer = self._merged_in_cells(points, layer)
        if points.shape[0] <= capacity:
            return points, layer
        layer_energy = torch.zeros(self.n_layers, dtype=points.dtype).index_add_(0, layer, points[:, 3])
        keep = torch.sort(torch.argsort(points[:, 3], descending=True)[:capacity]).values
        points, layer = points[keep], layer[keep]
        energy = scale_layers(points[:, 3], layer, layer_energy)
        return torch.cat([points[:, :3], energy[:, None]], dim=1), layer

    def forward(self, energy_gev: Tensor, theta_deg: Tensor, phi_deg: Tensor) -> Tensor:
        out = torch.zeros(4 * self.max_points)
        energy_mev = float(energy_gev.reshape(-1)[0]) * 1000.0
        if not math.isfinite(energy_mev) or energy_mev <= 0:
            return out  # no shower: every layer empty
        direction = ddml_direction(float(theta_deg.reshape(-1)[0]), float(phi_deg.reshape(-1)[0]),
                                   self.generator.max_inclination_deg)
        points, layer, _ = self.generator.shower(energy_mev, direction)
        points, layer = self._within_capacity(points, layer)
        counts = torch.zeros(self.n_layers, dtype=torch.int64).index_add_(0, layer, torch.ones_like(layer))
        out[0:4 * self.n_layers:4] = counts.to(torch.float32)
        n = points.shape[0]
        # DDML's local frame: (beam, across) = (y, x) of the shower frame (docs/geant4.md)
        body = torch.stack([points[:, 1], points[:, 0], layer.to(torch.float64), points[:, 3] / self.calibration],
                           dim=1).to(torch.float32)
        out[4 * self.n_layers:4 * (self.n_layers + n)] = body.reshape(-1)
        return out

    @torch.jit.export
    def metadata(self) -> str:
        """The JSON metadata (contract, sizes, units, training range)."""
        return self.metadata_json


class Par04Mesh(nn.Module):
    """Geant4 Par04's mesh contract: the energy of every cell of the cylindrical scoring mesh.

    ``forward(gen_vector)``: float32 ``[latent + 4]`` as ``Par04InferenceSetup::GetEnergies`` builds it
    (Gaussian latent numbers, which the file does not use: it draws its own; then energy / 1024 GeV,
    angle / 90 degrees and the two-entry geometry one-hot, which it ignores: the file is one
    geometry). Returns float32 ``[n_r * n_phi * n_z]``, cell ``(iR * n_phi + iPhi) * n_z + iZ`` (the
    order of ``GetPositions``), the cell's energy over the particle's energy (Par04 multiplies by it).
    """

    def __init__(self, generator: ShowerGenerator, metadata: str, max_energy_mev: float,
                 max_angle_deg: float) -> None:
        super().__init__()
        if generator.planar:
            raise InputError("the Par04 contract needs a geometry with a cylindrical mesh (e.g. generic-mesh)")
        self.generator = generator
        self.n_layers = generator.n_layers
        self.n_r = int(generator.r_edges_mm.shape[0] - 1)
        self.n_phi = generator.n_alpha
        self.max_energy_mev = float(max_energy_mev)
        self.max_angle_deg = float(max_angle_deg)
        self.threshold_mev = generator.threshold_mev
        self.metadata_json = metadata

    def forward(self, gen_vector: Tensor) -> Tensor:
        gen = gen_vector.reshape(-1)
        n = gen.shape[0]
        energy_mev = float(gen[n - 4]) * self.max_energy_mev
        size = self.n_r * self.n_phi * self.n_layers
        if not math.isfinite(energy_mev) or energy_mev <= 0:
            return torch.zeros(size)
        direction = par04_direction(float(gen[n - 3]) * self.max_angle_deg, self.generator.max_inclination_deg)
        points, layer, counts = self.generator.shower(energy_mev, direction)
        cells = self.generator.cells(points, layer)
        inside = cells >= 0
        mesh = torch.zeros(self.n_layers * self.n_phi * self.n_r, dtype=torch.float64)
        mesh.index_add_(0, cells[inside], points[:, 3][inside])
        mesh = torch.where(mesh >= self.threshold_mev, mesh, torch.zeros_like(mesh))  # digitised: the threshold
        # caloadapt's cell (layer, alpha, r) -> Par04's (r, phi, z)
        mesh = mesh.reshape(self.n_layers, self.n_phi, self.n_r).permute(2, 1, 0).reshape(-1)
        return (mesh / energy_mev).to(torch.float32)

    @torch.jit.export
    def metadata(self) -> str:
        return self.metadata_json


# -- export -----------------------------------------------------------------------------------------

def _metadata(model, geometry: Geometry, sampler: Sampler, contract: str, max_points: int,
              training: dict, max_energy_mev: float, max_angle_deg: float) -> dict:
    units = {"ddml": {"inputs": "energy_gev float32[1] (GeV), theta_deg float32[1], phi_deg float32[1] (degrees, "
                                "DDML's local angles: theta = arccos(z'), phi = atan2(y', x') of the local direction "
                                "after CaloCloudsTwoAngleModel's x and y sign flips)",
                      "output": f"float32[{4 * max_points}]: header of {geometry.n_layers} quadruples (entry 4 l = "
                                "points in layer l), then (x mm, y mm, layer index, energy MeV) per point, zeros",
                      "frame": "x along the beam, y across the module (shower frame's y and x), about the point of "
                               "the layer below the impact point; convertOutput negates both",
                      "energy": "MeV absorbed in the active material of the cell (cell energy / calibration)"},
             "par04": {"inputs": "gen_vector float32[latent + 4]: latent (ignored), E / max_energy_mev, "
                                 "angle / max_angle_deg (polar angle to the beam, 90 = normal), one-hot (ignored)",
                       "output": "float32[n_r * n_phi * n_z], cell (iR * n_phi + iPhi) * n_z + iZ: cell energy over "
                                 "the particle's energy (cells below the readout threshold are 0)",
                       "energy": "the mesh's cell energy (calibrated: the deposit in all materials of the cell)"}}
    readout = geometry.readout
    meta = {"format": "caloadapt-torchscript-generator", "version": 1, "contract": contract,
            "geometry": geometry.name, "n_layers": geometry.n_layers, "batch_size": 1,
            "angle_conditioning": bool(model.config.angle_conditioning),
            "angles": ("used" if model.config.angle_conditioning else
                       "ignored: the model was trained at normal incidence and generates it whatever the angles"),
            "sampler": sampler.to_dict(), "occupancy_calibrated": geometry.name in model.occupancy,
            "training": training,
            "outside_training_range": (
                "energies outside the training range are generated by extrapolating the flow and the point "
                "network, unchecked; a non-finite or non-positive energy gives an empty shower (zeros); the "
                f"inclination is limited to {MAX_INCLINATION_DEG:g} degrees"),
            "random_numbers": "torch's default generator of the calling process (seed with torch.manual_seed)",
            "threads": "torch's intra-op threads of the calling process (torch.set_num_threads / at::set_num_threads)",
            "caloadapt_version": __version__, "torch_version": torch.__version__, **units[contract]}
    if contract == "ddml":
        meta.update({"max_points": max_points, "output_size": 4 * max_points,
                     "point_capacity": max_points - geometry.n_layers,
                     "over_capacity": "a shower with more points than point_capacity has its points merged in the "
                                      "cells of the model's geometry (one per cell, at the energy-weighted centre, "
                                      "the cell's energy: the same hits); if those do not fit, the most energetic "
                                      "are kept and scaled so that every layer keeps its energy"})
    else:
        meta.update({"n_r": int(readout.n_r[0]), "n_phi": int(readout.n_alpha[0]), "n_z": geometry.n_layers,
                     "output_size": int(readout.n_r[0] * readout.n_alpha[0] * geometry.n_layers),
                     "r_edges_mm": [float(v) for v in readout.r_edges_mm[0]],
                     "layer_edges_mm": [float(v) for v in geometry.layer_edges_mm],
                     "max_energy_mev": max_energy_mev, "max_angle_deg": max_angle_deg})
    return meta


def _training_range(payload: dict) -> dict:
    """What the checkpoint says about the showers it was trained on (energies, angles), where it says it."""
    found = {}
    for key in ("energy_range_gev", "energy_gev", "theta_range_deg", "phi_range_deg"):
        for part in (payload.get("train_config") or {}, payload.get("data") or {}, payload):
            if isinstance(part, dict) and key in part:
                found[key] = part[key]
                break
    return found or {"note": "the checkpoint does not record its training energies; the shipped ILD photon models "
                             "were trained on 10-90 GeV (docs/geant4.md)"}


def export_torchscript(model, geometry: Geometry, sampler: Sampler, path: str | os.PathLike, *,
                       contract: str = "ddml", max_points: int = DDML_MAX_POINTS, training: Optional[dict] = None,
                       max_energy_mev: float = PAR04_MAX_ENERGY_MEV,
                       max_angle_deg: float = PAR04_MAX_ANGLE_DEG) -> Path:
    """Write the whole generator of ``model`` in ``geometry`` as one TorchScript file (atomically).

    ``sampler`` must be the consistency sampler of a distilled model; ``contract`` one of
    :data:`CONTRACTS`; ``max_points`` the quadruples of the DDML output (header included).
    """
    if not sampler.distilled:
        raise InputError("the TorchScript generator needs a one-step (distilled) checkpoint; this one is sampled "
                         f"with {sampler.kind} ({sampler.steps} steps): distil it first (caloadapt distill)")
    if contract not in CONTRACTS:
        raise InputError(f"unknown contract {contract!r}; expected one of {', '.join(CONTRACTS)}")
    if contract == "ddml" and max_points <= geometry.n_layers:
        raise InputError(f"max_points must exceed the {geometry.n_layers} header entries of {geometry.name!r}")
    path = Path(path)
    output_target(path)  # refuse a directory, a device, a FIFO before the work
    meta = _metadata(model, geometry, sampler, contract, max_points, training or {}, max_energy_mev, max_angle_deg)
    text = json.dumps(meta, sort_keys=True)
    generator = ShowerGenerator(model, geometry, sampler)
    if contract == "ddml":
        wrapper = DDMLPointCloud(generator, text, max_points)
    else:
        wrapper = Par04Mesh(generator, text, max_energy_mev, max_angle_deg)
    scripted = torch.jit.script(wrapper.eval())
    with atomic_path(path) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: text})
    return path


def export_checkpoint_torchscript(checkpoint: str | os.PathLike, path: str | os.PathLike, *,
                                  geometry: Optional[str] = None, contract: str = "ddml",
                                  max_points: int = DDML_MAX_POINTS) -> Tuple[Path, object, Geometry, Sampler]:
    """Export a distilled checkpoint (a path or a shipped model's name); ``geometry`` defaults to the
    checkpoint's own (``generic-mesh`` for the Par04 contract). Returns ``(path, model, geometry, sampler)``."""
    from ..geometry import get_geometry
    from ..models.checkpoint import load_checkpoint, load_model

    payload = load_checkpoint(checkpoint)
    if CONSISTENCY_KEY not in payload:
        raise InputError(f"{checkpoint}: not a one-step (distilled) checkpoint; the TorchScript generator needs one "
                         "(caloadapt distill)")
    model, sampler = load_model(payload, source=str(checkpoint))[:2]
    if geometry is None:
        geometry = "generic-mesh" if contract == "par04" else (payload.get("geometry") or {}).get("name", "ild-ecal")
    target = get_geometry(geometry)
    written = export_torchscript(model.eval(), target, sampler, path, contract=contract, max_points=max_points,
                                 training=_training_range(payload))
    return written, model, target, sampler


def torchscript_metadata(path: str | os.PathLike) -> dict:
    """The metadata an exported file carries (read without running it)."""
    files = {METADATA_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[METADATA_FILE])


def parse_ddml_output(output: np.ndarray, n_layers: int) -> List[np.ndarray]:
    """The points of each layer of a DDML output, read as ``CaloCloudsTwoAngleModel::convertOutput``
    reads them: the header's every 4th entry counts the points, each point goes to the layer its
    third entry names, x and y negated. Returns per layer a ``(n, 4)`` array (x, y, layer, energy)."""
    output = np.asarray(output, np.float32).ravel()
    total = sum(int(output[4 * i]) for i in range(n_layers))
    body = output[4 * n_layers:4 * (n_layers + total)].reshape(-1, 4).astype(np.float64)
    layers: List[List[np.ndarray]] = [[] for _ in range(n_layers)]
    for x, y, layer, energy in body:
        layers[int(layer)].append(np.array([-x, -y, layer, energy]))
    return [np.array(p).reshape(-1, 4) for p in layers]
