"""Tests of the GFlash parameterisation formulas against the simulator reference (§2.8, §3.5, §4, §8)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from caloadapt.simulate.gflash import (
    CONVERSION_DEPTH_MEAN_X0,
    GFlashMedium,
    average_profile,
    draw_conversion_depth,
    draw_moyal_weights,
    draw_pair_fraction,
    draw_profiles,
    draw_radius,
    fluctuate_sampling,
    individual_profile_moments,
    radial_parameters,
    radial_tau,
    spot_count,
    spot_profile,
)

# §2.8: homogeneous tungsten and the Par04 Si-W sampling cell (§1.3)
TUNGSTEN = GFlashMedium(z_eff=74.0, critical_energy_mev=8.00, sampling_frequency=None)
PAR04 = GFlashMedium(z_eff=72.49, critical_energy_mev=8.226, sampling_frequency=2.482, e_over_mip=0.704)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240607)


# --- medium ------------------------------------------------------------------------------------
def test_medium_kind_and_validation() -> None:
    assert not TUNGSTEN.is_sampling
    assert PAR04.is_sampling
    with pytest.raises(ValueError):
        GFlashMedium(z_eff=0.0, critical_energy_mev=8.0, sampling_frequency=None)
    with pytest.raises(ValueError):
        GFlashMedium(z_eff=74.0, critical_energy_mev=8.0, sampling_frequency=-1.0)
    with pytest.raises(ValueError):
        average_profile(TUNGSTEN, [10.0, 0.0])


# --- §2.8 reference tables ---------------------------------------------------------------------
# E [GeV]: <T_hom>, exp<ln T>, <alpha_hom>, sigma(ln T), sigma(ln alpha), rho
TUNGSTEN_TABLE = {
    1.0: (3.97, 4.02, 2.74, 0.214, 0.280, 0.594),
    10.0: (6.27, 6.32, 3.95, 0.132, 0.180, 0.541),
    50.0: (7.88, 7.93, 4.79, 0.104, 0.144, 0.504),
    100.0: (8.58, 8.62, 5.15, 0.095, 0.133, 0.488),
    1000.0: (10.88, 10.92, 6.36, 0.075, 0.105, 0.435),
}
# E [GeV]: <T_sam>, <alpha_sam>, sigma(ln T_sam), sigma(ln alpha_sam), rho_sam, mean of drawn T [est]
PAR04_TABLE = {
    1.0: (3.55, 2.55, 0.286, 0.336, 0.674, 3.66),
    10.0: (5.85, 3.76, 0.157, 0.209, 0.621, 5.94),
    100.0: (8.15, 4.97, 0.108, 0.151, 0.568, 8.22),
    1000.0: (10.46, 6.18, 0.082, 0.119, 0.515, 10.5),
}


@pytest.mark.parametrize("energy", sorted(TUNGSTEN_TABLE))
def test_homogeneous_tungsten_table(energy: float) -> None:
    t_avg, e_ln_t, alpha_avg, sig_t, sig_a, rho = TUNGSTEN_TABLE[energy]
    T, alpha = average_profile(TUNGSTEN, energy)
    m = individual_profile_moments(TUNGSTEN, energy)
    assert T == pytest.approx(t_avg, rel=0.01)
    assert np.exp(m.mean_ln_t) == pytest.approx(e_ln_t, rel=0.01)
    assert alpha == pytest.approx(alpha_avg, rel=0.01)
    assert m.sigma_ln_t == pytest.approx(sig_t, rel=0.01)
    assert m.sigma_ln_alpha == pytest.approx(sig_a, rel=0.01)
    assert m.rho == pytest.approx(rho, rel=0.01)


@pytest.mark.parametrize("energy", sorted(PAR04_TABLE))
def test_par04_sampling_table(energy: float) -> None:
    t_avg, alpha_avg, sig_t, sig_a, rho, _ = PAR04_TABLE[energy]
    T, alpha = average_profile(PAR04, energy)
    m = individual_profile_moments(PAR04, energy)
    assert T == pytest.approx(t_avg, rel=0.01)
    assert alpha == pytest.approx(alpha_avg, rel=0.01)
    assert m.sigma_ln_t == pytest.approx(sig_t, rel=0.01)
    assert m.sigma_ln_alpha == pytest.approx(sig_a, rel=0.01)
    assert m.rho == pytest.approx(rho, rel=0.01)


def test_profile_functions_broadcast_over_energies() -> None:
    energies = np.array(sorted(PAR04_TABLE))
    T, alpha = average_profile(PAR04, energies)
    m = individual_profile_moments(PAR04, energies)
    assert T.shape == alpha.shape == m.rho.shape == energies.shape
    np.testing.assert_allclose(T, [PAR04_TABLE[e][0] for e in energies], rtol=0.01)


# --- §2.5 correlated draw, checklist §8 item 5 -------------------------------------------------
@pytest.mark.parametrize("medium, sigma_ln_t, rho", [(TUNGSTEN, 0.132, 0.541), (PAR04, 0.157, 0.621)])
def test_drawn_log_moments_match(medium: GFlashMedium, sigma_ln_t: float, rho: float,
                                 rng: np.random.Generator) -> None:
    m = individual_profile_moments(medium, 10.0)
    T, alpha, beta = draw_profiles(medium, 10.0, rng, size=200_000)
    ln_t, ln_alpha = np.log(T), np.log(alpha)
    assert ln_t.mean() == pytest.approx(m.mean_ln_t, rel=0.01)
    assert ln_alpha.mean() == pytest.approx(m.mean_ln_alpha, rel=0.01)
    assert ln_t.std() == pytest.approx(m.sigma_ln_t, rel=0.01)
    assert ln_alpha.std() == pytest.approx(m.sigma_ln_alpha, rel=0.01)
    assert np.corrcoef(ln_t, ln_alpha)[0, 1] == pytest.approx(m.rho, rel=0.01)
    # and the moments themselves are the checklist numbers
    assert m.sigma_ln_t == pytest.approx(sigma_ln_t, rel=0.01)
    assert m.rho == pytest.approx(rho, rel=0.01)
    np.testing.assert_allclose(beta, (alpha - 1.0) / T)


def test_par04_mean_drawn_parameters(rng: np.random.Generator) -> None:
    T, alpha, _ = draw_profiles(PAR04, np.full(200_000, 10.0), rng)
    assert T.mean() == pytest.approx(PAR04_TABLE[10.0][5], rel=0.01)
    # §2.8 note: individual alpha (≈4.15) exceeds the average-profile <alpha_sam> = 3.76; keep it so
    assert alpha.mean() == pytest.approx(4.15, rel=0.01)
    assert alpha.mean() > average_profile(PAR04, 10.0)[1] + 0.3
    # log-normal mean exp(mu + sigma^2/2)
    m = individual_profile_moments(PAR04, 10.0)
    assert alpha.mean() == pytest.approx(np.exp(m.mean_ln_alpha + m.sigma_ln_alpha**2 / 2), rel=0.003)


@pytest.mark.parametrize("energy", [10.0, 100.0, 1000.0])
def test_par04_mean_drawn_depth_of_maximum(energy: float, rng: np.random.Generator) -> None:
    T, _, _ = draw_profiles(PAR04, energy, rng, size=100_000)
    assert T.mean() == pytest.approx(PAR04_TABLE[energy][5], rel=0.01)


def test_draws_are_reproducible_and_shaped() -> None:
    energies = np.array([1.0, 10.0, 100.0])
    a = draw_profiles(PAR04, energies, np.random.default_rng(7), size=(50, 3))
    b = draw_profiles(PAR04, energies, np.random.default_rng(7), size=(50, 3))
    for x, y in zip(a, b):
        assert x.shape == (50, 3)
        np.testing.assert_array_equal(x, y)
    # each column follows its own energy: depth of maximum grows with ln E
    assert np.all(np.diff(np.median(a[0], axis=0)) > 0)


# --- §2.6 guards -------------------------------------------------------------------------------
@pytest.mark.parametrize("medium", [TUNGSTEN, PAR04, GFlashMedium(63.1, 9.96, 0.801, 0.704)])
@pytest.mark.parametrize("energy", [0.001, 0.01, 0.05])
def test_guards_at_low_energy(medium: GFlashMedium, energy: float, rng: np.random.Generator) -> None:
    m = individual_profile_moments(medium, energy)
    for value in m:
        assert np.all(np.isfinite(value))
    assert np.all(m.sigma_ln_t <= 0.5) and np.all(m.sigma_ln_t > 0)
    assert np.all(m.sigma_ln_alpha <= 0.5) and np.all(m.sigma_ln_alpha > 0)
    assert np.all(np.abs(m.rho) < 1.0)

    T, alpha, beta = draw_profiles(medium, energy, rng, size=20_000)
    assert np.all(np.isfinite(T)) and np.all(np.isfinite(alpha)) and np.all(np.isfinite(beta))
    assert T.min() >= 0.1 and alpha.min() >= 1.1 and beta.min() > 0

    T_avg, alpha_avg = average_profile(medium, energy)
    assert T_avg >= 0.1 and alpha_avg >= 1.1

    alpha_spot, beta_spot = spot_profile(medium, energy)
    assert alpha_spot >= 1.1 and beta_spot > 0
    assert (alpha_spot - 1.0) / beta_spot >= 0.5 - 1e-12

    depth = np.linspace(0.0, 40.0, 81)
    tau = radial_tau(depth[:, None], T[None, :100], alpha[None, :100], m.mean_ln_alpha)
    assert np.all(np.isfinite(tau)) and np.all(tau >= 0)
    r_core, r_tail, p = radial_parameters(medium, energy, tau)
    assert np.all(np.isfinite(r_core)) and np.all(np.isfinite(r_tail))
    assert r_core.min() >= 1e-3 and r_tail.min() >= 1e-3
    assert p.min() >= 0.0 and p.max() <= 1.0


# --- §4.1/§4.2 spots ---------------------------------------------------------------------------
def test_spot_count() -> None:
    # §4.1: W gives ≈ 400 E^0.876 → 3.0k / 22.5k / 169k at 10 / 100 / 1000 GeV
    np.testing.assert_allclose(spot_count(TUNGSTEN, [10.0, 100.0, 1000.0], 0.13), [3.0e3, 22.5e3, 169e3],
                               rtol=0.01)
    # §4.1 sampling: (10.3/c) E^0.959, i.e. 79 E^0.959 for c = 0.13
    np.testing.assert_allclose(spot_count(PAR04, [1.0, 10.0], 0.13), [79.23, 79.23 * 10**0.959], rtol=1e-3)
    assert spot_count(PAR04, 10.0, 0.166) < spot_count(PAR04, 10.0, 0.13)


def test_spot_profile() -> None:
    # homogeneous W at 10 GeV: <T_hom> (0.698 + 0.00212 Z), <alpha_hom> (0.639 + 0.00334 Z) [hand-computed]
    alpha_spot, beta_spot = spot_profile(TUNGSTEN, 10.0)
    assert alpha_spot == pytest.approx(3.9477 * 0.88616, rel=1e-3)
    assert (alpha_spot - 1.0) / beta_spot == pytest.approx(6.2728 * 0.85488, rel=1e-3)
    # Par04 at 10 GeV: sampling factors (0.813 + 0.0019 Z), (0.844 + 0.0026 Z) on the homogeneous averages (§9)
    alpha_spot, beta_spot = spot_profile(PAR04, 10.0)
    assert alpha_spot == pytest.approx(4.0658, rel=1e-3)
    assert (alpha_spot - 1.0) / beta_spot == pytest.approx(5.9374, rel=1e-3)
    # the CMS option multiplies both factor sets on the sampling averages
    alpha_cms, beta_cms = spot_profile(PAR04, 10.0, cms_spot_factors=True)
    t_sam, a_sam = average_profile(PAR04, 10.0)
    assert alpha_cms == pytest.approx(a_sam * (0.639 + 0.00334 * 72.49) * (0.844 + 0.0026 * 72.49), rel=1e-9)
    t_cms = t_sam * (0.698 + 0.00212 * 72.49) * (0.813 + 0.0019 * 72.49)
    assert (alpha_cms - 1.0) / beta_cms == pytest.approx(t_cms, rel=1e-9)


# --- §3 radial profile -------------------------------------------------------------------------
def test_radial_tau_reduces_to_t_over_T_for_the_median_shower() -> None:
    m = individual_profile_moments(PAR04, 10.0)
    alpha_bar = np.exp(m.mean_ln_alpha)
    depth = np.array([0.0, 1.0, 5.0, 20.0])
    np.testing.assert_allclose(radial_tau(depth, 5.0, alpha_bar, m.mean_ln_alpha), depth / 5.0)
    # larger alpha at the same T puts the centre of gravity T alpha/(alpha-1) closer to T: larger tau
    assert radial_tau(5.0, 5.0, alpha_bar * 1.3, m.mean_ln_alpha) > 1.0


def test_radial_parameters_values() -> None:
    # hand-computed from §3.2 at tau = 1, E = 10 GeV
    r_core, r_tail, p = radial_parameters(TUNGSTEN, 10.0, 1.0)
    assert r_core == pytest.approx(0.12045, rel=1e-4)
    assert r_tail == pytest.approx(0.67745, rel=1e-4)
    assert p == pytest.approx(0.87901, rel=1e-4)
    # sampling corrections: R_C -0.0203(1-ê) + 0.0397 e^-1/F_s, with Z = 72.49 in the base formula
    r_core, r_tail, p = radial_parameters(PAR04, 10.0, 1.0)
    assert r_core == pytest.approx(0.12090, rel=1e-4)
    assert r_tail == pytest.approx(0.56999, rel=1e-4)
    assert p == pytest.approx(0.90523, rel=1e-4)
    # far tail stays finite (tau <= 10 in the k4 exponential); the homogeneous core weight vanishes,
    # the sampling one tends to 0.348 (1 - ê)
    r_core, r_tail, p = radial_parameters(PAR04, 10.0, np.array([50.0, 1e4]))
    assert np.all(np.isfinite(r_core)) and np.all(np.isfinite(r_tail))
    assert r_tail[0] == pytest.approx(r_tail[1])
    np.testing.assert_allclose(p, 0.348 * (1 - 0.704), rtol=1e-6)
    assert np.all(radial_parameters(TUNGSTEN, 10.0, np.array([50.0, 1e4]))[2] < 1e-6)


def test_draw_radius_follows_mixture_cdf(rng: np.random.Generator) -> None:
    n = 200_000
    r_core, r_tail, p = 0.15, 0.8, 0.7
    r = draw_radius(np.full(n, r_core), r_tail, p, rng)
    assert r.shape == (n,) and r.min() >= 0.0
    for x in (0.05, 0.15, 0.5, 1.0, 3.0):
        expected = p * x**2 / (x**2 + r_core**2) + (1 - p) * x**2 / (x**2 + r_tail**2)
        assert np.mean(r < x) == pytest.approx(expected, abs=0.004)
    # single component: median radius equals R
    assert np.median(draw_radius(np.full(n, 0.3), 1.0, 1.0, rng)) == pytest.approx(0.3, rel=0.01)


def _containment(medium: GFlashMedium, energy: float, rng: np.random.Generator, n: int = 200_000) -> np.ndarray:
    """Radii [R_M] of energy-weighted samples of whole showers: per-shower (T, alpha) drawn, depth from
    the shower's gamma profile, tau at that depth, radius from the §3 law (no read-out limits)."""
    m = individual_profile_moments(medium, energy)
    T, alpha, beta = draw_profiles(medium, energy, rng, size=n)
    depth = rng.gamma(alpha, 1.0 / beta)
    tau = radial_tau(depth, T, alpha, m.mean_ln_alpha)
    return draw_radius(*radial_parameters(medium, energy, tau), rng)


