"""Vectorised GFlash shower generation in any geometry (simulator reference §4.3-4.6, §6).

Showers develop in radiation lengths on a common grid of 0.1 X0 steps from the calorimeter front;
each step's energy is fluctuated (sampling term), turned into visible energy with the visible
fraction of the readout layer it falls in, and split into spots. Spots are placed with the
two-component radial law and digitised into the geometry's cells.

An inclined particle (docs/inclined.md) develops the same GFlash shower along its own axis: the
profile runs in the X0 traversed along the axis (the normal depth in X0 divided by cos(inclination)),
the radial spread lies in the plane perpendicular to the axis, and each spot is placed in the
detector frame, where it lands in the layer and cell that contain it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammainc

from ..showers import Showers
from ..errors import InputError
from ..geometry import Geometry
from ..incidence import (NORMAL_PHI_DEG, NORMAL_THETA_DEG, check_angles, local_direction, to_particle_frame,
                         transverse_basis)
from . import gflash

__all__ = ["SimulationSettings", "simulate_chunk", "gflash_medium", "STEP_X0"]

#: longitudinal step in radiation lengths, Geant4 GFlash ``StepInX0`` default (reference §4.3)
STEP_X0 = 0.1


@dataclass(frozen=True)
class SimulationSettings:
    """Options of the simulator.

    Attributes:
        mode: ``"B"`` (fine-grained silicon readout: spots of about ``kappa`` mip with Landau-like
            energies, reference §4.5) or ``"A"`` (GFlash-faithful equal-energy spots, §4.3).
        photon_pair_split: photons convert into two electron showers sharing the energy by the
            Bethe-Heitler law (True), or into one electron shower of the full energy (False).
        fluctuations: apply the sampling fluctuation and the shower-to-shower profile fluctuation.
    """

    mode: str = "B"
    photon_pair_split: bool = True
    fluctuations: bool = True

    def __post_init__(self) -> None:
        if self.mode not in {"A", "B"}:
            raise InputError(f"unknown simulator mode {self.mode!r}; expected 'A' or 'B'")


def gflash_medium(geometry: Geometry) -> gflash.GFlashMedium:
    """The GFlash parameters of the geometry's shape medium."""
    m = geometry.shape_medium
    return gflash.GFlashMedium(z_eff=m.z_eff, critical_energy_mev=m.critical_energy_mev,
                               sampling_frequency=m.sampling_frequency if m.is_sampling else None,
                               e_over_mip=m.e_over_mip)


@dataclass(frozen=True)
class StepGrid:
    """The common longitudinal grid of one geometry: step edges and per-step readout constants."""

    edges_x0: np.ndarray          # (S + 1,)
    visible_fraction: np.ndarray  # (S,) visible / deposited energy of the layer at the step middle
    moliere_radius_mm: np.ndarray  # (S,)

    @classmethod
    def of(cls, geometry: Geometry, step_x0: float = STEP_X0) -> StepGrid:
        """The grid of steps of ``step_x0`` radiation lengths of depth along the layer normal."""
        depth_x0 = geometry.stack.depth_x0
        edges = np.append(np.arange(0.0, depth_x0, step_x0), depth_x0)
        middle_mm = geometry.stack.depth_mm_at(0.5 * (edges[1:] + edges[:-1]))
        layer = geometry.layer_index(middle_mm)
        inside = layer >= 0
        f_vis = np.where(inside, geometry.layer_visible_fraction[np.maximum(layer, 0)], 0.0)
        # outside the readout layers keep the nearest layer's Moliere radius (spots there are dropped)
        rm = geometry.layer_moliere_radius_mm[np.clip(layer, 0, None)]
        rm = np.where(inside | (middle_mm < geometry.layer_edges_mm[0]), rm, geometry.layer_moliere_radius_mm[-1])
        return cls(edges, f_vis, rm)


