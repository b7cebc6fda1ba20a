"""Tests of caloadapt.evaluate.calochallenge: official high-level features, vectors, histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from caloadapt.errors import InputError
from caloadapt.evaluate.calochallenge import (
    DATASET_2,
    DATASET_3,
    THRESHOLD_MEV,
    CaloChallengeBinning,
    average_shower_by_energy,
    calochallenge_histograms,
    cell_layout,
    high_level_feature_names,
    high_level_features,
    high_level_vector,
    low_level_vector,
    separation_power_summary,
    separation_powers,
    separation_powers_by_energy,
)
from caloadapt.evaluate.observables import shower_observables

N_LAYERS = 45


def toy_showers(n: int, binning: CaloChallengeBinning, seed: int, *, scale: float = 1.0,
                n_spots: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Toy electron showers in a CaloChallenge binning (float32 voxels, (N, 1) energies in MeV)."""
    rng = np.random.default_rng(seed)
    e_inc = 10 ** rng.uniform(3, 6, n)
    shape = rng.normal(4.0 + 0.5 * np.log10(e_inc / 1e3), 0.4)[:, None]
    layer = np.floor(rng.gamma(np.broadcast_to(shape, (n, n_spots)), 2.0)).astype(int)
    radius = rng.exponential(6.0, (n, n_spots))
    alpha = rng.uniform(-np.pi, np.pi, (n, n_spots))
    i_r = np.searchsorted(np.asarray(binning.r_edges_mm), radius, side="right") - 1
    i_a = np.floor((alpha + np.pi) / (2 * np.pi) * binning.n_alpha).astype(int) % binning.n_alpha
    energy = rng.exponential(1.0, (n, n_spots))
    energy *= (e_inc * rng.normal(1.0, 0.02, n) * scale / energy.sum(axis=1))[:, None]
    inside = (layer < binning.n_layers) & (i_r < binning.n_r)
    cell = (layer * binning.n_alpha + i_a) * binning.n_r + i_r
    rows = np.broadcast_to(np.arange(n)[:, None], (n, n_spots))
    voxels = np.zeros((n, binning.n_voxels))
    np.add.at(voxels, (rows[inside], cell[inside]), energy[inside])
    noise = rng.random(voxels.shape) < 0.005  # sub-threshold noise, some negative
    voxels[noise] += rng.uniform(-0.01, 0.012, noise.sum())
    return voxels.astype(np.float32), e_inc.reshape(-1, 1)


def voxel_index(binning: CaloChallengeBinning, layer: int, alpha: int, r: int) -> int:
    return (layer * binning.n_alpha + alpha) * binning.n_r + r


def test_dataset_binnings():
    assert (DATASET_2.n_voxels, DATASET_2.voxels_per_layer, DATASET_2.n_r) == (6480, 144, 9)
    assert (DATASET_3.n_voxels, DATASET_3.voxels_per_layer, DATASET_3.n_r) == (40500, 900, 18)
    j = np.arange(50)
    assert np.allclose(DATASET_3.alpha_centres, -np.pi + (j + 0.5) * 2 * np.pi / 50)
    assert DATASET_2.r_mid_mm[0] == pytest.approx(2.325) and DATASET_3.r_mid_mm[-1] == pytest.approx(40.6875)
    # (alpha, r) order inside a layer, r fastest
    assert DATASET_3.eta_mm[1] == pytest.approx(DATASET_3.r_mid_mm[1] * math.cos(DATASET_3.alpha_centres[0]))
    assert DATASET_3.phi_mm[18] == pytest.approx(DATASET_3.r_mid_mm[0] * math.sin(DATASET_3.alpha_centres[1]))
    assert THRESHOLD_MEV == pytest.approx(0.01515, rel=1e-3)


