"""One-dimensional distances between a reference and a generated sample, and how to aggregate them.

All functions take the **reference (Geant4) sample first** and the generated sample second.

- :func:`normalised_wasserstein`: W1 divided by the reference standard deviation, the per-observable
  score of CaloTransfer (docs/scoring.md §1.2).
- :func:`geometric_mean`, :func:`geometric_mean_uncertainty`: the published aggregation over
  observables (docs/scoring.md §1.4), used for every aggregation in caloadapt (the published table fell back
  to an arithmetic mean through a positional-argument bug, docs/scoring.md §1.5).
- :class:`GroupedWasserstein`: the same W1, sorted once and re-evaluated in O(n) under re-weighting
  of whole showers, which is what a shower-level bootstrap needs.
- :func:`bootstrap`: mean and standard deviation of any two-sample score under resampling.
- :func:`kl_divergence`: the secondary CaloTransfer score (docs/scoring.md §1.3).
- :func:`density_histogram`, :func:`separation_power`: the CaloChallenge histogram conventions and
  its "chi2", the triangular discrimination of eq. 15 of arXiv:2009.03796 (docs/scoring.md §2.4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..errors import InputError

__all__ = [
    "normalised_wasserstein",
    "geometric_mean",
    "geometric_mean_uncertainty",
    "GroupedWasserstein",
    "BootstrapResult",
    "bootstrap",
    "equal_probability_edges",
    "kl_divergence",
    "density_histogram",
    "separation_power",
    "histogram_separation_power",
    "GEOMETRIC_MEAN_EPSILON",
    "KL_EPSILON",
    "SEPARATION_POWER_EPSILON",
]

#: added to each value before the logarithm of the geometric mean (docs/scoring.md §1.4: log10(y + 1e-10))
GEOMETRIC_MEAN_EPSILON = 1e-10
#: added to each normalised bin count before the KL divergence (docs/scoring.md §1.3)
KL_EPSILON = 1e-6
#: guard in the denominator of the separation power (CaloChallenge evaluate_plotting_helper.py)
SEPARATION_POWER_EPSILON = 1e-16


def _sample(values: np.ndarray, name: str) -> np.ndarray:
    """A non-empty, finite, one-dimensional float64 sample."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        array = array.reshape(-1)
    if array.size == 0:
        raise InputError(f"{name} sample is empty")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} sample contains NaN or infinite values")
    return array


def _weights(weights: np.ndarray | None, n: int, name: str) -> np.ndarray | None:
    if weights is None:
        return None
    array = np.asarray(weights, dtype=np.float64).reshape(-1)
    if array.shape != (n,):
        raise InputError(f"{name} weights have {array.size} entries for {n} values")
    if np.any(array < 0) or not np.all(np.isfinite(array)) or array.sum() <= 0:
        raise InputError(f"{name} weights must be finite, non-negative and not all zero")
    return array


def _reference_spread(reference: np.ndarray, weights: np.ndarray | None) -> float:
    if weights is None:
        if reference.size < 2:
            raise InputError("the reference sample needs at least 2 values for its standard deviation")
        return float(np.std(reference, ddof=1))
    mean = np.average(reference, weights=weights)
    return float(np.sqrt(np.average((reference - mean) ** 2, weights=weights)))


def normalised_wasserstein(reference: np.ndarray, generated: np.ndarray, *,
                           reference_weights: np.ndarray | None = None,
                           generated_weights: np.ndarray | None = None) -> float:
    """Wasserstein-1 distance between two 1D samples divided by the reference standard deviation.

    ``W~ = W1(reference, generated) / s_ref`` (docs/scoring.md §1.2), with ``W1`` from
    :func:`scipy.stats.wasserstein_distance`. ``s_ref`` is the sample standard deviation (ddof=1)
    of the unweighted reference, or the weighted population standard deviation (ddof=0) when
    ``reference_weights`` is given, as CaloTransfer does for its weighted radial profile. The result
    is dimensionless and independent of the unit and scale of the observable.

    Args:
        reference: reference (Geant4) values, any shape (flattened).
        generated: generated values, same unit.
        reference_weights: optional non-negative weights of the reference values.
        generated_weights: optional non-negative weights of the generated values.

    Raises:
        InputError: a sample is empty or not finite, weights do not match, or the reference has
            zero spread (the normalised distance is then undefined).
    """
    ref = _sample(reference, "reference")
    gen = _sample(generated, "generated")
    ref_w = _weights(reference_weights, ref.size, "reference")
    gen_w = _weights(generated_weights, gen.size, "generated")
    spread = _reference_spread(ref, ref_w)
    if spread <= 0:
        raise InputError("the reference sample has zero spread; its normalised Wasserstein distance "
                         "is undefined")
    return float(stats.wasserstein_distance(ref, gen, ref_w, gen_w)) / spread