def _sub_showers(particle: str, energy_gev: np.ndarray, settings: SimulationSettings,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Electron sub-showers: (energy GeV, start depth X0, parent index), parent-major order."""
    n = len(energy_gev)
    parent = np.arange(n)
    if particle in ("electron", "positron"):
        return energy_gev, np.zeros(n), parent
    # photons: conversion after an exponential depth, then an e+e- pair (reference §2.7)
    start = gflash.draw_conversion_depth(n, rng)
    if not settings.photon_pair_split:
        return energy_gev, start, parent
    fraction = gflash.draw_pair_fraction(n, rng)
    energy = np.stack([fraction * energy_gev, (1 - fraction) * energy_gev], axis=1).ravel()
    return energy, np.repeat(start, 2), np.repeat(parent, 2)


def _carry_forward(visible: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Energy of each step with spots, including the energy of the empty steps before it.

    Steps without spots pass their energy on to the next step that has spots (reference §4.3);
    the last step with energy always gets at least one spot, so no energy is lost.
    """
    n_steps = visible.shape[1]
    last = n_steps - 1 - np.argmax(visible[:, ::-1] > 0, axis=1)
    has_energy = visible.max(axis=1, initial=0) > 0
    rows = np.flatnonzero(has_energy)
    counts[rows, last[rows]] = np.maximum(counts[rows, last[rows]], 1)
    cumulative = np.cumsum(visible, axis=1)
    with_spots = counts > 0
    last_with_spots = np.maximum.accumulate(np.where(with_spots, np.arange(n_steps), -1), axis=1)
    previous = np.concatenate([np.full((len(visible), 1), -1), last_with_spots[:, :-1]], axis=1)
    before = np.where(previous >= 0, np.take_along_axis(cumulative, np.maximum(previous, 0), axis=1), 0.0)
    return np.where(with_spots, cumulative - before, 0.0)


def _landing_correction(geometry: Geometry, axis_depth_mm: np.ndarray, spot_depth_mm: np.ndarray) -> np.ndarray:
    """Visible fraction of the layer a spot lands in over that of the layer of its axis point.

    Steps take the visible fraction of the layer on the shower axis; an inclined shower's lateral
    spread reaches other depths, so a spot landing in another readout layer (another sampling
    fraction, e.g. across the ILD stack boundary) carries that layer's. 1 where either depth is
    outside the readout layers or has no visible energy, and exactly 1 at normal incidence.
    """
    spot_layer = geometry.layer_index(spot_depth_mm)
    axis_layer = geometry.layer_index(axis_depth_mm)
    f_vis = geometry.layer_visible_fraction
    f_spot = f_vis[np.maximum(spot_layer, 0)]
    f_axis = f_vis[np.maximum(axis_layer, 0)]
    usable = (spot_layer >= 0) & (axis_layer >= 0) & (f_axis > 0)
    return np.where(usable, f_spot / np.where(usable, f_axis, 1.0), 1.0)


def simulate_chunk(geometry: Geometry, particle: str, incident_energy_mev: np.ndarray,
                   rng: np.random.Generator, settings: SimulationSettings = SimulationSettings(),
                   grid: StepGrid | None = None, theta_deg: np.ndarray | float = NORMAL_THETA_DEG,
                   phi_deg: np.ndarray | float = NORMAL_PHI_DEG) -> Showers:
    """Spots of a batch of showers: points (x, y, z mm, visible energy in readout MeV).

    ``theta_deg``, ``phi_deg`` (one value or one per shower) give the incidence direction in the
    barrel convention of docs/inclined.md; the default is normal incidence.

    ``meta`` holds per shower ``deposited_energy_mev`` (all material), ``visible_energy_mev``
    (silicon, before readout calibration), ``leaked_energy_mev`` (behind the detector, along
    the axis) and the angles ``theta_deg``, ``phi_deg``.
    """
    n_showers = len(incident_energy_mev)
    theta, phi = check_angles(np.broadcast_to(theta_deg, (n_showers,)), np.broadcast_to(phi_deg, (n_showers,)),
                              geometry.barrel_sides)
    direction = local_direction(theta, phi, geometry.barrel_sides)
    cos_incl = direction[:, 2]
    # steps of at most STEP_X0 along every axis: the depth grid is refined by the largest
    # inclination of the chunk (at normal incidence it is the grid of STEP_X0 itself)
    step_x0 = STEP_X0 * float(cos_incl.min(initial=1.0))
    if grid is None or step_x0 < STEP_X0:
        grid = StepGrid.of(geometry, step_x0)
    medium = gflash_medium(geometry)
    c = geometry.shower.sampling_term
    energy_gev, start_x0, parent = _sub_showers(particle, incident_energy_mev / 1000.0, settings, rng)
    cos_sub = cos_incl[parent]

    # longitudinal profile per sub-shower (reference §2.5), integrated over the steps (§4.3 step 1)
    if settings.fluctuations:
        t_max, alpha, beta = gflash.draw_profiles(medium, energy_gev, rng)
    else:
        t_max, alpha = gflash.average_profile(medium, energy_gev)
        alpha = np.maximum(alpha, 1.1)
        t_max = np.maximum(t_max, 0.1)
        beta = (alpha - 1) / t_max
    # X0 along the axis from the shower start: the axis crosses depth t (X0 along the normal) after t / cos
    local_edges = np.clip(grid.edges_x0[None, :] / cos_sub[:, None] - start_x0[:, None], 0.0, None)
    profile_cdf = gammainc(alpha[:, None], beta[:, None] * local_edges)
    deposited_gev = energy_gev[:, None] * np.diff(profile_cdf, axis=1)
    if settings.fluctuations and medium.is_sampling:
        deposited_gev = gflash.fluctuate_sampling(deposited_gev, c, rng)
    visible_mev = 1000.0 * deposited_gev * grid.visible_fraction[None, :]

    # spots per step (reference §4.3 step 3 for mode A, §4.5 for mode B), then carry-forward
    if settings.mode == "A":
        alpha_spot, beta_spot = gflash.spot_profile(medium, energy_gev)
        spot_cdf = gammainc(alpha_spot[:, None], beta_spot[:, None] * local_edges)
        expected = gflash.spot_count(medium, energy_gev, c)[:, None] * np.diff(spot_cdf, axis=1)
    else:
        expected = visible_mev / (geometry.shower.kappa * geometry.stack.sensor_mip_mev)
    counts = rng.poisson(expected)
    counts[visible_mev <= 0] = 0
    step_visible = _carry_forward(visible_mev, counts)

    # expand to spots: (sub-shower, step) of each spot, row-major so spots stay grouped by parent
    n_steps = visible_mev.shape[1]
    cell = np.repeat(np.arange(counts.size), counts.ravel())
    sub, step = np.divmod(cell, n_steps)
    n_spots = len(cell)
    if settings.mode == "A":
        spot_visible = (step_visible.ravel() / np.maximum(counts.ravel(), 1))[cell]
    else:
        weight = gflash.draw_moyal_weights(n_spots, geometry.shower.moyal_sigma, rng)
        weight_sum = np.bincount(cell, weights=weight, minlength=counts.size)
        spot_visible = step_visible.ravel()[cell] * weight / weight_sum[cell]

    # depth uniform inside the part of the step after the shower start (reference §4.3 step 6),
    # in X0 along the normal: the start lies start_x0 along the axis, start_x0 * cos deep
    lo = np.maximum(grid.edges_x0[step], start_x0[sub] * cos_sub[sub])
    depth_x0 = lo + rng.random(n_spots) * (grid.edges_x0[step + 1] - lo)
    # radial law evaluated once per step, at its middle (reference §3.3: difference negligible)
    middle = 0.5 * (local_edges[:, 1:] + local_edges[:, :-1])
    moments = gflash.individual_profile_moments(medium, energy_gev)
    tau = gflash.radial_tau(np.maximum(middle, 1e-3), t_max[:, None], alpha[:, None],
                            np.broadcast_to(moments.mean_ln_alpha, energy_gev.shape)[:, None])
    core, tail, core_weight = gflash.radial_parameters(medium, energy_gev[:, None], tau)
    radius_mm = gflash.draw_radius(core.ravel()[cell], tail.ravel()[cell], core_weight.ravel()[cell], rng) \
        * grid.moliere_radius_mm[step]
    spot_phi = rng.random(n_spots) * (2 * np.pi)
    # axis point at that depth, then the radial offset perpendicular to the axis (reference §4.3 step 7)
    axis_depth_mm = geometry.stack.depth_mm_at(depth_x0)
    spot_direction = direction[parent[sub]]
    u, v = transverse_basis(spot_direction)
    offset_u, offset_v = radius_mm * np.cos(spot_phi), radius_mm * np.sin(spot_phi)
    position = (axis_depth_mm / spot_direction[:, 2])[:, None] * spot_direction \
        + offset_u[:, None] * u + offset_v[:, None] * v
    position[:, 2] = axis_depth_mm + offset_u * u[:, 2]  # exact depth of the axis point (no / cos * cos)
    spot_visible = spot_visible * _landing_correction(geometry, axis_depth_mm, position[:, 2])
    if geometry.readout.along_particle:  # a mesh along the particle reads the shower in the particle's frame
        position = to_particle_frame(position, spot_direction)
    points = np.concatenate([position, (spot_visible * geometry.energy.calibration)[:, None]], axis=1)

    spots_per_shower = np.bincount(parent[sub], minlength=n_showers)
    deposited = 1000.0 * np.bincount(parent, weights=energy_gev * profile_cdf[:, -1], minlength=n_showers)
    meta = {
        "deposited_energy_mev": deposited,
        "visible_energy_mev": np.bincount(parent[sub], weights=spot_visible, minlength=n_showers),
        "leaked_energy_mev": incident_energy_mev - deposited,
        "theta_deg": theta,
        "phi_deg": phi,
    }
    return Showers.from_counts(points, spots_per_shower, incident_energy_mev, particle=particle,
                               geometry=geometry.name, meta=meta)