def test_single_voxel_features():
    shower = np.zeros((1, DATASET_3.n_voxels))
    index = voxel_index(DATASET_3, layer=7, alpha=12, r=5)
    shower[0, index] = 42.0
    f = high_level_features(shower, DATASET_3)
    alpha = DATASET_3.alpha_centres[12]
    r_mid = DATASET_3.r_mid_mm[5]
    assert f.e_tot[0] == 42.0 and f.e_layer[0, 7] == 42.0 and f.e_layer[0].sum() == 42.0
    assert f.ce_eta[0, 7] == pytest.approx(r_mid * math.cos(alpha))
    assert f.ce_phi[0, 7] == pytest.approx(r_mid * math.sin(alpha))
    assert f.ce_r[0, 7] == pytest.approx(r_mid)
    assert f.width_eta[0, 7] == pytest.approx(0.0, abs=1e-6)
    assert f.width_phi[0, 7] == pytest.approx(0.0, abs=1e-6)
    assert f.width_r[0, 7] == pytest.approx(0.0, abs=1e-6)
    assert f.sparsity[0, 7] == pytest.approx(1 - 1 / 900)
    # empty layers: sparsity 1 and, through the 1e-16 guard, centres and widths 0
    assert np.all(f.sparsity[0, np.arange(45) != 7] == 1.0)
    assert np.all(f.ce_eta[0, np.arange(45) != 7] == 0.0) and np.all(f.width_r[0, :7] == 0.0)


def test_widths_of_two_opposite_voxels():
    shower = np.zeros((1, DATASET_2.n_voxels))
    shower[0, voxel_index(DATASET_2, 0, 0, 3)] = 1.0
    shower[0, voxel_index(DATASET_2, 0, 8, 3)] = 1.0  # alpha + pi
    f = high_level_features(shower, DATASET_2)
    eta = DATASET_2.r_mid_mm[3] * math.cos(DATASET_2.alpha_centres[0])
    assert f.ce_eta[0, 0] == pytest.approx(0.0, abs=1e-9)
    assert f.width_eta[0, 0] == pytest.approx(abs(eta))
    assert f.ce_r[0, 0] == pytest.approx(DATASET_2.r_mid_mm[3])
    assert f.width_r[0, 0] == pytest.approx(0, abs=1e-6)
    assert f.sparsity[0, 0] == pytest.approx(1 - 2 / 144)


def test_threshold_is_applied_first():
    shower = np.zeros((1, DATASET_2.n_voxels))
    shower[0, 0] = 1.0
    shower[0, 1] = 0.015  # below 15.15 keV
    shower[0, 2] = -5.0
    f = high_level_features(shower, DATASET_2)
    assert f.e_tot[0] == 1.0 and f.sparsity[0, 0] == pytest.approx(1 - 1 / 144)
    assert high_level_features(shower, DATASET_2, threshold_mev=0.0).e_tot[0] == pytest.approx(1.015)
    low = low_level_vector(shower, np.array([100.0]))
    assert low[0, 0] == pytest.approx(2.0) and low[0, 1] == pytest.approx(0.01) and low[0, 2] == 0.0


def test_high_level_vector_order_and_scaling():
    voxels, e_inc = toy_showers(50, DATASET_2, seed=1)
    f = high_level_features(voxels, DATASET_2)
    vector = high_level_vector(f, e_inc)
    names = high_level_feature_names(N_LAYERS)
    assert vector.shape == (50, 362) and len(names) == 362
    assert np.allclose(vector[:, 0], np.log10(e_inc[:, 0]))
    assert np.allclose(vector[:, 1:46], np.log10(f.e_layer + 1e-8))
    assert np.allclose(vector[:, 46:91], f.ce_eta / 100)
    assert np.allclose(vector[:, 91:136], f.ce_phi / 100)
    assert np.allclose(vector[:, 136:181], f.width_eta / 100)
    assert np.allclose(vector[:, 181:226], f.width_phi / 100)
    assert np.allclose(vector[:, 226], np.log10(f.e_tot + 1e-8))
    assert np.allclose(vector[:, 227:272], f.sparsity)
    assert np.allclose(vector[:, 272:317], f.ce_r / 100)
    assert np.allclose(vector[:, 317:362], f.width_r / 100)
    assert names[0] == "log10_E_inc" and names[226] == "log10_E_tot" and names[-1] == "width_r_44/100"


