"""The representation of showers for the model: conditions, the X0 grid of the flow, point frames."""

from __future__ import annotations

import numpy as np
import pytest

from caloadapt.geometry import get_geometry
from caloadapt.models.representation import (OUTSIDE_BOUND, DepthGrid, PointFrame, energy_condition, hits_as_spots,
                                             n_statistics, points_condition, shower_statistics, statistics_to_layers)
from caloadapt.simulate import simulate
from caloadapt.simulate.engine import gflash_medium
from caloadapt.simulate.gflash import spot_count


def test_conditions_are_fixed_geometry_independent_scales():
    np.testing.assert_allclose(energy_condition(np.array([1e3, 1e6, 10 ** 4.5])), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(points_condition(np.array([0, 1, 20000])), [0.0, 0.0, 1.0])


@pytest.mark.parametrize("name", ["ild-ecal", "calochallenge-3"])
def test_grid_spreading_keeps_the_sums(name):
    geometry, grid = get_geometry(name), DepthGrid()
    per_layer = np.random.default_rng(0).random((3, geometry.n_layers))
    on_grid = grid.layers_to_grid(geometry, per_layer)
    assert on_grid.shape == (3, grid.n_bins) and n_statistics(grid) == 2 * grid.n_bins + 2
    np.testing.assert_allclose(on_grid.sum(axis=1), per_layer.sum(axis=1))
    # back onto the layers: the sums survive, the bins behind the detector being empty
    np.testing.assert_allclose(grid.grid_to_layers(geometry, on_grid).sum(axis=1), per_layer.sum(axis=1))


def test_statistics_of_showers_give_back_their_hits_per_layer(simulated):
    geometry, showers = get_geometry("ild-ecal"), simulated("ild-ecal")
    grid = DepthGrid()
    stats = shower_statistics(geometry, showers, np.random.default_rng(1), grid)
    assert stats.shape == (len(showers), n_statistics(grid)) and np.all(np.isfinite(stats))
    counts, energy, _ = statistics_to_layers(geometry, stats, showers.incident_energy_mev, grid)
    hits = np.bincount(showers.shower_index * geometry.n_layers + geometry.layer_index(showers.points[:, 2]),
                       minlength=len(showers) * geometry.n_layers).reshape(len(showers), -1)
    # dequantisation noise (< 1 hit per grid bin), rounding, and grid bins shared by two layers: a few hits
    assert np.abs(counts - hits).max() <= 3
    np.testing.assert_allclose(counts.sum(axis=1), hits.sum(axis=1), rtol=0.1)
    np.testing.assert_allclose(energy.sum(axis=1), showers.energy_sum_mev, rtol=0.05)


@pytest.mark.parametrize("frame, scale", [("physical", 0.0), ("physical", 0.5), ("box", 0.0)])
def test_point_frames_invert(simulated, frame, scale):
    """Features and back: the same transverse position and cell energy, depth at the layer centre."""
    geometry, showers = get_geometry("ild-ecal"), simulated("ild-ecal")
    points_frame = PointFrame(geometry, frame, scale)
    features = points_frame.to_features(showers)
    assert features.shape == (len(showers.points), 4) and features.dtype == np.float32
    layer = geometry.layer_index(showers.points[:, 2])
    energy = np.repeat(showers.incident_energy_mev, showers.n_points)
    back = points_frame.to_points(features, layer, energy)
    np.testing.assert_allclose(back[:, :2], showers.points[:, :2], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(back[:, 3], showers.points[:, 3], rtol=1e-4)
    np.testing.assert_allclose(back[:, 2], geometry.layer_centres_mm[layer])


def test_point_frame_refuses_bad_settings():
    geometry = get_geometry("ild-ecal")
    for frame, scale in (("spherical", 0.0), ("physical", -1.0), ("box", 0.5)):
        with pytest.raises(ValueError):
            PointFrame(geometry, frame, scale)


@pytest.mark.parametrize("name", ["ild-ecal", "calochallenge-3"])
def test_far_generated_points_are_bounded_and_stay_outside_the_readout(name):
    """The inverse compression r0 sinh(u / r0) turns u a little too large into metres: such points are
    pulled in to OUTSIDE_BOUND x the readout's reach, along their direction, and are still not read out."""
    geometry = get_geometry(name)
    frame = PointFrame(geometry, "physical", 0.2)
    reach = geometry.readout.max_radius_mm
    u = np.array([0.1, 0.5, 1.5, 3.0, 30.0])  # compressed radius in R_M units; 3.0 is ~1e6 R_M uncompressed
    direction = np.array([0.6, 0.8])
    features = np.zeros((len(u), 4))
    features[:, :2] = u[:, None] * direction
    features[:, 3] = -5.0
    layer = np.full(len(u), geometry.n_layers // 2)
    points = frame.to_points(features, layer, np.full(len(u), 5e4))
    r = np.hypot(points[:, 0], points[:, 1])
    unbounded = 0.2 * np.sinh(u / 0.2) * geometry.layer_moliere_radius_mm[layer]
    assert np.all(np.isfinite(points)) and r.max() <= OUTSIDE_BOUND * reach * (1 + 1e-12)
    near = unbounded <= OUTSIDE_BOUND * reach
    np.testing.assert_allclose(r[near], unbounded[near], rtol=1e-9)  # untouched where it was inside the bound
    np.testing.assert_allclose(points[~near, :2] / r[~near, None], np.tile(direction, (int((~near).sum()), 1)))
    assert np.all((geometry.cell_index(points[:, :3]) >= 0) == (unbounded <= reach))


def test_hits_split_into_spots_keep_every_cell_and_carry_the_core_by_their_number():
    geometry = get_geometry("calochallenge-3")
    hits = simulate(geometry, "electron", np.array([5e3, 40e3]), seed=3)
    spots = hits_as_spots(geometry, hits, np.random.default_rng(0))
    # the same cells with the same energies: digitising the split showers gives back the hits
    again = geometry.digitise(geometry.dequantise(spots, np.random.default_rng(1)))
    for i in range(len(hits)):
        a, b = hits.shower(i), again.shower(i)
        order_a, order_b = np.lexsort(a[:, :3].T), np.lexsort(b[:, :3].T)
        np.testing.assert_allclose(b[order_b], a[order_a], rtol=1e-5, atol=1e-4)
    # about the GFlash spot count of each shower, and at least one point per hit
    n_spot = spot_count(gflash_medium(geometry), hits.incident_energy_mev / 1e3, geometry.shower.sampling_term)
    assert np.all(spots.n_points >= hits.n_points) and np.all(spots.n_points <= hits.n_points + n_spot + 1)
    assert np.all(spots.n_points >= n_spot * 0.9)
    # the hottest cell becomes the most points: the core is carried by their number
    hottest = int(np.argmax(hits.shower(1)[:, 3]))
    x, y, z, e = hits.shower(1)[hottest]
    same = np.all(spots.shower(1)[:, :3] == [x, y, z], axis=1)
    per_hit = np.bincount(geometry.cell_index(spots.shower(1)))
    assert same.sum() == per_hit.max() > 3 and spots.shower(1)[same, 3].max() < e / 3
    # sub-cell points (the simulator's spots) are already spots: unchanged
    raw = simulate(geometry, "electron", np.array([5e3]), seed=3, level="spots")
    assert hits_as_spots(geometry, raw, np.random.default_rng(0)) is raw