@pytest.mark.parametrize(
    "medium, energy, r90, frac1, frac2, frac35",
    [
        (PAR04, 10.0, 0.91, 0.911, 0.968, 0.988),
        (PAR04, 1000.0, 1.04, 0.895, 0.963, 0.986),
        (TUNGSTEN, 10.0, 1.08, 0.890, 0.960, 0.985),
    ],
)
def test_radial_containment(medium: GFlashMedium, energy: float, r90: float, frac1: float, frac2: float,
                            frac35: float, rng: np.random.Generator) -> None:
    r = _containment(medium, energy, rng)
    assert np.mean(r < 1.0) == pytest.approx(frac1, rel=0.03)
    assert np.mean(r < 2.0) == pytest.approx(frac2, rel=0.03)
    assert np.mean(r < 3.5) == pytest.approx(frac35, rel=0.01)
    assert np.quantile(r, 0.9) == pytest.approx(r90, rel=0.06)


# --- §2.7 photons ------------------------------------------------------------------------------
def test_conversion_depth(rng: np.random.Generator) -> None:
    t = draw_conversion_depth(200_000, rng)
    assert CONVERSION_DEPTH_MEAN_X0 == pytest.approx(1.286, abs=1e-3)
    assert t.min() >= 0.0
    assert t.mean() == pytest.approx(9 / 7, rel=0.01)
    assert t.std() == pytest.approx(9 / 7, rel=0.01)  # exponential: sigma = mean
    assert np.median(t) == pytest.approx(9 / 7 * np.log(2), rel=0.01)