def test_low_level_vectors():
    voxels, e_inc = toy_showers(20, DATASET_2, seed=2)
    low = low_level_vector(voxels, e_inc)
    assert low.shape == (20, 6481) and low.dtype == np.float64
    thresholded = np.where(voxels < THRESHOLD_MEV, 0, voxels)
    assert np.allclose(low[:, 1:], thresholded / e_inc)
    normed = low_level_vector(voxels, e_inc, binning=DATASET_2, layer_normalised=True)
    assert normed.shape == (20, 1 + 6480 + 45)
    layer_sums = normed[:, 1:6481].reshape(20, 45, 144).sum(axis=-1)
    e_layer = thresholded.reshape(20, 45, 144).sum(axis=-1)
    assert np.allclose(layer_sums[e_layer > 0], 1.0)
    assert low_level_vector(voxels, e_inc, dtype=np.float32).dtype == np.float32


def test_features_do_not_depend_on_chunking():
    voxels, _ = toy_showers(30, DATASET_2, seed=3)
    whole = high_level_features(voxels, DATASET_2)
    chunked = high_level_features(voxels, DATASET_2, chunk_size=7)
    for name in ("e_tot", "e_layer", "ce_eta", "width_phi", "ce_r", "sparsity"):
        assert np.array_equal(getattr(whole, name), getattr(chunked, name)), name
    assert whole.voxel_max_mev == chunked.voxel_max_mev == voxels.max()


@pytest.fixture(scope="module")
def ds2_samples():
    reference = toy_showers(400, DATASET_2, seed=10)
    same = toy_showers(400, DATASET_2, seed=11)
    scaled = toy_showers(400, DATASET_2, seed=11, scale=1.05)
    return reference, same, scaled


def test_identical_samples_have_zero_separation_power(ds2_samples):
    (voxels, e_inc), _, _ = ds2_samples
    result = calochallenge_histograms(voxels, e_inc, voxels, e_inc, DATASET_2)
    assert len(result) == 1 + 45 * 8 + 1
    values = np.array([c.separation_power for c in result.values()])
    assert np.all(values[np.isfinite(values)] == 0.0)
    assert list(result)[:2] == ["Etot / Einc", "E layer 0"]
    assert "Voxel distribution" in result and "Sparsity layer 44" in result


def test_separation_powers_detect_an_energy_scale(ds2_samples):
    (ref_v, ref_e), (same_v, same_e), (scaled_v, scaled_e) = ds2_samples
    ref_f = high_level_features(ref_v, DATASET_2)
    floor = separation_power_summary(calochallenge_histograms(ref_v, ref_e, same_v, same_e, DATASET_2,
                                                              reference_features=ref_f))
    scaled = separation_power_summary(calochallenge_histograms(ref_v, ref_e, scaled_v, scaled_e, DATASET_2,
                                                               reference_features=ref_f))
    assert set(floor) == {"sep E total", "sep E layer", "sep cell", "sep EC eta", "sep EC phi",
                          "sep EC eta std", "sep EC phi std", "sep EC r", "sep EC r std", "sep sparsity"}
    assert scaled["sep E total"] > 0.5 > 5 * floor["sep E total"]
    assert scaled["sep EC r"] == pytest.approx(floor["sep EC r"], abs=0.02)


def test_histograms_use_the_official_binnings(ds2_samples):
    (ref_v, ref_e), (gen_v, gen_e), _ = ds2_samples
    ref_f, gen_f = high_level_features(ref_v, DATASET_2), high_level_features(gen_v, DATASET_2)
    result = separation_powers(ref_f, ref_e, gen_f, gen_e)
    assert np.array_equal(result["Etot / Einc"].edges, np.linspace(0.5, 1.5, 101))
    assert np.array_equal(result["EC Eta layer 3"].edges, np.linspace(-30, 30, 101))
    assert np.array_equal(result["Width Phi layer 3"].edges, np.linspace(0, 30, 101))
    assert np.array_equal(result["EC r layer 3"].edges, np.linspace(0, 42, 101))
    assert np.array_equal(result["Width r layer 3"].edges, np.linspace(0, 20, 101))
    assert np.array_equal(result["Sparsity layer 3"].edges, np.linspace(0, 1, 21))
    e_layer = result["E layer 3"]
    assert len(e_layer.edges) == 40
    assert e_layer.edges[0] == pytest.approx(THRESHOLD_MEV)
    assert e_layer.edges[-1] == pytest.approx(ref_f.e_layer[:, 3].max(), rel=1e-6)
    comparison = result["EC Eta layer 3"]
    assert np.sum(comparison.reference_density * np.diff(comparison.edges)) == pytest.approx(1.0)
    assert "Voxel distribution" not in result  # needs the voxels: calochallenge_histograms


