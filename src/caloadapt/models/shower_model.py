"""The CaloClouds-II-style shower model: a flow for shower statistics + a point diffusion model.

Generation (arXiv:2309.05704, with the reference's dead post-processing made effective):

1. the flow samples, per shower, the longitudinal development on the fixed X0 grid and the
   centre of gravity; they are integrated over the target geometry's layers into points per
   layer and energy per layer;
2. the point diffusion model samples N = sum of points per layer points (independently given the
   shower condition with the pointwise backbone, jointly with the transformer backbone);
3. points are sorted by generated depth and assigned to layers by those counts, energies in each
   layer are calibrated to the flow's layer energy, the shower is shifted to the flow's centre
   of gravity, and the energies are calibrated once more so that the cells above the readout
   threshold hold the flow's layer energy.

With ``geometry_conditioning`` both the flow and the point network are also told which detector
they simulate, by its descriptor (:func:`caloadapt.geometry.geometry_descriptor`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import Tensor, nn

from .._memory import check_memory
from ..errors import InputError
from ..geometry import Geometry
from ..geometry.descriptor import DESCRIPTOR_DIM, geometry_descriptor
from ..incidence import NORMAL_PHI_DEG, NORMAL_THETA_DEG, check_angles
from ..showers import Showers
from .edm import EDMLoss, EDMPrecond
from .flow import ShowerFlow
from .fused import FusedDenoiser
from .occupancy import OccupancyCalibration
from .pointwise import PointwiseNet
from .representation import (DepthGrid, PointFrame, along_axis, axis_slope, direction_condition, energy_condition,
                             layer_energy_depth_x0, n_statistics, points_condition, shower_depth_condition,
                             statistics_to_layers)
from .sampling import Sampler
from .transformer import PointTransformer

__all__ = ["ModelConfig", "ShowerModel", "BACKBONES", "shower_condition", "flow_condition"]

#: point networks of the diffusion model: per point (CaloClouds II) or attention between points
BACKBONES = ("pointwise", "transformer")
#: index of the depth among the point features (x, y, depth, energy)
DEPTH_FEATURE = 2


#: floats held per generated point (see :meth:`ModelConfig.floats_per_point`)
GENERATION_FLOATS_PER_POINT = 128
#: bytes held per generated shower while the flow samples its layers, before any point exists (measured
#: about 40 KB in ild-ecal, with the shipped model and a tiny one alike)
GENERATION_BYTES_PER_SHOWER = 64 * 1024


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and representation; stored in every checkpoint to rebuild the model.

    Attributes:
        frame: point frame, ``physical`` or ``box`` (see :mod:`caloadapt.models.representation`).
        transverse_scale_rm: r0 of the radial compression of the transverse position in the
            physical frame, r -> r0 asinh(r / r0), in Moliere radii; 0 keeps the linear scale (what
            checkpoints written before the option hold).
        depth_given: generate each point in a known layer: the flow's points per layer fix every
            point's layer before the diffusion, whose depth feature (the layer centre, in X0) is
            then a condition, never noised (:func:`~caloadapt.models.edm.given_scalings`); the
            network generates x, y and energy given the depth (as AllShowers does, arXiv:2601.11716,
            FLC-QU-hep/AllShowers ``generator.py``; docs/fidelity.md). False (and every older
            checkpoint): all four features are generated and points are assigned to layers by their
            generated depth.
        shower_depth_condition: tell the point network the shower's longitudinal centre of gravity
            (energy-weighted mean layer depth in X0; from the flow's layer energies in generation), so
            that a pointwise network can make a late shower narrow at a given depth as the
            simulation does (the radial profile is a function of the depth in units of the shower's
            own depth scale, tau = t / T: GFlash, Grindhammer and Peters, hep-ex/0001020; without it
            the core radius of generated showers follows the longitudinal profile the wrong way,
            docs/fidelity.md). False (and every older checkpoint): energy and points only.
        angle_conditioning: tell the flow and the point network the incidence direction ((d_x, d_y)
            of the particle's unit direction in the shower frame, as CaloClouds-3 conditions on the
            local direction, arXiv:2511.01460; docs/inclined.md). Whatever this setting, points and
            the centre of gravity are taken about the shower's axis, so the shift of an inclined
            shower from layer to layer is applied, not learnt. False (and every older checkpoint):
            the model generates normal incidence only.
        hits_as_spots: train on cell-level hits split into spot-like points
            (:func:`~caloadapt.models.representation.hits_as_spots`): each hit becomes as many points,
            sharing its energy and spread inside its cell, as the GFlash spot count of its detector gives
            its share of the shower energy, so that a model pre-trained on spots adapts to hits in the
            representation it knows (docs/fidelity.md, "Adapting a spot model to hits"). False (and
            every older checkpoint): one point per hit.
        backbone: point network, ``pointwise`` (CaloClouds II PointWise-Net) or ``transformer``
            (:class:`~caloadapt.models.transformer.PointTransformer`).
        geometry_conditioning: append the detector descriptor
            (:func:`~caloadapt.geometry.geometry_descriptor`) to the conditioning of the flow and of
            the point network; False is the single-detector model (and what older checkpoints hold).
        grid_step_x0, grid_depth_x0: the flow's longitudinal grid in radiation lengths.
        widths: hidden widths of the pointwise network (CaloClouds II: 128, 256, 512, 256, 128).
        time_dim: size of the noise-level embedding.
        transformer_dim, transformer_depth, transformer_heads, transformer_inducing: width, blocks,
            attention heads and inducing tokens of the transformer backbone.
        flow_hidden, flow_transforms, flow_bins: coupling hyper-network widths, number of
            coupling transforms and spline bins of the flow.
        sigma_data, P_mean, P_std: EDM data scale and log-normal training noise (Karras et al. 2022).
    """

    frame: str = "physical"
    transverse_scale_rm: float = 0.0
    depth_given: bool = False
    shower_depth_condition: bool = False
    angle_conditioning: bool = False
    hits_as_spots: bool = False
    backbone: str = "pointwise"
    geometry_conditioning: bool = False
    grid_step_x0: float = 0.5
    grid_depth_x0: float = 40.0
    widths: tuple[int, ...] = (128, 256, 512, 256, 128)
    time_dim: int = 64
    transformer_dim: int = 64
    transformer_depth: int = 4
    transformer_heads: int = 4
    transformer_inducing: int = 16
    flow_hidden: tuple[int, ...] = (128, 128)
    flow_transforms: int = 6
    flow_bins: int = 8
    sigma_data: float = 0.5
    P_mean: float = -1.2  # noqa: N815 (paper symbol)
    P_std: float = 1.2  # noqa: N815

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {', '.join(BACKBONES)}")
        if not (isinstance(self.transverse_scale_rm, (int, float)) and 0 <= self.transverse_scale_rm < math.inf):
            raise ValueError(f"transverse_scale_rm must be a finite number >= 0, got {self.transverse_scale_rm!r}")

    @property
    def condition_dim(self) -> int:
        """Width of the point network's shower condition: energy, points (+ shower depth, + the
        incidence direction, + the detector descriptor)."""
        return (2 + self.shower_depth_condition + 2 * self.angle_conditioning
                + (DESCRIPTOR_DIM if self.geometry_conditioning else 0))

    @property
    def flow_condition_dim(self) -> int:
        """Width of the flow's condition (:func:`flow_condition`): energy (+ the incidence direction, + the
        detector descriptor)."""
        return self.condition_dim - 1 - self.shower_depth_condition

    def floats_per_point(self, training: bool = True) -> int:
        """About the floats held per point: in a training step, the point network's activations kept for the
        backward pass and their gradients (measured 3.5 per unit of the summed pointwise widths); in
        generation, the sampler's copies of the points, the network working through them in chunks
        (:class:`~caloadapt.models.fused.FusedDenoiser`; measured 60 to 130 with the shipped model)."""
        if not training:
            return GENERATION_FLOATS_PER_POINT
        if self.backbone == "pointwise":
            return 4 * sum(self.widths)
        return 4 * self.transformer_depth * (4 * self.transformer_dim + self.transformer_heads
                                             * self.transformer_inducing)

    @property
    def grid(self) -> DepthGrid:
        return DepthGrid(self.grid_step_x0, self.grid_depth_x0)

    def point_frame(self, geometry: Geometry) -> PointFrame:
        """The map between points of ``geometry`` and this model's point features."""
        return PointFrame(geometry, self.frame, self.transverse_scale_rm, layer_depth=self.depth_given)

    @property
    def given_channels(self) -> tuple[int, ...]:
        """Point features that are conditions of the diffusion, not generated (the depth, 2)."""
        return (DEPTH_FEATURE,) if self.depth_given else ()