def test_pair_fraction_bethe_heitler(rng: np.random.Generator) -> None:
    n = 400_000
    x = draw_pair_fraction(n, rng)
    assert x.shape == (n,)
    assert x.min() >= 1e-3 and x.max() <= 1 - 1e-3
    assert x.mean() == pytest.approx(0.5, abs=0.002)
    assert np.mean(x < 0.5) == pytest.approx(0.5, abs=0.003)  # symmetric under x -> 1 - x
    counts, edges = np.histogram(x, bins=20, range=(0.0, 1.0))
    centres = 0.5 * (edges[1:] + edges[:-1])
    # bin integral of p(x) = (1 - (4/3) x (1 - x)) * 9/7, exact for a quadratic with Simpson's rule
    lo, hi = edges[:-1], edges[1:]

    def pdf(u: np.ndarray) -> np.ndarray:
        return (1.0 - 4.0 / 3.0 * u * (1.0 - u)) * 9.0 / 7.0

    expected = n * (hi - lo) / 6.0 * (pdf(lo) + 4.0 * pdf(centres) + pdf(hi))
    assert np.max(np.abs(counts / expected - 1.0)) < 0.04
    # §2.7: E[x ln x + (1-x) ln(1-x)] = 2 * 9/7 * (-20/108) ≈ -0.48 (quoted as ≈ -0.5)
    assert np.mean(x * np.log(x) + (1 - x) * np.log(1 - x)) == pytest.approx(-2 * 9 / 7 * 20 / 108, rel=0.01)