def test_empty_reference_layer_gives_undefined_separation_power():
    voxels = np.zeros((3, DATASET_2.n_voxels))
    voxels[:, voxel_index(DATASET_2, 0, 0, 0)] = [1.0, 2.0, 3.0]
    e_inc = np.full(3, 5.0)
    result = calochallenge_histograms(voxels, e_inc, voxels, e_inc, DATASET_2)
    assert np.isnan(result["E layer 5"].separation_power) and result["E layer 5"].edges is None
    assert result["E layer 0"].separation_power == 0.0


def test_separation_powers_by_energy_equal_those_of_the_subsets(ds2_samples):
    (ref_v, ref_e), (gen_v, gen_e), _ = ds2_samples
    binned = separation_powers_by_energy(ref_v, ref_e, gen_v, gen_e, DATASET_2, chunk_size=150)
    assert list(binned) == ["1-10 GeV", "10-100 GeV", "100-1000 GeV"]
    ref_mask = (ref_e[:, 0] >= 1e4) & (ref_e[:, 0] < 1e5)
    gen_mask = (gen_e[:, 0] >= 1e4) & (gen_e[:, 0] < 1e5)
    direct = calochallenge_histograms(ref_v[ref_mask], ref_e[ref_mask], gen_v[gen_mask], gen_e[gen_mask],
                                      DATASET_2)
    for label in ("Etot / Einc", "E layer 10", "Voxel distribution", "Width r layer 4"):
        assert binned["10-100 GeV"][label].separation_power == pytest.approx(direct[label].separation_power)


def test_average_shower_by_energy_decade():
    voxels, e_inc = toy_showers(60, DATASET_2, seed=4)
    bins = average_shower_by_energy(voxels, e_inc, chunk_size=13)
    assert [(low, high) for low, high, _, _ in bins] == [(1e3, 1e4), (1e4, 1e5), (1e5, 1e6)]
    assert sum(count for *_, count in bins) == 60
    low, high, mean, count = bins[1]
    mask = (e_inc[:, 0] >= low) & (e_inc[:, 0] < high)
    thresholded = np.where(voxels < THRESHOLD_MEV, 0, voxels)
    assert count == mask.sum() and np.allclose(mean, thresholded[mask].mean(axis=0), rtol=1e-5)


def test_cell_layout_matches_the_feature_coordinates():
    layout = cell_layout(DATASET_2)
    assert layout.cell_centres_mm.shape == (6480, 3) and layout.n_layers == 45
    index = voxel_index(DATASET_2, 2, 5, 4)
    shower = np.zeros((1, 6480))
    shower[0, index] = 10.0
    obs = shower_observables(shower, np.array([20.0]), layout)
    f = high_level_features(shower, DATASET_2)
    assert obs.per_shower["cog_x_mm"][0] == pytest.approx(f.ce_eta[0, 2])
    assert obs.per_shower["cog_y_mm"][0] == pytest.approx(f.ce_phi[0, 2])
    assert obs.per_shower["depth_cog_mm"][0] == pytest.approx(2.5 * 3.4)


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError):
        high_level_features(np.zeros((2, 6479)), DATASET_2)
    with pytest.raises(InputError):
        high_level_features(np.zeros((0, 6480)), DATASET_2)
    f = high_level_features(np.ones((2, 6480)), DATASET_2)
    with pytest.raises(InputError):
        high_level_vector(f, np.ones(3))
    with pytest.raises(InputError):
        high_level_vector(f, np.zeros(2))
    with pytest.raises(InputError):
        CaloChallengeBinning((0.0, 2.0, 1.0), 4, 2)