def geometric_mean(values: np.ndarray, *, epsilon: float = GEOMETRIC_MEAN_EPSILON) -> float:
    """Geometric mean ``G = 10^(mean(log10(y + epsilon)))`` of non-negative scores.

    This is the published CaloTransfer aggregate over observables (docs/scoring.md §1.4), with the
    same ``epsilon = 1e-10`` that keeps an exactly-zero score finite.

    Raises:
        InputError: no values, or a value that is negative or not finite.
    """
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise InputError("geometric mean of no values")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise InputError("geometric mean needs finite, non-negative values")
    return float(10.0 ** np.mean(np.log10(array + epsilon)))


def geometric_mean_uncertainty(values: np.ndarray, errors: np.ndarray, *,
                               epsilon: float = GEOMETRIC_MEAN_EPSILON) -> float:
    """Published error of the geometric mean: ``sigma_G = G * sqrt(sum((sigma_m / y_m)^2)) / M``.

    Linear propagation for M independent scores ``y_m`` with errors ``sigma_m`` (docs/scoring.md §1.4).
    A bootstrap of the geometric mean itself (see
    :func:`caloadapt.evaluate.observables.calotransfer_scores`) does not assume independence.
    """
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    s = np.asarray(errors, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise InputError(f"{y.size} values but {s.size} errors")
    g = geometric_mean(y, epsilon=epsilon)
    return float(g * np.sqrt(np.sum((s / (y + epsilon)) ** 2)) / y.size)


class GroupedWasserstein:
    """Normalised W1 between two samples whose entries belong to groups (showers), re-weightable.

    Both samples are merged and sorted once; :meth:`normalised` then evaluates

        W1 = sum_i |F(x_i) - G(x_i)| (x_{i+1} - x_i)

    (the integral of the difference of the two empirical CDFs, the same formula as
    :func:`scipy.stats.wasserstein_distance`) for any non-negative weight per group in O(n). With
    integer multiplicities from resampling showers with replacement, this is the W1 of the
    bootstrap sample without re-sorting, and every entry of a shower (e.g. all its cells in the
    pooled cell-energy spectrum) moves together.

    The normalisation is the reference standard deviation with frequency weights,
    ``sum w (x - mean)^2 / (sum w - 1)``, which is the ddof=1 standard deviation of the resampled
    reference and equals :func:`normalised_wasserstein` when all weights are 1.

    Args:
        reference: 1D reference values.
        generated: 1D generated values.
        reference_groups: group (shower) index of each reference value, ``0 <= g < n_reference_groups``;
            default: each value is its own group.
        generated_groups: the same for the generated values.
        n_reference_groups, n_generated_groups: number of groups (default: max index + 1).
    """

    def __init__(self, reference: np.ndarray, generated: np.ndarray, *,
                 reference_groups: np.ndarray | None = None, generated_groups: np.ndarray | None = None,
                 n_reference_groups: int | None = None, n_generated_groups: int | None = None) -> None:
        ref = _sample(reference, "reference")
        gen = _sample(generated, "generated")
        ref_groups = self._groups(reference_groups, ref.size, n_reference_groups, "reference")
        gen_groups = self._groups(generated_groups, gen.size, n_generated_groups, "generated")
        self.n_reference_groups = int(ref_groups.max()) + 1 if n_reference_groups is None \
            else int(n_reference_groups)
        self.n_generated_groups = int(gen_groups.max()) + 1 if n_generated_groups is None \
            else int(n_generated_groups)
        values = np.concatenate([ref, gen])
        order = np.argsort(values, kind="stable")
        self._sorted = values[order]
        self._deltas = np.diff(self._sorted)
        is_reference = order < ref.size
        groups = np.concatenate([ref_groups, gen_groups])[order]
        self._reference_positions = np.flatnonzero(is_reference)
        self._generated_positions = np.flatnonzero(~is_reference)
        self._reference_sorted_groups = groups[self._reference_positions]
        self._generated_sorted_groups = groups[self._generated_positions]
        self._reference = ref
        self._reference_groups = ref_groups

    @staticmethod
    def _groups(groups: np.ndarray | None, n: int, n_groups: int | None, name: str) -> np.ndarray:
        if groups is None:
            return np.arange(n, dtype=np.int64)
        array = np.asarray(groups).reshape(-1)
        if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer):
            raise InputError(f"{name} groups must be {n} integers, one per value")
        if array.min() < 0 or (n_groups is not None and array.max() >= n_groups):
            raise InputError(f"{name} group indices out of range")
        return array.astype(np.int64, copy=False)

    def normalised(self, reference_group_weights: np.ndarray | None = None,
                   generated_group_weights: np.ndarray | None = None) -> float:
        """Normalised W1 with the given weight per group (default: all 1, the plain samples).

        Returns NaN when the (weighted) reference has zero spread or a sample has zero total weight.
        """
        ref_w = self._group_weights(reference_group_weights, self.n_reference_groups)
        gen_w = self._group_weights(generated_group_weights, self.n_generated_groups)
        w_entry = np.zeros(self._sorted.size)
        g_entry = np.zeros(self._sorted.size)
        w_entry[self._reference_positions] = ref_w[self._reference_sorted_groups]
        g_entry[self._generated_positions] = gen_w[self._generated_sorted_groups]
        total_ref, total_gen = w_entry.sum(), g_entry.sum()
        if total_ref <= 1 or total_gen <= 0:
            return float("nan")
        cdf_ref = np.cumsum(w_entry[:-1]) / total_ref
        cdf_gen = np.cumsum(g_entry[:-1]) / total_gen
        w1 = float(np.sum(np.abs(cdf_ref - cdf_gen) * self._deltas))
        weights = ref_w[self._reference_groups]
        mean = np.sum(weights * self._reference) / total_ref
        spread = np.sqrt(np.sum(weights * (self._reference - mean) ** 2) / (total_ref - 1))
        return w1 / spread if spread > 0 else float("nan")

    @staticmethod
    def _group_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
        if weights is None:
            return np.ones(n)
        array = np.asarray(weights, dtype=np.float64).reshape(-1)
        if array.shape != (n,):
            raise InputError(f"expected {n} group weights, got {array.size}")
        return array