def test_pair_fraction_small_batches(rng: np.random.Generator) -> None:
    assert draw_pair_fraction(0, rng).shape == (0,)
    assert draw_pair_fraction(1, rng).shape == (1,)


# --- §4.4 sampling fluctuation -----------------------------------------------------------------
@pytest.mark.parametrize("energy, c, resolution", [(1.0, 0.13, 0.13), (10.0, 0.13, 0.0411)])
def test_sampling_fluctuation_resolution(energy: float, c: float, resolution: float,
                                         rng: np.random.Generator) -> None:
    e = fluctuate_sampling(np.full(200_000, energy), c, rng)
    assert e.min() >= 0.0
    assert e.mean() == pytest.approx(energy, rel=0.003)
    assert e.std() / e.mean() == pytest.approx(resolution, rel=0.01)


def test_sampling_fluctuation_split_into_steps(rng: np.random.Generator) -> None:
    n_showers, n_steps, c = 20_000, 60, 0.13
    # uneven step energies of a 1 GeV shower, some steps empty
    weights = rng.gamma(0.5, 1.0, size=(n_showers, n_steps))
    weights[:, ::7] = 0.0
    steps = weights / weights.sum(axis=1, keepdims=True)
    fluctuated = fluctuate_sampling(steps, c, rng)
    assert np.all(fluctuated[steps == 0.0] == 0.0)
    totals = fluctuated.sum(axis=1)
    assert totals.mean() == pytest.approx(1.0, rel=0.005)
    assert totals.std() == pytest.approx(c, rel=0.02)
    # sums of gammas with a common scale are the single-step gamma: compare the whole distribution
    single = fluctuate_sampling(np.ones(n_showers), c, rng)
    assert stats.ks_2samp(totals, single).pvalue > 0.001


