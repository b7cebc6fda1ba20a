"""Fréchet and Kernel Physics Distances (FPD, KPD) between two sets of feature vectors.

The algorithms of ``jetnet.evaluation.fpd`` and ``jetnet.evaluation.kpd`` (jetnet 0.2.5;
R. Kansal et al., arXiv:2211.10295) as called by the CaloChallenge evaluation on the 362
high-level features (docs/scoring.md §2.6): reference (Geant4) first, generated second,

- features divided by the maximum absolute value of each feature in the reference sample
  (features that are 0 throughout the reference are left as they are);
- FPD: at ``num_points`` batch sizes N spaced evenly in 1/N between ``min_samples`` and
  ``max_samples``, draw ``num_batches`` batches of each sample with replacement, average the
  Fréchet distance ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``, fit a straight line in 1/N
  with non-negative intercept and slope, and report the intercept (N -> infinity) and its fit error;
  the CaloChallenge call uses ``min_samples=10000`` (max 50 000, 20 batches, 10 points, seed 42);
- KPD: the unbiased estimator of MMD^2 with the polynomial kernel ``k(x, y) = (x.y / d + 1)^4`` on
  ``num_batches = 10`` batches of ``batch_size`` (CaloChallenge: 10 000) drawn with replacement
  (batch i seeded with ``seed + 1000 i``); reported as the median and half the 16.275-83.725 %
  inter-quantile range (the central 68 %) over the batches.

Caveat (official behaviour, kept): a feature that is almost constant in the reference, e.g. the
width of a layer the showers hardly ever reach (left by the official float32 arithmetic at ~1e-9
rather than 0), is divided by a tiny maximum, and any generated spread in it then dominates both
distances.

The random draws follow jetnet's exactly (same generator, seeds and call order), so for the same
inputs the numbers agree with jetnet up to floating-point summation order. Both values are usually
quoted x 10^3. Smaller batch sizes may be chosen for small samples, but no batch may be larger
than a sample.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.optimize import curve_fit
from scipy.stats import iqr

from ..errors import InputError

__all__ = ["PhysicsDistance", "normalise_by_reference", "frechet_distance",
           "frechet_physics_distance", "kernel_physics_distance"]


@dataclass(frozen=True)
class PhysicsDistance:
    """A distance estimate and its uncertainty (FPD: fit error; KPD: half the 68 % range)."""

    value: float
    error: float


def _features(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name} features must have shape (N, d) with N, d > 0, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} features contain NaN or infinite values")
    return array


def _pair(reference: np.ndarray, generated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = _features(reference, "reference")
    gen = _features(generated, "generated")
    if ref.shape[1] != gen.shape[1]:
        raise InputError(f"reference has {ref.shape[1]} features, generated {gen.shape[1]}")
    return ref, gen


def normalise_by_reference(reference: np.ndarray, generated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide each feature by its maximum absolute value in the reference (1 where that is 0)."""
    ref, gen = _pair(reference, generated)
    scale = np.max(np.abs(ref), axis=0)
    scale[scale == 0] = 1.0
    return ref / scale, gen / scale


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     eps: float = 1e-6) -> float:
    """Fréchet distance ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` of two Gaussians.

    If the matrix square root is not finite, ``eps`` is added to both diagonals (as jetnet and
    pytorch-fid do); a small imaginary part from round-off is dropped. Singular products (constant
    features) are expected and not warned about.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError("Fréchet distance of Gaussians of different dimensions")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # a singular product is expected for constant features (jetnet calls sqrtm with disp=False)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.all(np.isfinite(covmean)):
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        trace = np.trace(covmean)
        if not (np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
                or np.isclose(trace.imag / trace.real, 0, atol=1e-3)):
            warnings.warn(f"large imaginary part in the Fréchet distance: Im {trace.imag:.2f}, "
                          f"Re {trace.real:.2f}", RuntimeWarning, stacklevel=2)
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _linear(x: np.ndarray, intercept: float, slope: float) -> np.ndarray:
    return intercept + slope * x


def frechet_physics_distance(reference_features: np.ndarray, generated_features: np.ndarray, *,
                             min_samples: int = 10_000, max_samples: int = 50_000,
                             num_batches: int = 20, num_points: int = 10, normalise: bool = True,
                             seed: int = 42) -> PhysicsDistance:
    """FPD: the Fréchet distance extrapolated to infinite sample size (jetnet algorithm).

    Args:
        reference_features: ``(N_ref, d)`` reference (Geant4) features, e.g. the 362 high-level
            features of :func:`~caloadapt.evaluate.calochallenge.high_level_vector`.
        generated_features: ``(N_gen, d)`` generated features.
        min_samples, max_samples: smallest and largest batch size (CaloChallenge: 10 000 and 50 000).
        num_batches: batches per batch size; num_points: number of batch sizes.
        normalise: divide by the reference maximum absolute value per feature first.
        seed: seed of the :class:`numpy.random.Generator` of all draws.

    Raises:
        InputError: bad shapes, ``min_samples >= max_samples``, or a sample smaller than
            ``max_samples`` (lower ``max_samples`` for small samples).
    """
    ref, gen = _pair(reference_features, generated_features)
    if not 2 <= min_samples < max_samples:
        raise InputError(f"need 2 <= min_samples < max_samples, got {min_samples} and {max_samples}")
    if num_batches < 1 or num_points < 2:
        raise InputError("FPD needs at least one batch and two batch sizes")
    if min(len(ref), len(gen)) < max_samples:
        raise InputError(f"FPD with max_samples={max_samples} needs at least that many showers per "
                         f"sample, got {len(ref)} reference and {len(gen)} generated; lower max_samples")
    if normalise:
        ref, gen = normalise_by_reference(ref, gen)
    # batch sizes evenly spaced in 1/N
    batch_sizes = (1 / np.linspace(1.0 / min_samples, 1.0 / max_samples, num_points)).astype("int32")
    rng = np.random.default_rng(seed)
    means = []
    for batch_size in batch_sizes:
        values = []
        for _ in range(num_batches):
            x = ref[rng.choice(len(ref), size=batch_size)]
            y = gen[rng.choice(len(gen), size=batch_size)]
            values.append(frechet_distance(np.mean(x, axis=0), np.cov(x, rowvar=False),
                                           np.mean(y, axis=0), np.cov(y, rowvar=False)))
        means.append(np.mean(values))
    params, covariance = curve_fit(_linear, 1 / batch_sizes, means, bounds=([0, 0], [np.inf, np.inf]))
    return PhysicsDistance(value=float(params[0]), error=float(np.sqrt(np.diag(covariance)[0])))


def _kernel_sum(a: np.ndarray, b: np.ndarray, degree: int, *, skip_diagonal: bool,
                block: int = 2048) -> float:
    """Sum of ``(a_i . b_j / d + 1)^degree`` over all pairs (without i == j if ``skip_diagonal``).

    Block-wise, so memory stays at ``block * len(b)`` kernel values.
    """
    gamma = 1.0 / a.shape[1]
    total = 0.0
    for start in range(0, len(a), block):
        kernel = (a[start:start + block] @ b.T * gamma + 1.0) ** degree
        total += kernel.sum()
        if skip_diagonal:
            rows = np.arange(len(kernel))
            total -= kernel[rows, rows + start].sum()
    return float(total)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int) -> float:
    """Unbiased quadratic-time MMD^2 estimate with the polynomial kernel."""
    m, n = len(x), len(y)
    return (_kernel_sum(x, x, degree, skip_diagonal=True) / (m * (m - 1))
            + _kernel_sum(y, y, degree, skip_diagonal=True) / (n * (n - 1))
            - 2.0 * _kernel_sum(x, y, degree, skip_diagonal=False) / (m * n))


def kernel_physics_distance(reference_features: np.ndarray, generated_features: np.ndarray, *,
                            num_batches: int = 10, batch_size: int = 10_000, normalise: bool = True,
                            seed: int = 42, degree: int = 4) -> PhysicsDistance:
    """KPD: median over batches of the unbiased polynomial-kernel MMD^2 (jetnet algorithm).

    Args:
        reference_features, generated_features: ``(N, d)`` features, reference first.
        num_batches: number of batches (jetnet and CaloChallenge: 10).
        batch_size: showers drawn (with replacement) per batch and sample (CaloChallenge: 10 000).
        normalise: divide by the reference maximum absolute value per feature first.
        seed: batch i uses ``numpy.random.default_rng(seed + 1000 i)``.
        degree: degree of the polynomial kernel (jetnet: 4).

    Returns:
        median and half the 16.275-83.725 percentile range of the batch values. Can be slightly
        negative for identical distributions (unbiased estimator).

    Raises:
        InputError: bad shapes, ``batch_size < 2``, or a sample smaller than ``batch_size``.
    """
    ref, gen = _pair(reference_features, generated_features)
    if batch_size < 2 or num_batches < 1:
        raise InputError(f"KPD needs batch_size >= 2 and at least one batch, got {batch_size}, {num_batches}")
    if min(len(ref), len(gen)) < batch_size:
        raise InputError(f"KPD with batch_size={batch_size} needs at least that many showers per sample, "
                         f"got {len(ref)} reference and {len(gen)} generated; lower batch_size")
    if normalise:
        ref, gen = normalise_by_reference(ref, gen)
    values = []
    for i in range(num_batches):
        rng = np.random.default_rng(seed + i * 1000)
        x = ref[rng.choice(len(ref), size=batch_size)]
        y = gen[rng.choice(len(gen), size=batch_size)]
        values.append(_mmd2_unbiased(x, y, degree))
    return PhysicsDistance(value=float(np.median(values)),
                           error=float(iqr(values, rng=(16.275, 83.725)) / 2))
