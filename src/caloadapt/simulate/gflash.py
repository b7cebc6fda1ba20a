"""GFlash parameterisation of electromagnetic showers: vectorised profile, spot and fluctuation formulas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "GFlashMedium",
    "ProfileMoments",
    "log_y",
    "average_profile",
    "individual_profile_moments",
    "draw_profiles",
    "spot_profile",
    "spot_count",
    "radial_tau",
    "radial_parameters",
    "draw_radius",
    "draw_conversion_depth",
    "draw_pair_fraction",
    "fluctuate_sampling",
    "draw_moyal_weights",
    "CONVERSION_DEPTH_MEAN_X0",
]

# --- guards (simulator reference §2.6, §3.2, §4.2) ---------------------------------------------
_LOG_ARG_MIN = 0.1        # §2.6: arguments of the logs in <ln T>, <ln alpha> clamped to >= 0.1
_SIGMA_DENOM_MIN = 2.0    # §2.6: sigma = 1/max(denominator, 2), i.e. sigma <= 0.5
_RHO_MAX = 0.99           # §2.6: rho clipped to (-0.99, 0.99)
_ALPHA_MIN = 1.1          # §2.6: alpha >= 1.1 after the draw (a gamma profile needs alpha > 1)
_T_MIN = 0.1              # §2.6: T >= 0.1 X0 after the draw
_ALPHA_SPOT_MIN = 1.1     # §4.2: alpha_spot >= 1.1
_T_SPOT_MIN = 0.5         # §4.2: T_spot >= 0.5 (Geant4 sampling value)
_RADIUS_MIN = 1e-3        # §3.2: R_C, R_T floored at 1e-3 R_M
_TAU_TAIL_MAX = 10.0      # §3.2: exp(k4 (tau - k2)) evaluated with tau <= 10 (as CMS) against overflow

#: mean photon conversion depth in X0 (simulator reference §2.7, Geant4 GenerateExponential)
CONVERSION_DEPTH_MEAN_X0 = 9.0 / 7.0


@dataclass(frozen=True)
class GFlashMedium:
    """Effective medium parameters that enter the GFlash formulas (simulator reference §1.2, §1.3).

    Attributes:
        z_eff: effective (mass-weighted) atomic number.
        critical_energy_mev: E_c from the GFlash formula with X0 in g/cm^2, in MeV.
        sampling_frequency: F_s = X0_eff / D of one sampling cell; ``None`` for a homogeneous medium.
        e_over_mip: e-hat of the sampling shape corrections (0.704 for Si-W); ignored when homogeneous.
    """

    z_eff: float
    critical_energy_mev: float
    sampling_frequency: float | None = None
    e_over_mip: float = 1.0

    def __post_init__(self) -> None:
        if not self.z_eff > 0:
            raise ValueError(f"z_eff must be positive, got {self.z_eff}")
        if not self.critical_energy_mev > 0:
            raise ValueError(f"critical_energy_mev must be positive, got {self.critical_energy_mev}")
        if self.sampling_frequency is not None and not self.sampling_frequency > 0:
            raise ValueError(f"sampling_frequency must be positive or None, got {self.sampling_frequency}")
        if not self.e_over_mip > 0:
            raise ValueError(f"e_over_mip must be positive, got {self.e_over_mip}")

    @property
    def is_sampling(self) -> bool:
        """True for a sampling calorimeter, i.e. when the §2.4/§3.2 sampling corrections apply."""
        return self.sampling_frequency is not None


class ProfileMoments(NamedTuple):
    """Log-normal parameters of (ln T, ln alpha) of individual showers (simulator reference §2.3, §2.4)."""

    mean_ln_t: np.ndarray
    sigma_ln_t: np.ndarray
    mean_ln_alpha: np.ndarray
    sigma_ln_alpha: np.ndarray
    rho: np.ndarray


# --- helpers -----------------------------------------------------------------------------------
def _energy(energy_gev: ArrayLike) -> np.ndarray:
    """Energies as a float array; GFlash takes logs of them, so they must be positive."""
    e = np.asarray(energy_gev, dtype=np.float64)
    if np.any(~(e > 0)):
        raise ValueError("GFlash energies must be positive and finite (GeV)")
    return e


def log_y(medium: GFlashMedium, energy_gev: ArrayLike) -> np.ndarray:
    """ln y with y = E / E_c, E in GeV converted to MeV to match E_c (simulator reference §0, §2.2)."""
    return np.log(1000.0 * _energy(energy_gev) / medium.critical_energy_mev)


def _sampling_terms(medium: GFlashMedium) -> tuple[float, float]:
    """(1/F_s, 1 - e-hat) of the sampling corrections (simulator reference §2.4, §3.2)."""
    assert medium.sampling_frequency is not None
    return 1.0 / medium.sampling_frequency, 1.0 - medium.e_over_mip


def _homogeneous_average(z: float, lny: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """<T_hom>, <alpha_hom> of the average profile (simulator reference §2.2), unguarded."""
    t_hom = lny - 0.858                               # §2.2
    alpha_hom = 0.21 + (0.492 + 2.38 / z) * lny       # §2.2
    return t_hom, alpha_hom


def _inverse_sigma(denominator: np.ndarray) -> np.ndarray:
    """sigma = 1/max(denominator, 2): the fitted sigmas diverge at low y (simulator reference §2.6)."""
    return 1.0 / np.maximum(denominator, _SIGMA_DENOM_MIN)


# --- longitudinal profile ----------------------------------------------------------------------
def average_profile(medium: GFlashMedium, energy_gev: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Average-profile depth of maximum <T> [X0] and shape <alpha> (simulator reference §2.2, §2.4).

    Sampling media get the §2.4 shifts. The §2.6 floors (T >= 0.1, alpha >= 1.1) are applied so the
    result is always a valid gamma profile; they only act well below 1 GeV.
    """
    lny = log_y(medium, energy_gev)
    t_avg, alpha_avg = _homogeneous_average(medium.z_eff, lny)
    if medium.is_sampling:
        inv_fs, one_minus_ehat = _sampling_terms(medium)
        t_avg = t_avg - 0.59 * inv_fs - 0.53 * one_minus_ehat   # §2.4
        alpha_avg = alpha_avg - 0.444 * inv_fs                  # §2.4
    return np.maximum(t_avg, _T_MIN), np.maximum(alpha_avg, _ALPHA_MIN)