def test_sampling_fluctuation_zeros_and_broadcast(rng: np.random.Generator) -> None:
    e = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    out = fluctuate_sampling(e, np.array([0.1, 0.2, 0.3]), rng)
    assert out.shape == e.shape
    assert np.all(out[e == 0.0] == 0.0) and np.all(out[e > 0.0] > 0.0)
    assert np.all(fluctuate_sampling(np.zeros(5), 0.13, rng) == 0.0)


# --- §4.5 Moyal weights ------------------------------------------------------------------------
def test_moyal_weights_distribution(rng: np.random.Generator) -> None:
    sigma, n = 0.12, 200_000
    m = draw_moyal_weights(n, sigma, rng)
    assert m.shape == (n,)
    assert m.min() >= 0.05 and m.max() <= 50.0
    # unclipped for this width: the Moyal law with location 1 and scale sigma
    assert stats.kstest(m, stats.moyal(loc=1.0, scale=sigma).cdf).pvalue > 0.001
    # median 1 + sigma (-ln 0.4549), the median of chi^2(1); mean 1 + sigma (gamma_E + ln 2)
    assert np.median(m) == pytest.approx(1.0 + sigma * -np.log(stats.chi2(1).median()), abs=0.003)
    assert m.mean() == pytest.approx(1.0 + sigma * (np.euler_gamma + np.log(2.0)), abs=0.003)
    # positive skew: mode at 1 < median < mean
    counts, edges = np.histogram(m, bins=np.arange(0.5, 2.0, 0.02))
    mode = 0.5 * (edges[np.argmax(counts)] + edges[np.argmax(counts) + 1])
    assert mode == pytest.approx(1.0, abs=0.03)
    assert mode < np.median(m) < m.mean()


def test_moyal_weights_clipping(rng: np.random.Generator) -> None:
    m = draw_moyal_weights(100_000, 5.0, rng)
    assert m.min() == 0.05 and m.max() <= 50.0
    # the lower clip takes exactly the mass below 0.05: 1 + 5 X < 0.05 <=> Z^2 > exp(0.95/5)
    assert np.mean(m == 0.05) == pytest.approx(stats.chi2(1).sf(np.exp(0.95 / 5.0)), abs=0.005)
    assert np.all(draw_moyal_weights(1000, 0.0, rng) == 1.0)
