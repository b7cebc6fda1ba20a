"""Tests of caloadapt.evaluate.physics_distance: FPD and KPD with small batch sizes."""

from __future__ import annotations

import numpy as np
import pytest

from caloadapt.errors import InputError
from caloadapt.evaluate.physics_distance import (
    frechet_distance,
    frechet_physics_distance,
    kernel_physics_distance,
    normalise_by_reference,
)

SMALL_FPD = {"min_samples": 300, "max_samples": 1500, "num_batches": 5, "num_points": 5}


def correlated_gaussian(n: int, seed: int, shift: float = 0.0, dim: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + 2.0 + shift


def test_frechet_distance_of_known_gaussians():
    mu = np.array([1.0, 2.0])
    assert frechet_distance(mu, np.eye(2), mu, np.eye(2)) == pytest.approx(0.0, abs=1e-10)
    assert frechet_distance(mu, np.eye(2), mu + [3.0, 4.0], np.eye(2)) == pytest.approx(25.0)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx((1 - 2) ** 2 + (2 - 3) ** 2)


def test_normalisation_by_the_reference_maximum():
    reference = np.array([[1.0, -4.0, 0.0], [2.0, 3.0, 0.0]])
    generated = np.array([[4.0, 8.0, 5.0]])
    ref_n, gen_n = normalise_by_reference(reference, generated)
    assert np.allclose(ref_n, [[0.5, -1.0, 0.0], [1.0, 0.75, 0.0]])
    assert np.allclose(gen_n, [[2.0, 2.0, 5.0]])  # an all-zero reference feature is not scaled


def test_fpd_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    reference = correlated_gaussian(3000, seed=1)
    same = frechet_physics_distance(reference, correlated_gaussian(3000, seed=2), **SMALL_FPD)
    shifted = frechet_physics_distance(reference, correlated_gaussian(3000, seed=2, shift=0.5), **SMALL_FPD)
    larger = frechet_physics_distance(reference, correlated_gaussian(3000, seed=2, shift=1.0), **SMALL_FPD)
    assert 0.0 <= same.value < 0.005
    assert shifted.value > 10 * max(same.value, 1e-4)
    assert larger.value > 3 * shifted.value
    assert same.error >= 0.0


def test_fpd_is_seeded():
    reference, generated = correlated_gaussian(2000, seed=3), correlated_gaussian(2000, seed=4, shift=0.2)
    first = frechet_physics_distance(reference, generated, **SMALL_FPD)
    assert first == frechet_physics_distance(reference, generated, **SMALL_FPD)
    other = frechet_physics_distance(reference, generated, **SMALL_FPD, seed=7)
    assert other.value != first.value


def test_kpd_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    reference = correlated_gaussian(3000, seed=5)
    same = kernel_physics_distance(reference, correlated_gaussian(3000, seed=6), batch_size=1000)
    shifted = kernel_physics_distance(reference, correlated_gaussian(3000, seed=6, shift=0.5),
                                      batch_size=1000)
    assert abs(same.value) < 3 * same.error + 1e-4
    assert shifted.value > 10 * (abs(same.value) + same.error)
    assert kernel_physics_distance(reference, correlated_gaussian(3000, seed=6), batch_size=1000) == same


def test_kpd_blockwise_kernel_sum_is_the_unbiased_mmd():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(50, 3)), rng.normal(0.2, 1.0, size=(40, 3))
    from caloadapt.evaluate.physics_distance import _mmd2_unbiased

    def kernel(a, b):
        return (a @ b.T / 3 + 1.0) ** 4

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    expected = ((kxx.sum() - np.trace(kxx)) / (50 * 49) + (kyy.sum() - np.trace(kyy)) / (40 * 39)
                - 2 * kxy.mean())
    assert _mmd2_unbiased(x, y, 4) == pytest.approx(expected, rel=1e-10)


def test_too_few_samples_and_bad_shapes_raise_input_error():
    reference = correlated_gaussian(500, seed=8)
    with pytest.raises(InputError, match="max_samples"):
        frechet_physics_distance(reference, reference)  # official sizes need 50 000 showers
    with pytest.raises(InputError):
        frechet_physics_distance(reference, reference, min_samples=400, max_samples=300)
    with pytest.raises(InputError, match="batch_size"):
        kernel_physics_distance(reference, reference)
    with pytest.raises(InputError):
        kernel_physics_distance(reference, reference[:, :3], batch_size=100)
    with pytest.raises(InputError):
        kernel_physics_distance(reference[:0], reference, batch_size=100)
