"""Tests of caloadapt.evaluate.observables and energy_bins on synthetic voxelised showers."""

from __future__ import annotations

import numpy as np
import pytest

from caloadapt.errors import InputError
from caloadapt.evaluate.calochallenge import CaloChallengeBinning, cell_layout
from caloadapt.evaluate.distances import geometric_mean
from caloadapt.evaluate.energy_bins import energy_bin_masks
from caloadapt.evaluate.observables import (
    PUBLISHED_SCORED,
    SCORE_ROWS,
    CellLayout,
    calotransfer_scores,
    calotransfer_scores_by_energy,
    shower_observables,
)

BINNING = CaloChallengeBinning(tuple(np.linspace(0.0, 30.0, 7)), n_alpha=8, n_layers=12)
THRESHOLD = 0.01515
LAYOUT = cell_layout(BINNING, threshold_mev=THRESHOLD)


def toy_showers(n: int, seed: int, *, scale: float = 1.0,
                n_spots: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """Toy electromagnetic showers: gamma-shaped depth, exponential radius, 2 % response spread."""
    rng = np.random.default_rng(seed)
    e_inc = 10 ** rng.uniform(3, 6, n)
    shape = rng.normal(3.0 + 0.3 * np.log10(e_inc / 1e3), 0.3)[:, None]
    layer = np.floor(rng.gamma(np.broadcast_to(shape, (n, n_spots)), 1.0)).astype(int)
    radius = rng.exponential(5.0, (n, n_spots))
    alpha = rng.uniform(-np.pi, np.pi, (n, n_spots))
    i_r = np.searchsorted(np.asarray(BINNING.r_edges_mm), radius, side="right") - 1
    i_a = np.floor((alpha + np.pi) / (2 * np.pi) * BINNING.n_alpha).astype(int) % BINNING.n_alpha
    energy = rng.exponential(1.0, (n, n_spots))
    energy *= (e_inc * rng.normal(1.0, 0.02, n) * scale / energy.sum(axis=1))[:, None]
    inside = (layer < BINNING.n_layers) & (i_r < BINNING.n_r)
    cell = (layer * BINNING.n_alpha + i_a) * BINNING.n_r + i_r
    rows = np.broadcast_to(np.arange(n)[:, None], (n, n_spots))
    voxels = np.zeros((n, BINNING.n_voxels))
    np.add.at(voxels, (rows[inside], cell[inside]), energy[inside])
    return voxels, e_inc


def shift_one_layer(voxels: np.ndarray) -> np.ndarray:
    layers = voxels.reshape(len(voxels), BINNING.n_layers, -1)
    shifted = np.zeros_like(layers)
    shifted[:, 1:] = layers[:, :-1]
    return shifted.reshape(len(voxels), -1)


@pytest.fixture(scope="module")
def samples():
    reference = shower_observables(*toy_showers(2000, seed=1), LAYOUT)
    ref_voxels, ref_einc = toy_showers(2000, seed=2)
    same = shower_observables(ref_voxels, ref_einc, LAYOUT)
    scaled = shower_observables(1.05 * ref_voxels, ref_einc, LAYOUT)
    shifted = shower_observables(shift_one_layer(ref_voxels), ref_einc, LAYOUT)
    return reference, same, scaled, shifted


def test_threshold_is_applied_before_every_observable():
    voxels = np.zeros((1, LAYOUT.n_cells))
    voxels[0, 0] = 5.0
    voxels[0, 1] = 0.01  # below 15.15 keV
    voxels[0, 2] = -3.0  # negative noise
    voxels[0, 3] = THRESHOLD  # exactly at threshold: a hit
    obs = shower_observables(voxels, np.array([100.0]), LAYOUT)
    assert obs.per_shower["n_hits"][0] == 2
    assert obs.per_shower["visible_energy_mev"][0] == pytest.approx(5.0 + THRESHOLD)
    assert obs.per_shower["energy_ratio"][0] == pytest.approx((5.0 + THRESHOLD) / 100.0)
    assert sorted(obs.cell_energy_mev) == pytest.approx([THRESHOLD, 5.0])
    assert obs.layer_hits[0, 0] == 2 and obs.layer_hits[0, 1:].sum() == 0


def test_single_cell_shower_has_its_centre_of_gravity_at_the_cell():
    cell = 5 * BINNING.voxels_per_layer + 3 * BINNING.n_r + 4  # layer 5, alpha bin 3, r bin 4
    voxels = np.zeros((2, LAYOUT.n_cells))
    voxels[0, cell] = 7.0
    obs = shower_observables(voxels, np.array([1e3, 1e3]), LAYOUT)
    x, y, depth = LAYOUT.cell_centres_mm[cell]
    assert obs.per_shower["cog_x_mm"][0] == pytest.approx(x)
    assert obs.per_shower["cog_y_mm"][0] == pytest.approx(y)
    assert obs.per_shower["depth_cog_mm"][0] == pytest.approx(depth) == pytest.approx(5.5 * 3.4)
    assert obs.per_shower["radius_cog_mm"][0] == pytest.approx(np.hypot(x, y))
    assert obs.per_shower["radius_cog_mm"][0] == pytest.approx(BINNING.r_mid_mm[4])
    assert obs.layer_energy_mev[0, 5] == 7.0
    # an empty shower: centres of gravity 0, no hits
    assert obs.per_shower["n_hits"][1] == 0 and obs.per_shower["depth_cog_mm"][1] == 0.0


def test_identical_samples_score_zero():
    observables = shower_observables(*toy_showers(300, seed=3), LAYOUT)
    table = calotransfer_scores(observables, observables, n_bootstrap=3)
    for row in SCORE_ROWS:
        assert table.scores[row].wasserstein == pytest.approx(0.0, abs=1e-9), row
    assert table.geometric_mean == pytest.approx(1e-10)


def test_energy_scale_is_detected_by_the_energy_observables_only(samples):
    reference, same, scaled, _ = samples
    floor = calotransfer_scores(reference, same, n_bootstrap=10)
    table = calotransfer_scores(reference, scaled, n_bootstrap=10)
    w = {row: score.wasserstein for row, score in table.scores.items()}
    floor_w = {row: score.wasserstein for row, score in floor.scores.items()}
    assert w["energy_ratio"] > 1.0 and floor_w["energy_ratio"] < 0.15
    assert w["energy_ratio"] > 10 * floor_w["energy_ratio"]
    for row in ("depth_cog", "radius_cog", "cog_x", "cog_y"):
        assert w[row] < 0.1, row
    assert table.geometric_mean > floor.geometric_mean
    assert table.scores["energy_ratio"].kl > 10 * floor.scores["energy_ratio"].kl


def test_layer_shift_is_detected_by_the_depth_observables_only(samples):
    reference, same, _, shifted = samples
    floor = calotransfer_scores(reference, same, n_bootstrap=0)
    table = calotransfer_scores(reference, shifted, n_bootstrap=0)
    assert table.scores["depth_cog"].wasserstein > 1.0
    assert table.scores["depth_cog"].wasserstein > 10 * floor.scores["depth_cog"].wasserstein
    assert table.scores["layer_energy"].wasserstein > 3 * floor.scores["layer_energy"].wasserstein
    for row in ("radius_cog", "cog_x", "cog_y", "energy_ratio"):
        assert table.scores[row].wasserstein < 0.15, row


def test_geometric_mean_and_bootstrap_of_the_table(samples):
    reference, same, _, _ = samples
    table = calotransfer_scores(reference, same, n_bootstrap=8, seed=3)
    assert table.scored == PUBLISHED_SCORED
    assert table.geometric_mean == pytest.approx(
        geometric_mean([table.scores[row].wasserstein for row in PUBLISHED_SCORED]))
    assert 0 < table.geometric_mean_std < table.geometric_mean
    for row in SCORE_ROWS:
        assert np.isfinite(table.scores[row].wasserstein_std) and table.scores[row].wasserstein_std > 0
    assert table.layer_energy_wasserstein.shape == (BINNING.n_layers,)
    again = calotransfer_scores(reference, same, n_bootstrap=8, seed=3)
    assert again.geometric_mean_std == table.geometric_mean_std
    no_bootstrap = calotransfer_scores(reference, same, n_bootstrap=0)
    assert np.isnan(no_bootstrap.geometric_mean_std)
    assert no_bootstrap.geometric_mean == table.geometric_mean
    assert set(table.as_dict()["scores"]) == set(SCORE_ROWS)


def test_scores_by_energy_decade(samples):
    reference, same, _, _ = samples
    tables = calotransfer_scores_by_energy(reference, same, n_bootstrap=0)
    assert list(tables) == ["1-10 GeV", "10-100 GeV", "100-1000 GeV"]
    counts = [mask.sum() for _, _, mask in energy_bin_masks(reference.incident_energy_mev)]
    assert [t.n_reference for t in tables.values()] == counts
    assert sum(counts) == reference.n_showers


def test_select_keeps_the_cells_of_the_selected_showers(samples):
    reference = samples[0]
    mask = reference.incident_energy_mev > 1e5
    subset = reference.select(mask)
    assert subset.n_showers == mask.sum()
    assert subset.cell_energy_mev.size == reference.per_shower["n_hits"][mask].sum()
    assert np.array_equal(np.bincount(subset.cell_shower_index, minlength=subset.n_showers),
                          subset.per_shower["n_hits"].astype(int))


def test_energy_bins_follow_the_avg_e_convention():
    energies = np.array([1e3, 9999.0, 1e4, 1e5, 1e6])
    closed = [mask.sum() for _, _, mask in energy_bin_masks(energies)]
    official = [mask.sum() for _, _, mask in energy_bin_masks(energies, closed_last=False)]
    assert closed == [2, 1, 2] and official == [2, 1, 1]


def test_bad_inputs_raise_input_error():
    voxels, e_inc = toy_showers(5, seed=4)
    with pytest.raises(InputError):
        shower_observables(voxels[:, :-1], e_inc, LAYOUT)
    with pytest.raises(InputError):
        shower_observables(voxels, e_inc[:-1], LAYOUT)
    with pytest.raises(InputError):
        shower_observables(voxels[:0], e_inc[:0], LAYOUT)
    with pytest.raises(InputError):
        shower_observables(voxels, -e_inc, LAYOUT)
    with pytest.raises(InputError):
        CellLayout(np.zeros((4, 2)), np.zeros(4, int), 1)
    with pytest.raises(InputError):
        CellLayout(np.zeros((4, 3)), np.array([0, 1, 2, 3]), 3)
    observables = shower_observables(voxels, e_inc, LAYOUT)
    with pytest.raises(InputError):
        calotransfer_scores(observables, observables, scored=("no_such_row",))
