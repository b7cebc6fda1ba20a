"""Tests of caloadapt.evaluate.distances: W1, geometric mean, bootstrap, KL, separation power."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from caloadapt.errors import InputError
from caloadapt.evaluate.distances import (
    GroupedWasserstein,
    bootstrap,
    density_histogram,
    equal_probability_edges,
    geometric_mean,
    geometric_mean_uncertainty,
    histogram_separation_power,
    kl_divergence,
    normalised_wasserstein,
    separation_power,
)


def test_normalised_wasserstein_of_a_shifted_normal_is_the_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 1.0, 20_000)
    generated = rng.normal(0.5, 1.0, 20_000)
    value = normalised_wasserstein(reference, generated)
    assert value == pytest.approx(0.5, abs=0.03)
    assert value == pytest.approx(stats.wasserstein_distance(reference, generated) / reference.std(ddof=1))


def test_normalised_wasserstein_is_scale_free():
    rng = np.random.default_rng(1)
    reference, generated = rng.exponential(1.0, 3000), rng.exponential(1.2, 3000)
    assert normalised_wasserstein(1e3 * reference, 1e3 * generated) == pytest.approx(
        normalised_wasserstein(reference, generated))


def test_identical_samples_have_zero_distance():
    values = np.random.default_rng(2).normal(size=1000)
    assert normalised_wasserstein(values, values) == 0.0
    assert kl_divergence(values, values) == pytest.approx(0.0, abs=1e-12)


def test_weighted_normalisation_uses_the_weighted_population_std():
    positions = np.arange(18, dtype=float)
    ref_w = np.exp(-positions / 3)
    gen_w = np.exp(-positions / 3.5)
    mean = np.average(positions, weights=ref_w)
    spread = np.sqrt(np.average((positions - mean) ** 2, weights=ref_w))
    expected = stats.wasserstein_distance(positions, positions, ref_w, gen_w) / spread
    assert normalised_wasserstein(positions, positions, reference_weights=ref_w,
                                  generated_weights=gen_w) == pytest.approx(expected)


def test_bad_samples_raise_input_error():
    with pytest.raises(InputError):
        normalised_wasserstein([], [1.0, 2.0])
    with pytest.raises(InputError):
        normalised_wasserstein([1.0, 1.0, 1.0], [1.0, 2.0])  # zero reference spread
    with pytest.raises(InputError):
        normalised_wasserstein([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(InputError):
        normalised_wasserstein([1.0, 2.0], [1.0, 2.0], reference_weights=[1.0])


def test_geometric_mean_of_known_numbers():
    assert geometric_mean([1.0, 10.0, 100.0]) == pytest.approx(10.0)
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert geometric_mean([0.0, 0.0]) == pytest.approx(1e-10)  # the published epsilon
    with pytest.raises(InputError):
        geometric_mean([1.0, -1.0])
    with pytest.raises(InputError):
        geometric_mean([])


def test_geometric_mean_uncertainty_is_the_published_propagation():
    values, errors = np.array([1.0, 4.0]), np.array([0.1, 0.8])
    expected = 2.0 * np.sqrt(0.1 ** 2 + 0.2 ** 2) / 2
    assert geometric_mean_uncertainty(values, errors) == pytest.approx(expected, rel=1e-6)


def test_grouped_wasserstein_matches_scipy_and_resampled_samples():
    rng = np.random.default_rng(3)
    reference, generated = rng.normal(size=300), rng.normal(0.3, 1.2, size=250)
    grouped = GroupedWasserstein(reference, generated)
    assert grouped.normalised() == pytest.approx(normalised_wasserstein(reference, generated))
    # integer multiplicities = the bootstrap sample with repeated entries
    w_ref, w_gen = rng.integers(0, 3, 300), rng.integers(0, 3, 250)
    expected = normalised_wasserstein(np.repeat(reference, w_ref), np.repeat(generated, w_gen))
    assert grouped.normalised(w_ref, w_gen) == pytest.approx(expected)


def test_grouped_wasserstein_moves_all_entries_of_a_group_together():
    rng = np.random.default_rng(4)
    ref_values, gen_values = rng.exponential(size=40), rng.exponential(size=30)
    ref_groups, gen_groups = rng.integers(0, 10, 40), rng.integers(0, 8, 30)
    grouped = GroupedWasserstein(ref_values, gen_values, reference_groups=ref_groups,
                                 generated_groups=gen_groups, n_reference_groups=10,
                                 n_generated_groups=8)
    w_ref, w_gen = rng.integers(0, 3, 10).astype(float), rng.integers(1, 3, 8).astype(float)
    expected = normalised_wasserstein(np.repeat(ref_values, w_ref[ref_groups].astype(int)),
                                      np.repeat(gen_values, w_gen[gen_groups].astype(int)))
    assert grouped.normalised(w_ref, w_gen) == pytest.approx(expected)


def test_bootstrap_is_seeded_and_gives_the_standard_error():
    rng = np.random.default_rng(5)
    reference, generated = rng.normal(size=2000), rng.normal(size=2000)

    def mean_difference(a, b):
        return float(np.mean(b) - np.mean(a))

    first = bootstrap(mean_difference, reference, generated, n_resamples=200, seed=7)
    second = bootstrap(mean_difference, reference, generated, n_resamples=200, seed=7)
    assert first.std == second.std and np.array_equal(first.samples, second.samples)
    assert first.value == pytest.approx(mean_difference(reference, generated))
    assert first.std == pytest.approx(np.sqrt(2 / 2000), rel=0.2)
    with pytest.raises(InputError):
        bootstrap(mean_difference, reference, generated, n_resamples=1)


def test_kl_divergence_grows_with_a_shift_and_uses_quantile_bins():
    rng = np.random.default_rng(6)
    reference = rng.normal(size=5000)
    edges = equal_probability_edges(reference, 30)
    assert edges[0] == -np.inf and edges[-1] == np.inf and len(edges) == 31
    close = kl_divergence(reference, rng.normal(size=5000))
    far = kl_divergence(reference, rng.normal(1.0, 1.0, size=5000))
    assert close < 0.02 < 0.3 < far
    # explicit edges: out-of-range entries drop out
    edges = np.linspace(-5, 5, 11)
    assert kl_divergence(reference, np.append(reference, 100.0), edges) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(InputError):
        kl_divergence(reference, reference + 100.0, edges)


def test_separation_power_definition():
    assert separation_power(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0
    assert separation_power(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    assert separation_power(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(
        0.5 * (0.25 / 1.5 + 0.25 / 0.5))
    edges = np.array([0.0, 1.0, 3.0])
    density_ref, density_gen = np.array([0.5, 0.25]), np.array([1.0, 0.0])
    assert separation_power(density_ref, density_gen, edges) == pytest.approx(
        separation_power(np.array([0.5, 0.5]), np.array([1.0, 0.0])))


def test_density_histogram_follows_the_official_conventions():
    edges = np.array([0.0, 1.0, 2.0, 4.0])
    values = np.array([-1.0, 0.5, 1.5, 2.0, 4.0, 7.0])  # -1 and 7 outside; 4 in the last bin
    density = density_histogram(values, edges)
    assert np.allclose(density, np.histogram(values, edges, density=True)[0])
    assert np.sum(density * np.diff(edges)) == pytest.approx(1.0)
    assert density[2] == pytest.approx(2 / 4 / 2)
    assert np.all(np.isnan(density_histogram(np.array([10.0]), edges)))
    samples = np.random.default_rng(8).normal(size=500)
    assert histogram_separation_power(samples, samples, np.linspace(-3, 3, 21)) == 0.0