@dataclass(frozen=True)
class BootstrapResult:
    """A score on the full samples and its spread under resampling.

    Attributes:
        value: the score of the full (not resampled) samples.
        mean: mean of the score over the resamples.
        std: standard deviation (ddof=1) over the resamples: the quoted uncertainty.
        samples: the score of each resample.
    """

    value: float
    mean: float
    std: float
    samples: np.ndarray


def bootstrap(score: Callable[[np.ndarray, np.ndarray], float], reference: np.ndarray,
              generated: np.ndarray, *, n_resamples: int = 100, seed: int = 0) -> BootstrapResult:
    """Bootstrap a two-sample score by resampling both samples (rows, with replacement).

    Each resample draws ``len(reference)`` rows of the reference and ``len(generated)`` rows of the
    generated sample from one :class:`numpy.random.Generator` seeded with ``seed``, and evaluates
    ``score(reference_resample, generated_resample)``.

    Raises:
        InputError: an empty sample or fewer than 2 resamples.
    """
    ref = np.asarray(reference)
    gen = np.asarray(generated)
    if ref.ndim == 0 or gen.ndim == 0 or len(ref) == 0 or len(gen) == 0:
        raise InputError("bootstrap needs two non-empty samples")
    if n_resamples < 2:
        raise InputError(f"bootstrap needs at least 2 resamples, got {n_resamples}")
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    for i in range(n_resamples):
        values[i] = score(ref[rng.integers(0, len(ref), len(ref))],
                          gen[rng.integers(0, len(gen), len(gen))])
    return BootstrapResult(value=float(score(ref, gen)), mean=float(np.mean(values)),
                           std=float(np.std(values, ddof=1)), samples=values)