def individual_profile_moments(medium: GFlashMedium, energy_gev: ArrayLike) -> ProfileMoments:
    """Means, widths and correlation of (ln T, ln alpha) of individual showers.

    Simulator reference §2.3 (homogeneous), §2.4 (sampling) and the §2.6 guards.
    """
    lny = log_y(medium, energy_gev)
    z = medium.z_eff
    # homogeneous medians exp<ln T>, exp<ln alpha>, log arguments clamped (§2.3, §2.6)
    t_median = np.maximum(lny - 0.812, _LOG_ARG_MIN)                          # §2.3
    alpha_median = np.maximum(0.81 + (0.458 + 2.26 / z) * lny, _LOG_ARG_MIN)  # §2.3
    if medium.is_sampling:
        inv_fs, one_minus_ehat = _sampling_terms(medium)
        t_median = np.maximum(t_median - 0.55 * inv_fs - 0.69 * one_minus_ehat, _LOG_ARG_MIN)  # §2.4
        alpha_median = np.maximum(alpha_median - 0.476 * inv_fs, _LOG_ARG_MIN)  # §2.4, /F_s (§9)
        sigma_ln_t = _inverse_sigma(-2.5 + 1.25 * lny)       # §2.4
        sigma_ln_alpha = _inverse_sigma(-0.82 + 0.79 * lny)  # §2.4
        rho = 0.784 - 0.023 * lny                            # §2.4
    else:
        sigma_ln_t = _inverse_sigma(-1.4 + 1.26 * lny)       # §2.3
        sigma_ln_alpha = _inverse_sigma(-0.58 + 0.86 * lny)  # §2.3
        rho = 0.705 - 0.023 * lny                            # §2.3
    return ProfileMoments(
        mean_ln_t=np.log(t_median),
        sigma_ln_t=sigma_ln_t,
        mean_ln_alpha=np.log(alpha_median),
        sigma_ln_alpha=sigma_ln_alpha,
        rho=np.clip(rho, -_RHO_MAX, _RHO_MAX),
    )


