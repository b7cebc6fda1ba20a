"""Inclined incidence: the angle convention and the geometry of inclined showers (docs/inclined.md)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy.special import gammainc

from caloadapt.errors import InputError
from caloadapt.geometry import geometry_from_spec, get_geometry
from conftest import deep_pbwo4
from caloadapt.incidence import (MAX_INCLINATION_DEG, angles_from_local_direction, check_angles, inclination_deg,
                                 local_direction)
from caloadapt.showers import Showers
from caloadapt.simulate import SimulationSettings, gflash, simulate, simulate_chunk
from caloadapt.simulate.engine import _landing_correction, gflash_medium

NO_FLUCTUATIONS = SimulationSettings(fluctuations=False)


@pytest.fixture(scope="module")
def deep_crystal():
    """Homogeneous PbWO4, 60 X0 deep and 40 R_M wide: depth in mm is proportional to X0, nothing leaks."""
    return deep_pbwo4("deep-crystal-inclined", {"kind": "planar", "pitch_mm": 10.0, "n_x": 81, "n_y": 81})


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    return float(np.sum(values * weights) / np.sum(weights))


# -- the convention -------------------------------------------------------------------------------
def test_normal_incidence_is_exactly_along_the_depth_axis():
    np.testing.assert_array_equal(local_direction(90.0, 90.0), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(local_direction(90.0, 45.0, barrel_sides=8), [0.0, 0.0, 1.0])  # a face normal
    assert inclination_deg(90.0, 90.0) == 0.0


def test_direction_follows_theta_along_the_beam_and_phi_across_the_face():
    theta, phi = np.array([50.0, 90.0, 130.0, 70.0]), np.array([90.0, 110.0, 80.0, 100.0])
    d = local_direction(theta, phi, barrel_sides=8)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0)
    assert np.all(d[:, 2] > 0)  # always into the front face
    np.testing.assert_allclose(d[:, 1], np.cos(np.radians(theta)), atol=1e-15)  # y: the beam axis
    # the azimuth tilts the direction only relative to the face normal: across the face (x)
    assert d[1, 0] == pytest.approx(-np.sin(np.radians(20.0)))
    # a cylinder always faces the particle's azimuth: phi does not tilt it
    np.testing.assert_allclose(local_direction(theta, phi, barrel_sides=0)[:, 0], 0.0, atol=1e-15)
    back_theta, back_phi = angles_from_local_direction(d)
    np.testing.assert_allclose(back_theta, theta)
    np.testing.assert_allclose(back_phi, phi)  # these phi lie within the face of the top module


@pytest.mark.parametrize("theta, phi, message", [
    (0.0, 90.0, "strictly between 0 and 180"), (180.0, 90.0, "strictly between 0 and 180"),
    (-20.0, 90.0, "strictly between 0 and 180"), (5.0, 90.0, "at most"), (np.nan, 90.0, "finite"),
    (90.0, np.inf, "finite"),
])
def test_angles_that_never_enter_through_the_front_are_refused(theta, phi, message):
    with pytest.raises(InputError, match=message):
        check_angles(theta, phi)
    with pytest.raises(InputError, match=message):
        simulate("ild-ecal", "photon", np.array([10e3]), theta_deg=theta, phi_deg=phi, seed=1)


def test_every_barrel_angle_enters_through_the_front_face():
    theta, phi = np.meshgrid(np.linspace(11, 169, 80), np.linspace(-360, 720, 200))
    for sides in (0, 8, 12):
        check_angles(theta, phi, sides)  # accepted
        assert np.all(local_direction(theta, phi, sides)[..., 2] >= np.cos(np.radians(MAX_INCLINATION_DEG)))


# -- normal incidence unchanged -------------------------------------------------------------------
@pytest.mark.parametrize("geometry, particle, energies_mev, mode, digest", [
    ("ild-ecal", "photon", [8e3, 30e3], "B",
     "1cc7328f657f253c9a17cab5827f45841d3c4a5221035a8073f44c75d9847ee0"),
    ("calochallenge-2", "electron", [2e3, 40e3], "A",
     "b685129e0e090e2308f32928e9f4b39a5a9a5454f74d83b28df4a37798d073cd"),
    ("generic-mesh", "electron", [3e3, 25e3], "B",
     "b610d5d7255531c679511a741dd6d668d23678eaad0be61a8db4c2322ae5bb6b"),
])
def test_normal_incidence_reproduces_the_showers_from_before_angles(geometry, particle, energies_mev, mode, digest):
    """The digests are those of caloadapt before inclined incidence (same pinned NumPy, seed 11)."""
    settings = SimulationSettings(mode=mode)
    spots = simulate(geometry, particle, np.array(energies_mev), seed=11, level="spots", settings=settings)
    assert hashlib.sha256(spots.points.tobytes() + spots.offsets.tobytes()).hexdigest() == digest
    explicit = simulate(geometry, particle, np.array(energies_mev), seed=11, level="spots", settings=settings,
                        theta_deg=np.full(2, 90.0), phi_deg=np.full(2, 90.0))
    assert np.array_equal(explicit.points, spots.points)
    np.testing.assert_array_equal(spots.theta_deg, 90.0)
    np.testing.assert_array_equal(spots.phi_deg, 90.0)


# -- geometry of inclined showers -----------------------------------------------------------------
@pytest.mark.parametrize("geometry, particle, theta, phi, axis", [
    ("calochallenge-2", "electron", 50.0, 90.0, 1),   # tilted along the beam axis (y)
    ("ild-ecal", "photon", 90.0, 110.0, 0),           # tilted across the octagon face (x)
])
def test_centre_of_gravity_per_layer_follows_tan_inclination_times_depth(geometry, particle, theta, phi, axis):
    geometry = get_geometry(geometry)
    spots = simulate(geometry, particle, np.full(40, 20e3), theta_deg=theta, phi_deg=phi, seed=5, level="spots")
    d = local_direction(theta, phi, geometry.barrel_sides)
    slope = d[axis] / d[2]  # the axis point at depth z sits at z * tan(inclination) in that direction
    p = spots.points.astype(np.float64)
    # the whole shower: its lateral spread is symmetric about the axis
    assert _weighted_mean(p[:, axis], p[:, 3]) == pytest.approx(slope * _weighted_mean(p[:, 2], p[:, 3]), rel=0.02)
    # layer by layer, over the layers that hold the bulk of the shower
    layer = geometry.layer_index(p[:, 2])
    inside = layer >= 0
    energy = np.bincount(layer[inside], p[inside, 3], geometry.n_layers)
    cumulative = np.cumsum(energy) / energy.sum()
    core = np.flatnonzero((cumulative > 0.15) & (cumulative < 0.85))
    assert len(core) >= 5
    depth = np.array([_weighted_mean(p[layer == k, 2], p[layer == k, 3]) for k in core])
    cog = np.array([_weighted_mean(p[layer == k, axis], p[layer == k, 3]) for k in core])
    fitted = np.polyfit(depth, cog, 1)[0]
    assert fitted == pytest.approx(slope, rel=0.06)
    np.testing.assert_allclose(cog, slope * depth, atol=0.15 * geometry.moliere_radius_mm)
    other = 1 - axis  # no drift in the transverse direction the particle does not lean to
    assert abs(_weighted_mean(p[:, other], p[:, 3])) < 0.05 * geometry.moliere_radius_mm


def test_path_length_per_layer_grows_as_one_over_cos(deep_crystal):
    """Without fluctuations the axis crosses depth t (in X0) after t / cos: the shower is shallower by cos."""
    energy_mev = np.full(30, 20e3)
    theta = 50.0  # inclination 40 degrees
    cos = np.cos(np.radians(40.0))
    normal = simulate(deep_crystal, "electron", energy_mev, seed=2, level="spots", settings=NO_FLUCTUATIONS)
    inclined = simulate(deep_crystal, "electron", energy_mev, theta_deg=theta, seed=2, level="spots",
                        settings=NO_FLUCTUATIONS)
    depth_normal = _weighted_mean(normal.points[:, 2], normal.points[:, 3])
    depth_inclined = _weighted_mean(inclined.points[:, 2], inclined.points[:, 3])
    assert depth_inclined / depth_normal == pytest.approx(cos, rel=0.01)
    # each layer of thickness dt holds dt / cos of the axis: the energy between two depths is the
    # gamma profile between those depths divided by cos (here the first 4 X0 and the slab 4-8 X0)
    t_max, alpha = gflash.average_profile(gflash_medium(deep_crystal), 20.0)
    beta = (alpha - 1) / t_max
    x0 = deep_crystal.stack.x0_at(inclined.points[:, 2].astype(np.float64))
    for t1, t2 in [(0.0, 4.0), (4.0, 8.0)]:
        share = inclined.points[(x0 >= t1) & (x0 < t2), 3].sum() / inclined.points[:, 3].sum()
        expected = gammainc(alpha, beta * t2 / cos) - gammainc(alpha, beta * t1 / cos)
        assert share == pytest.approx(expected, abs=0.02)


def test_longitudinal_leakage_follows_the_longer_path():
    """A thin stack: the deposited fraction is the gamma profile integrated to depth / cos along the axis."""
    geometry = get_geometry("ild-ecal")
    rng = np.random.default_rng(4)
    energy_mev = np.full(3, 50e3)
    for theta in (90.0, 60.0, 40.0):
        spots = simulate_chunk(geometry, "electron", energy_mev, rng, NO_FLUCTUATIONS, theta_deg=theta)
        cos = np.sin(np.radians(theta))
        t_max, alpha = gflash.average_profile(gflash_medium(geometry), 50.0)
        expected = gammainc(alpha, (alpha - 1) / t_max * geometry.stack.depth_x0 / cos)
        np.testing.assert_allclose(spots.meta["deposited_energy_mev"], 50e3 * expected, rtol=1e-9)


def test_energy_is_conserved_and_leaks_through_the_side():
    geometry = get_geometry("calochallenge-2")  # a 41.85 mm mesh around the normal through the impact point
    energy_mev = np.full(20, 20e3)
    outside = {}
    for theta in (90.0, 50.0):
        spots = simulate(geometry, "electron", energy_mev, theta_deg=theta, seed=3, level="spots")
        np.testing.assert_allclose(spots.meta["deposited_energy_mev"] + spots.meta["leaked_energy_mev"], energy_mev)
        # spots in front of or behind the readout layers are dropped from the spot file and counted outside
        kept_and_dropped = spots.energy_sum_mev + spots.meta.get("outside_energy_mev", 0.0)
        np.testing.assert_allclose(kept_and_dropped, spots.meta["visible_energy_mev"] * geometry.energy.calibration,
                                   rtol=1e-5)
        cells, missed = geometry.voxelise(spots, return_outside=True)
        np.testing.assert_allclose(cells.sum(axis=1) + missed, spots.energy_sum_mev, rtol=1e-5)
        hits = geometry.digitise(spots)
        np.testing.assert_allclose(hits.meta["outside_energy_mev"], missed + spots.meta.get("outside_energy_mev", 0.0),
                                   rtol=1e-9)
        outside[theta] = float(missed.sum() / spots.energy_sum_mev.sum())
    # inclined by 40 degrees the axis leaves the 42 mm mesh 50 mm deep, behind the shower maximum:
    # the tail leaks through the side of the mesh, about ten times the normal lateral leakage
    assert outside[90.0] < 0.02 and outside[50.0] > 0.05 and outside[50.0] > 5 * outside[90.0]


def test_angles_are_recorded_per_shower_and_kept_by_digitisation():
    theta = np.array([60.0, 90.0, 120.0, 75.0])
    phi = np.array([90.0, 100.0, 80.0, 0.0])
    hits = simulate("ild-ecal", "photon", np.full(4, 10e3), theta_deg=theta, phi_deg=phi, seed=9)
    np.testing.assert_array_equal(hits.theta_deg, theta)
    np.testing.assert_array_equal(hits.phi_deg, phi)
    # a shower and its mirror image about the normal plane: theta and 180 - theta lean to opposite sides
    lean = np.bincount(hits.shower_index, hits.points[:, 1] * hits.points[:, 3], 4) / hits.energy_sum_mev
    assert lean[0] > 20 and lean[2] < -20 and abs(lean[1]) < 5


def test_showers_without_angles_read_as_normal_incidence(make_showers):
    plain = make_showers([3, 2], geometry="ild-ecal", particle="photon", meta=False)
    np.testing.assert_array_equal(plain.theta_deg, 90.0)
    np.testing.assert_array_equal(plain.phi_deg, 90.0)
    tilted = simulate("ild-ecal", "photon", np.full(2, 5e3), theta_deg=70.0, seed=1)
    joined = Showers.concatenate([plain, tilted])
    np.testing.assert_array_equal(joined.theta_deg, [90.0, 90.0, 70.0, 70.0])


# -- the generic mesh along the particle ----------------------------------------------------------
@pytest.fixture(scope="module")
def fixed_mesh():
    """generic-mesh with its mesh fixed to the detector (around the normal through the impact point)."""
    spec = dict(get_geometry("generic-mesh").spec)
    spec["name"] = "generic-mesh-fixed"
    spec["readout"] = {**spec["readout"], "along_particle": False}
    return geometry_from_spec(spec)


def test_generic_mesh_follows_the_particle(fixed_mesh):
    mesh = get_geometry("generic-mesh")
    assert mesh.readout.along_particle and not fixed_mesh.readout.along_particle
    energy_mev = np.full(30, 20e3)
    normal = simulate(mesh, "electron", energy_mev, seed=4, level="spots")
    inclined = simulate(mesh, "electron", energy_mev, theta_deg=50.0, phi_deg=90.0, seed=4, level="spots")
    # in the mesh the inclined shower looks like a normal one: centred on the axis, same depth profile
    # in X0 along the axis (the W/Si stack is the same mixture along any direction)
    for axis in (0, 1):
        assert abs(_weighted_mean(inclined.points[:, axis], inclined.points[:, 3])) < 0.02 * mesh.moliere_radius_mm
    assert _weighted_mean(inclined.points[:, 2], inclined.points[:, 3]) == pytest.approx(
        _weighted_mean(normal.points[:, 2], normal.points[:, 3]), rel=0.03)
    # and the same lateral spread: it lies perpendicular to the axis, not in the layer plane (where
    # the particle frame would see it squeezed by cos(inclination) = 0.77 along u); medians, as the
    # 1/r^3 tail makes second moments noisy
    for axis in (0, 1):
        spread = [np.median(np.abs(s.points[:, axis])) for s in (inclined, normal)]
        assert spread[0] == pytest.approx(spread[1], rel=0.05)
    hits_inclined, hits_normal = mesh.digitise(inclined), mesh.digitise(normal)
    contained = hits_inclined.energy_sum_mev.sum() / inclined.energy_sum_mev.sum()
    assert contained == pytest.approx(hits_normal.energy_sum_mev.sum() / normal.energy_sum_mev.sum(), abs=0.02)
    # the mesh fixed to the detector loses the tail of the inclined shower through its side instead
    fixed = fixed_mesh.digitise(simulate(fixed_mesh, "electron", energy_mev, theta_deg=50.0, seed=4, level="spots"))
    assert 1 - fixed.energy_sum_mev.sum() / inclined.energy_sum_mev.sum() > 3 * (1 - contained)


def test_generic_mesh_points_convert_back_to_the_detector_frame(fixed_mesh):
    mesh = get_geometry("generic-mesh")
    energy_mev = np.full(5, 10e3)
    theta, phi = np.array([50.0, 70.0, 90.0, 120.0, 135.0]), np.full(5, 90.0)
    # the engine's spots, before a spot file drops those outside each readout's own layers
    along = simulate_chunk(mesh, "electron", energy_mev, np.random.default_rng(6), theta_deg=theta, phi_deg=phi)
    detector = simulate_chunk(fixed_mesh, "electron", energy_mev, np.random.default_rng(6), theta_deg=theta,
                              phi_deg=phi)
    # the same spots (same random stream), once in the particle frame and once in the detector frame
    np.testing.assert_allclose(mesh.detector_frame_points(along)[:, :3], detector.points[:, :3], atol=1e-3)
    np.testing.assert_array_equal(fixed_mesh.detector_frame_points(detector), detector.points.astype(np.float64))
    # cells -> detector-frame points: a cell centre lies its layer's depth along the particle axis and
    # its ring's radius away from that axis
    hits = mesh.digitise(along)
    points = mesh.detector_frame_points(hits)[:, :3]
    d = local_direction(hits.theta_deg, hits.phi_deg)[hits.shower_index]
    along_axis = np.einsum("pi,pi->p", points, d)
    cells = mesh.cell_index(hits.points)
    np.testing.assert_allclose(along_axis, mesh.layer_centres_mm[mesh.cell_layer[cells]], atol=1e-3)
    radius = np.linalg.norm(points - along_axis[:, None] * d, axis=1)
    np.testing.assert_allclose(radius, np.hypot(hits.points[:, 0], hits.points[:, 1]), atol=1e-3)


def test_a_spot_carries_the_visible_fraction_of_the_layer_it_lands_in():
    ild = get_geometry("ild-ecal")
    f_vis = ild.layer_visible_fraction
    centre = ild.layer_centres_mm
    axis = np.array([centre[18], centre[18], centre[18], centre[18]])
    spot = np.array([centre[18], centre[22], -5.0, ild.layer_edges_mm[-1] + 5.0])  # same, stack 2, in front, behind
    ratio = _landing_correction(ild, axis, spot)
    assert f_vis[22] < 0.7 * f_vis[18]  # the ILD stack-2 plates are twice as thick
    np.testing.assert_array_equal(ratio, [1.0, f_vis[22] / f_vis[18], 1.0, 1.0])


def test_inclined_spots_lie_in_the_readout_layers_and_digitise_to_the_hits():
    """An inclined shower's lateral spread reaches in front of the first layer and behind the last: a
    spot file keeps only the spots in readout layers (the others' energy counted as outside), and
    digitising it gives the hit file of the same seed, outside energy included."""
    geometry = get_geometry("ild-ecal")
    energies, theta = np.full(6, 40e3), np.full(6, 40.0)  # 50 degrees to the layer normal
    spots = simulate(geometry, "photon", energies, theta_deg=theta, seed=3, level="spots")
    hits = simulate(geometry, "photon", energies, theta_deg=theta, seed=3)
    assert np.all(geometry.layer_index(spots.points[:, 2]) >= 0)
    assert np.all(spots.meta["outside_energy_mev"] >= 0) and spots.meta["outside_energy_mev"].sum() > 0
    again = geometry.digitise(spots)
    np.testing.assert_array_equal(again.offsets, hits.offsets)
    np.testing.assert_allclose(again.points, hits.points, rtol=1e-6)
    np.testing.assert_allclose(again.meta["outside_energy_mev"], hits.meta["outside_energy_mev"], rtol=1e-9)