def shower_condition(incident_energy_mev: np.ndarray, n_points: np.ndarray, geometry: Geometry,
                     config: ModelConfig, shower_depth_x0: np.ndarray | None = None,
                     angles_deg: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``(N, C)`` condition of the point network: energy, points (+ the shower's depth in X0, a
    placeholder 0 when not given, + the incidence direction of ``angles_deg`` = (theta, phi), normal
    incidence when not given, + the descriptor of ``geometry``), as ``config`` asks."""
    columns = [energy_condition(incident_energy_mev)[:, None], points_condition(n_points)[:, None]]
    n = len(columns[0])
    if config.shower_depth_condition:
        depth = np.zeros(n) if shower_depth_x0 is None else shower_depth_x0
        columns.append(shower_depth_condition(depth)[:, None])
    if config.angle_conditioning:
        columns.append(np.zeros((n, 2)) if angles_deg is None else direction_condition(geometry, *angles_deg))
    if config.geometry_conditioning:
        columns.append(np.broadcast_to(geometry_descriptor(geometry), (len(columns[0]), DESCRIPTOR_DIM)))
    return np.concatenate(columns, axis=1)


def flow_condition(condition: Tensor, config: ModelConfig) -> Tensor:
    """The flow's condition: the energy (+ direction, + descriptor) columns of the point network's condition.

    The flow predicts the number of points and the layer energies (hence the shower's depth), so
    it must not be told them.
    """
    return torch.cat([condition[:, :1], condition[:, 2 + config.shower_depth_condition:]], dim=1)


def _backbone(config: ModelConfig) -> nn.Module:
    if config.backbone == "transformer":
        return PointTransformer(point_dim=4, context_dim=config.condition_dim, dim=config.transformer_dim,
                                depth=config.transformer_depth, heads=config.transformer_heads,
                                n_inducing=config.transformer_inducing, time_dim=config.time_dim)
    return PointwiseNet(point_dim=4, context_dim=config.condition_dim, widths=config.widths, time_dim=config.time_dim)


class ShowerModel(nn.Module):
    """Shower flow + EDM point diffusion, with frozen feature normalisation as buffers."""

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        n_stats = n_statistics(config.grid)
        self.flow = ShowerFlow(n_stats, context_dim=config.flow_condition_dim, hidden=config.flow_hidden,
                               transforms=config.flow_transforms, bins=config.flow_bins)
        self.denoiser = EDMPrecond(_backbone(config), sigma_data=config.sigma_data,
                                   given_channels=config.given_channels)
        self.diffusion_loss = EDMLoss(config.P_mean, config.P_std, config.sigma_data)
        # normalisation of features, fixed from the pre-training data and never changed afterwards
        self.register_buffer("point_mean", torch.zeros(4))
        self.register_buffer("point_std", torch.ones(4))
        self.register_buffer("stats_mean", torch.zeros(n_stats))
        self.register_buffer("stats_std", torch.ones(n_stats))
        #: occupancy calibration per geometry name, fitted after training (stored in checkpoints)
        self.occupancy: dict[str, OccupancyCalibration] = {}

    @property
    def net(self) -> PointwiseNet | PointTransformer:
        """The point network inside the EDM preconditioning (registered once, as ``denoiser.net``)."""
        return self.denoiser.net

    # -- normalisation -----------------------------------------------------------------------
    def set_normalisation(self, point_features: np.ndarray, statistics: np.ndarray) -> None:
        """Fix the feature standardisation from (pre-training) data: mean and std per feature.

        The point scale is set so each feature has standard deviation ``sigma_data``.
        """
        point_std = point_features.std(axis=0) / self.config.sigma_data
        stats_std = statistics.std(axis=0)
        self.point_mean.copy_(torch.as_tensor(point_features.mean(axis=0)))
        self.point_std.copy_(torch.as_tensor(np.maximum(point_std, 1e-6)))
        self.stats_mean.copy_(torch.as_tensor(statistics.mean(axis=0)))
        self.stats_std.copy_(torch.as_tensor(np.maximum(stats_std, 1e-3)))

    # -- training ----------------------------------------------------------------------------
    def forward(self, points: Tensor, mask: Tensor, condition: Tensor, statistics: Tensor,
                generator: torch.Generator | None = None, *, diffusion: bool = True) -> dict[str, Tensor]:
        """Training losses of one batch.

        Arguments:
            points: ``(B, M, 4)`` point features (un-normalised), padded.
            mask: ``(B, M)`` True for real points.
            condition: ``(B, C)`` energy and points conditions (+ detector descriptor), as built by
                :func:`shower_condition`.
            statistics: ``(B, S)`` flow inputs (un-normalised).
            generator: torch RNG for the noise draws.
            diffusion: also the point network's loss (False: the flow's alone, e.g. to train the flow
                by itself through a distributed wrapper, which sees only ``forward``).

        Returns:
            ``diffusion``: masked EDM loss; ``flow``: negative log-likelihood per statistic.
        """
        if not diffusion:
            return {"flow": self.flow_loss(condition, statistics)}
        x = (points - self.point_mean) / self.point_std
        diffusion = self.diffusion_loss(self.denoiser, x, condition, mask, generator)
        return {"diffusion": diffusion, "flow": self.flow_loss(condition, statistics)}

    def flow_loss(self, condition: Tensor, statistics: Tensor) -> Tensor:
        """The flow's negative log-likelihood per statistic of one batch (``forward``'s ``flow``)."""
        s = (statistics - self.stats_mean) / self.stats_std
        return -self.flow.log_prob(s, flow_condition(condition, self.config)).mean() / s.shape[1]

    # -- generation --------------------------------------------------------------------------
    def _sample_layers(self, geometry: Geometry, energy: np.ndarray, generator: torch.Generator | None,
                       angles_deg: tuple[np.ndarray, np.ndarray] | None = None
                       ) -> tuple[Tensor, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The point network's condition (its points column still a placeholder) and the flow's
        hits per layer, cell energy per layer and centre of gravity (:func:`statistics_to_layers`)."""
        condition = torch.as_tensor(shower_condition(energy, np.ones_like(energy), geometry, self.config,
                                                     angles_deg=angles_deg),
                                    dtype=torch.float32, device=self.point_mean.device)
        stats = self.flow.sample(flow_condition(condition, self.config), generator=generator)
        stats = stats * self.stats_std + self.stats_mean
        return condition, statistics_to_layers(geometry, stats.double().cpu().numpy(), energy, self.config.grid)

    @torch.no_grad()
    def generate(self, geometry: Geometry, incident_energy_mev: np.ndarray, sampler: Sampler = Sampler(), *,
                 generator: torch.Generator | None = None, particle: str = "electron", max_points: int = 40_000,
                 occupancy: OccupancyCalibration | None | str = "auto", denoiser: nn.Module | None = None,
                 theta_deg: np.ndarray | float | None = None, phi_deg: np.ndarray | float | None = None,
                 digitise: bool = False) -> Showers:
        """Generate one batch of showers in ``geometry`` (points at layer centres, cell energies MeV).

        Arguments:
            theta_deg, phi_deg: incidence angles per shower (or one for all; docs/inclined.md), normal
                incidence when not given; the showers carry them. Only a model trained with
                ``angle_conditioning`` generates other angles.
            sampler: how the point cloud is sampled (a checkpoint's own comes with
                :func:`caloadapt.models.checkpoint.load_model`; a distilled model needs its
                consistency sampler).
            occupancy: ``auto`` applies the model's calibration for ``geometry`` (if it has one),
                None generates as many points as the flow asks for hits, or give a calibration.
            denoiser: evaluate this module instead of the model's own (e.g. an ONNX session,
                :class:`caloadapt.export.onnx.OnnxDenoiser`).
            digitise: return the hits, what ``geometry.digitise`` makes of the points (the points
                are grouped into cells once, for the last calibration and the hits alike).
        """
        device = self.point_mean.device
        energy = np.asarray(incident_energy_mev, np.float64)
        check_memory(len(energy) * GENERATION_BYTES_PER_SHOWER, f"a generation batch of {len(energy):,} showers",
                     "lower --batch-size", per_item_bytes=GENERATION_BYTES_PER_SHOWER, items="showers per batch")
        angles, meta = self._incidence(geometry, len(energy), theta_deg, phi_deg)
        condition, (hits, layer_energy, cog) = self._sample_layers(geometry, energy, generator, angles)
        calibration = self.occupancy.get(geometry.name) if occupancy == "auto" else occupancy
        if calibration is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device
                                     if generator is not None else "cpu"))
            counts = calibration.points_for_hits(hits, np.random.default_rng(seed))
        else:
            counts = hits
        counts = np.minimum(counts, max_points // geometry.n_layers + 1)
        n_points = counts.sum(axis=1)
        width = int(n_points.max(initial=0))
        per_shower = 4 * self.config.floats_per_point(training=False) * width  # float32
        check_memory(len(energy) * per_shower, f"a generation batch of {len(energy):,} showers of up to {width:,} "
                     "points", "lower --batch-size", per_item_bytes=per_shower, items="showers per batch")
        if width == 0:
            empty = Showers.from_counts(np.zeros((0, 4)), n_points, energy, particle=particle, geometry=geometry.name,
                                        meta=meta)
            return geometry.digitise(empty) if digitise else empty
        mask = torch.arange(width, device=device)[None, :] < torch.as_tensor(n_points, device=device)[:, None]
        # the network is told the hits the shower is to have (what N meant in training), not the points
        condition[:, 1] = torch.as_tensor(points_condition(hits.sum(axis=1)), dtype=torch.float32, device=device)
        if self.config.shower_depth_condition:
            depth = shower_depth_condition(layer_energy_depth_x0(geometry, layer_energy))
            condition[:, 2] = torch.as_tensor(depth, dtype=torch.float32, device=device)
        # points of shower i fill its layers in order: counts[i, 0] in layer 0, then layer 1, ...
        layer = np.repeat(np.tile(np.arange(geometry.n_layers), len(energy)), counts.ravel())
        sizes = n_points.tolist()
        given = self._given_depth(geometry, layer, sizes, width) if self.config.depth_given else None
        # the fused wrapper computes each shower's gates once and skips padding: same values, faster
        network = FusedDenoiser(self.denoiser if denoiser is None else denoiser)
        x = sampler(network, condition, mask, generator=generator, given=given)
        features = (x * self.point_std + self.point_mean)
        # sort real points by generated depth (padding last), then assign layers by the flow's counts;
        # a given depth is the layer's, already in that order
        if given is None:
            depth = torch.where(mask, features[..., 2], torch.full_like(features[..., 2], float("inf")))
            order = depth.argsort(dim=1)
            features = torch.gather(features, 1, order[..., None].expand(-1, -1, 4))
        # the mask is a prefix: the first n_i (sorted) points, taken as slices (a boolean mask costs ten times
        # more on the CPU); column-major (P, 4), as to_points fills its points
        flat = torch.cat([features[i, :k] for i, k in enumerate(sizes)]).cpu().numpy().astype(np.float64, order="F")
        shower = np.repeat(np.arange(len(energy)), n_points)
        points = self.config.point_frame(geometry).to_points(flat, layer, energy[shower])
        _scale_layers(points[:, 3], shower * geometry.n_layers + layer, layer_energy)
        _shift_centre_of_gravity(points, shower, layer, cog, geometry)
        if angles is not None:  # about the axis so far: onto the inclined axis
            points = along_axis(points, axis_slope(geometry, *angles)[shower])
        # last, once the points sit where they stay: the cells that will be read out carry the energy
        inside, keys, inverse = geometry.group_into_cells(points, shower)
        cell_energy = np.bincount(inverse, points[inside, 3], len(keys))
        factor = _visible_cell_scale(geometry, keys, cell_energy, layer_energy)
        if digitise:  # the cells are grouped already: no second grouping in geometry.digitise
            missed = ~inside
            outside = np.bincount(shower[missed], points[missed, 3], len(energy))
            return geometry.hits_from_cells(keys, cell_energy * factor, energy, particle,
                                            {**meta, "outside_energy_mev": outside})
        points[inside, 3] *= factor[inverse]
        return Showers.from_counts(points, n_points, energy, particle=particle, geometry=geometry.name, meta=meta)

    def _incidence(self, geometry: Geometry, n: int, theta_deg, phi_deg
                   ) -> tuple[tuple[np.ndarray, np.ndarray] | None, dict[str, np.ndarray]]:
        """Checked ``(theta, phi)`` arrays of ``n`` showers (None at normal incidence) and the showers' meta."""
        if theta_deg is None and phi_deg is None:
            return None, {}
        theta, phi = check_angles(NORMAL_THETA_DEG if theta_deg is None else theta_deg,
                                  NORMAL_PHI_DEG if phi_deg is None else phi_deg, geometry.barrel_sides)
        theta, phi = (np.array(np.broadcast_to(a, (n,))) for a in (theta, phi))
        if not self.config.angle_conditioning and np.any(direction_condition(geometry, theta, phi)):
            raise InputError("this model was trained without angle conditioning and generates normal incidence "
                             "only (theta = phi = 90 degrees); pre-train with --angle-conditioning on inclined showers")
        return (theta, phi), {"theta_deg": theta, "phi_deg": phi}

    def _given_depth(self, geometry: Geometry, layer: np.ndarray, sizes: list[int], width: int) -> Tensor:
        """``(B, width, 4)`` normalised given features: each real point's layer depth (the first ``sizes[i]``
        points of shower ``i``), NaN elsewhere."""
        device = self.point_mean.device
        depth = self.config.point_frame(geometry).depth_x0(layer)
        normalised = (torch.as_tensor(depth, dtype=torch.float32, device=device) - self.point_mean[DEPTH_FEATURE]
                      ) / self.point_std[DEPTH_FEATURE]
        given = torch.full((len(sizes), width, 4), float("nan"), dtype=torch.float32, device=device)
        given[..., DEPTH_FEATURE] = torch.nn.utils.rnn.pad_sequence(normalised.split(sizes), batch_first=True,
                                                                    padding_value=float("nan"))
        return given


def _layer_scale(shower_layer: np.ndarray, energy: np.ndarray, layer_energy: np.ndarray) -> np.ndarray:
    """``(N * L,)`` factors that make the ``energy`` of each (shower, layer) (``shower_layer`` is
    ``shower * L + layer``) the flow's ``layer_energy`` (N, L); 1 where nothing is held."""
    target = layer_energy.ravel()
    held = np.bincount(shower_layer, energy, minlength=target.size)
    return np.divide(target, held, out=np.ones_like(target), where=held > 0)


def _scale_layers(energy: np.ndarray, shower_layer: np.ndarray, layer_energy: np.ndarray) -> None:
    """Scale the points' ``energy`` (in place) so each (shower, layer) holds the flow's layer energy."""
    energy *= _layer_scale(shower_layer, energy, layer_energy)[shower_layer]


def _visible_cell_scale(geometry: Geometry, keys: np.ndarray, cell_energy: np.ndarray,
                        layer_energy: np.ndarray) -> np.ndarray:
    """The factor of each cell (``keys`` and energies of :meth:`Geometry.group_into_cells`) that makes
    the cells at or above the readout threshold of each (shower, layer) hold the flow's layer energy.

    The flow's layer energy is what such cells held in the training hits, and the cells below
    threshold vanish on digitisation (about 1 % of the energy once the occupancy calibration has
    spread it over more points): those keep their energy (factor 1).
    """
    visible = cell_energy >= geometry.energy.threshold_mev
    cell_shower, cell = np.divmod(keys, geometry.n_cells)
    shower_layer = cell_shower * geometry.n_layers + geometry.cell_layer[cell]
    scale = _layer_scale(shower_layer[visible], cell_energy[visible], layer_energy)
    return np.where(visible, scale[shower_layer], 1.0)


def _shift_centre_of_gravity(points: np.ndarray, shower: np.ndarray, layer: np.ndarray, cog: np.ndarray,
                             geometry: Geometry) -> None:
    """Shift showers transversally so their energy-weighted centre (Moliere units) is the flow's.

    The centre is that of the points within the readout's reach, as the flow learnt it from showers
    that were read out: a stray point far outside would otherwise drag the whole shower after it.
    """
    n = len(cog)
    rm = geometry.layer_moliere_radius_mm[layer]
    x, y = points[:, 0], points[:, 1]  # views: shifted in place
    weight = np.where(x * x + y * y <= geometry.readout.max_radius_mm ** 2, points[:, 3], 0.0)
    total = np.maximum(np.bincount(shower, weight, n), 1e-12)
    weight /= rm  # each point's coordinate in Moliere radii, weighted
    for k, coordinate in enumerate((x, y)):
        current = np.bincount(shower, weight * coordinate, n) / total
        coordinate += (cog[:, k] - current)[shower] * rm