def draw_profiles(medium: GFlashMedium, energy_gev: ArrayLike, rng: np.random.Generator,
                  size: int | tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw per-shower (T, alpha, beta) from the correlated log-normal (simulator reference §2.5, §2.6).

    One draw per element of ``energy_gev``; ``size`` broadcasts the energies to a larger shape
    (e.g. many showers of one energy). Returns depth of maximum T [X0], alpha and beta = (alpha-1)/T.
    """
    m = individual_profile_moments(medium, energy_gev)
    shape = np.shape(m.mean_ln_t)
    if size is not None:
        shape = np.broadcast_shapes(shape, (size,) if isinstance(size, int) else tuple(size))
    z1 = rng.standard_normal(shape)
    z2 = rng.standard_normal(shape)
    # c+- = sqrt((1 +- rho)/2) make corr(ln T, ln alpha) = rho exactly (§2.5)
    c_plus = np.sqrt(0.5 * (1.0 + m.rho))
    c_minus = np.sqrt(0.5 * (1.0 - m.rho))
    t_max = np.exp(m.mean_ln_t + m.sigma_ln_t * (c_plus * z1 + c_minus * z2))
    alpha = np.exp(m.mean_ln_alpha + m.sigma_ln_alpha * (c_plus * z1 - c_minus * z2))
    t_max = np.maximum(t_max, _T_MIN)
    alpha = np.maximum(alpha, _ALPHA_MIN)
    return t_max, alpha, (alpha - 1.0) / t_max


# --- spots -------------------------------------------------------------------------------------
def spot_profile(medium: GFlashMedium, energy_gev: ArrayLike,
                 *, cms_spot_factors: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Gamma parameters (alpha_spot, beta_spot) of the spot depth density (simulator reference §4.2, §9).

    Built from the average profile. Sampling media use the sampling factors times <T_hom>, <alpha_hom>
    (Geant4 tuning-class constants, §9). ``cms_spot_factors=True`` instead multiplies the homogeneous
    and sampling factors on the medium's own average <T>, <alpha>, as CMS FastSim does.
    """
    lny = log_y(medium, energy_gev)
    z = medium.z_eff
    t_hom, alpha_hom = _homogeneous_average(z, lny)
    hom_t_factor = 0.698 + 0.00212 * z     # §4.2 homogeneous
    hom_alpha_factor = 0.639 + 0.00334 * z  # §4.2 homogeneous
    if not medium.is_sampling:
        t_spot, alpha_spot = t_hom * hom_t_factor, alpha_hom * hom_alpha_factor
    else:
        sam_t_factor = 0.813 + 0.0019 * z     # §4.2 sampling
        sam_alpha_factor = 0.844 + 0.0026 * z  # §4.2 sampling
        if cms_spot_factors:
            t_avg, alpha_avg = average_profile(medium, energy_gev)
            t_spot = t_avg * hom_t_factor * sam_t_factor
            alpha_spot = alpha_avg * hom_alpha_factor * sam_alpha_factor
        else:
            t_spot, alpha_spot = t_hom * sam_t_factor, alpha_hom * sam_alpha_factor
    t_spot = np.maximum(t_spot, _T_SPOT_MIN)
    alpha_spot = np.maximum(alpha_spot, _ALPHA_SPOT_MIN)
    return alpha_spot, (alpha_spot - 1.0) / t_spot


def spot_count(medium: GFlashMedium, energy_gev: ArrayLike, sampling_term: float) -> np.ndarray:
    """Expected number of spots N_spot of a shower (simulator reference §4.1, §9).

    Homogeneous: 93 ln(Z) E^0.876; sampling: (10.3/c) E^0.959 with c the stochastic term in sqrt(GeV).
    ``sampling_term`` is ignored for a homogeneous medium.
    """
    e = _energy(energy_gev)
    if medium.is_sampling:
        if not sampling_term > 0:
            raise ValueError(f"sampling_term must be positive for a sampling medium, got {sampling_term}")
        return 10.3 / sampling_term * e ** 0.959              # §4.1 sampling (CMS), §9
    return 93.0 * np.log(medium.z_eff) * e ** 0.876            # §4.1 homogeneous


# --- radial profile ----------------------------------------------------------------------------
def radial_tau(depth_x0: ArrayLike, T: ArrayLike, alpha: ArrayLike, mean_ln_alpha: ArrayLike) -> np.ndarray:
    """Depth in units of the average-shower T, tau = t / T_ref (simulator reference §3.3).

    T_ref = T alpha/(alpha-1) (abar-1)/abar maps the shower's own centre of gravity to an average shower,
    with abar = exp<ln alpha>. abar is floored at the §2.6 alpha floor (1.1) so T_ref stays positive for
    very soft sub-showers.
    """
    t = np.asarray(depth_x0, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    alpha_bar = np.maximum(np.exp(np.asarray(mean_ln_alpha, dtype=np.float64)), _ALPHA_MIN)
    t_ref = T * alpha / (alpha - 1.0) * (alpha_bar - 1.0) / alpha_bar
    return t / t_ref


def radial_parameters(medium: GFlashMedium, energy_gev: ArrayLike,
                      tau: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Core and tail radii R_C, R_T [Moliere radii] and core weight p at depth tau (simulator reference §3.2).

    Includes the sampling corrections for sampling media and the §3.2 guards.
    """
    ln_e = np.log(_energy(energy_gev))
    # negative depths are unphysical and would overflow the k3 exponential
    tau = np.maximum(np.asarray(tau, dtype=np.float64), 0.0)
    z = medium.z_eff

    z1 = 0.0251 + 0.00319 * ln_e              # §3.2
    z2 = 0.1162 - 0.000381 * z                # §3.2
    r_core = z1 + z2 * tau

    k1 = 0.659 - 0.00309 * z                  # §3.2
    k2 = 0.645                                # §3.2
    k3 = -2.59                                # §3.2
    k4 = 0.3585 + 0.0421 * ln_e               # §3.2, CMS slope 0.0421 (§9)
    r_tail = k1 * (np.exp(k3 * (tau - k2)) + np.exp(k4 * (np.minimum(tau, _TAU_TAIL_MAX) - k2)))

    p1 = 2.632 - 0.00094 * z                  # §3.2, 2.632 (§9)
    p2 = 0.401 + 0.00187 * z                  # §3.2
    p3 = 1.313 - 0.0686 * ln_e                # §3.2
    arg = (p2 - tau) / p3
    p_core = p1 * np.exp(arg - np.exp(arg))

    if medium.is_sampling:
        inv_fs, one_minus_ehat = _sampling_terms(medium)
        exp_tau = np.exp(-tau)
        r_core = r_core - 0.0203 * one_minus_ehat + 0.0397 * exp_tau * inv_fs                      # §3.2
        r_tail = r_tail - 0.14 * one_minus_ehat - 0.495 * exp_tau * inv_fs                         # §3.2
        p_core = p_core + one_minus_ehat * (0.348 - 0.642 * np.exp(-(tau - 1.0) ** 2) * inv_fs)    # §3.2

    return (np.maximum(r_core, _RADIUS_MIN), np.maximum(r_tail, _RADIUS_MIN), np.clip(p_core, 0.0, 1.0))


def draw_radius(R_C: ArrayLike, R_T: ArrayLike, p: ArrayLike, rng: np.random.Generator) -> np.ndarray:
    """Draw radii [Moliere radii] from the core/tail mixture by inversion (simulator reference §3.1).

    Each component has CDF r^2/(r^2 + R^2), so r = R sqrt(u/(1-u)); core is chosen with probability p.
    """
    r_core, r_tail, p_core = np.broadcast_arrays(np.asarray(R_C, np.float64), np.asarray(R_T, np.float64),
                                                 np.asarray(p, np.float64))
    is_core = rng.random(r_core.shape) < p_core
    u = rng.random(r_core.shape)  # in [0, 1), so 1 - u > 0
    return np.where(is_core, r_core, r_tail) * np.sqrt(u / (1.0 - u))


# --- photons -----------------------------------------------------------------------------------
def draw_conversion_depth(n: int, rng: np.random.Generator) -> np.ndarray:
    """Photon conversion depths [X0], Exponential with mean 9/7 X0 (simulator reference §2.7)."""
    return rng.exponential(CONVERSION_DEPTH_MEAN_X0, size=n)


def draw_pair_fraction(n: int, rng: np.random.Generator) -> np.ndarray:
    """Electron energy fraction x of a pair, p(x) ∝ 1 - (4/3) x (1-x) (simulator reference §2.7).

    Vectorised rejection sampling (acceptance 7/9, proposals oversampled 2x), clipped to [1e-3, 1-1e-3]
    so the soft partner keeps a usable energy.
    """
    out = np.empty(n, dtype=np.float64)
    filled = 0
    while filled < n:
        need = n - filled
        x = rng.random(2 * need + 16)
        accepted = x[rng.random(x.size) < 1.0 - (4.0 / 3.0) * x * (1.0 - x)][:need]
        out[filled:filled + accepted.size] = accepted
        filled += accepted.size
    return np.clip(out, 1e-3, 1.0 - 1e-3)  # §2.7 clip


# --- fluctuations ------------------------------------------------------------------------------
def fluctuate_sampling(energy_gev: ArrayLike, sampling_term: ArrayLike, rng: np.random.Generator) -> np.ndarray:
    """Sampling fluctuation E' ~ Gamma(shape=E/c^2, scale=c^2), E in GeV (simulator reference §4.4).

    Mean E and variance c^2 E, so sums over steps fluctuate with exactly sigma/E = c/sqrt(E).
    Non-positive energies (empty steps) are returned as zero.
    """
    e, c = np.broadcast_arrays(np.asarray(energy_gev, np.float64), np.asarray(sampling_term, np.float64))
    out = np.zeros(e.shape, dtype=np.float64)
    deposit = e > 0
    if np.any(deposit):
        c2 = c[deposit] ** 2
        if np.any(~(c2 > 0)):
            raise ValueError("sampling_term must be positive")
        out[deposit] = rng.gamma(e[deposit] / c2, c2)
    return out


def draw_moyal_weights(n: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Landau-like spot weights m = 1 + sigma (-ln Z^2), Z ~ N(0,1), clipped to [0.05, 50].

    Simulator reference §4.5.

    -ln Z^2 is Moyal distributed with mode 0, so m has its mode at 1 and a long upper tail.
    """
    if not sigma >= 0:
        raise ValueError(f"sigma must be non-negative, got {sigma}")
    z = rng.standard_normal(n)
    # floor Z^2 so Z == 0 gives a large finite value (removed by the clip) instead of inf
    m = 1.0 + sigma * (-np.log(np.maximum(z * z, np.finfo(np.float64).tiny)))
    return np.clip(m, 0.05, 50.0)  # §4.5 clip