def equal_probability_edges(reference: np.ndarray, n_bins: int = 30) -> np.ndarray:
    """Bin edges at the reference quantiles k/n_bins, with the outer edges at -inf and +inf.

    The CaloTransfer KL binning (docs/scoring.md §1.3). Repeated quantiles (a reference with many equal
    values, e.g. empty layers) are merged, so fewer than ``n_bins`` bins may result.
    """
    ref = _sample(reference, "reference")
    if n_bins < 1:
        raise InputError(f"need at least one bin, got {n_bins}")
    inner = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
    return np.concatenate([[-np.inf], inner, [np.inf]])


def kl_divergence(reference: np.ndarray, generated: np.ndarray, bins: int | np.ndarray = 30, *,
                  epsilon: float = KL_EPSILON) -> float:
    """KL divergence ``KL(P_ref || P_gen)`` of the two samples histogrammed on common bins.

    As published (docs/scoring.md §1.3): with an integer ``bins``, the edges are the reference quantiles
    (:func:`equal_probability_edges`); p and q are the normalised counts, each bin plus
    ``epsilon = 1e-6`` so that empty generated bins stay finite, and
    ``KL = sum p ln(p / q)`` in nats (:func:`scipy.stats.entropy`, which renormalises p and q after
    the epsilon is added). Explicit ``bins`` edges are used as given; values outside them drop out.

    Raises:
        InputError: an empty or non-finite sample, or no entries inside the bins.
    """
    ref = _sample(reference, "reference")
    gen = _sample(generated, "generated")
    edges = equal_probability_edges(ref, int(bins)) if np.ndim(bins) == 0 \
        else np.asarray(bins, dtype=np.float64)
    p, _ = np.histogram(ref, edges)
    q, _ = np.histogram(gen, edges)
    if p.sum() == 0 or q.sum() == 0:
        raise InputError("no entries inside the KL bins")
    p = p / p.sum() + epsilon
    q = q / q.sum() + epsilon
    return float(stats.entropy(p, q))


def density_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Histogram normalised to unit integral over ``edges``, with the CaloChallenge conventions.

    As ``plt.hist(..., density=True)`` in the official evaluation (numpy's ``density=True``): the
    last bin includes its right edge, entries outside ``[edges[0], edges[-1]]`` drop out of both the
    counts and the normalisation, and the result is ``counts / width / counts.sum()`` (all NaN when no
    entry lies inside the range, as in numpy).
    """
    counts, _ = np.histogram(np.asarray(values).reshape(-1), edges)
    return density_of_counts(counts, edges)


def density_of_counts(counts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """numpy's density normalisation of integer counts: ``n / db / n.sum()``."""
    widths = np.array(np.diff(edges), float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / widths / counts.sum()


def separation_power(reference_hist: np.ndarray, generated_hist: np.ndarray,
                     bin_edges: np.ndarray | None = None) -> float:
    """Separation power ``S = 1/2 sum_i (h_i - g_i)^2 / (h_i + g_i)`` of two unit-sum histograms.

    The CaloChallenge "chi2" (eq. 15 of arXiv:2009.03796; docs/scoring.md §2.4): 0 for identical
    histograms, 1 for disjoint supports. With ``bin_edges`` the inputs are densities (as from
    :func:`density_histogram`) and are first multiplied by the bin widths; without, they must already
    be per-bin probabilities. The denominator carries the official guard ``+ 1e-16``. A NaN
    histogram (no entry in range) gives NaN, as in the official code.
    """
    h = np.asarray(reference_hist, dtype=np.float64)
    g = np.asarray(generated_hist, dtype=np.float64)
    if h.shape != g.shape or h.ndim != 1:
        raise InputError(f"histograms must be 1D of equal length, got {h.shape} and {g.shape}")
    if bin_edges is not None:
        widths = np.diff(np.asarray(bin_edges, dtype=np.float64))
        if widths.shape != h.shape:
            raise InputError(f"{h.size} bins but {widths.size + 1} bin edges")
        h, g = h * widths, g * widths
    return float(0.5 * np.sum((h - g) ** 2 / (h + g + SEPARATION_POWER_EPSILON)))


def histogram_separation_power(reference: np.ndarray, generated: np.ndarray,
                               edges: np.ndarray) -> float:
    """Separation power of two samples histogrammed on ``edges`` (official conventions)."""
    edges = np.asarray(edges, dtype=np.float64)
    return separation_power(density_histogram(reference, edges), density_histogram(generated, edges),
                            edges)
