"""Incident-energy bins (the decades of the CaloChallenge ``avg-E`` mode) and incidence-angle bins.

The official evaluation (CaloChallenge/homepage ``code/evaluate.py``, mode ``avg-E``) splits
Datasets 2 and 3 into the decades 10^3-10^4, 10^4-10^5 and 10^5-10^6 MeV of incident energy and
selects ``E_lo <= E_inc < E_hi`` in each (docs/scoring.md §2.1). caloadapt closes the last
bin by default, ``[10^5, 10^6]``, so that a shower at exactly 1 TeV (the top of the log-uniform
range) is not lost; ``closed_last=False`` reproduces the official half-open bins exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError

__all__ = ["ENERGY_DECADES_MEV", "energy_bin_masks", "energy_bin_label", "THETA_BIN_DEG", "theta_bin_masks",
           "theta_bin_label"]

#: decade edges of incident energy in MeV for Datasets 2 and 3: 1 GeV, 10 GeV, 100 GeV, 1 TeV
ENERGY_DECADES_MEV: tuple[float, ...] = (1e3, 1e4, 1e5, 1e6)


def energy_bin_masks(incident_energy_mev: np.ndarray,
                     edges_mev: Sequence[float] = ENERGY_DECADES_MEV, *,
                     closed_last: bool = True) -> list[tuple[float, float, np.ndarray]]:
    """Boolean masks selecting the showers of each incident-energy bin.

    Args:
        incident_energy_mev: ``(N,)`` or ``(N, 1)`` incident energies in MeV.
        edges_mev: increasing bin edges in MeV (default: the three decades of 1 GeV-1 TeV).
        closed_last: include the upper edge in the last bin (official ``avg-E``: False).

    Returns:
        ``[(low_mev, high_mev, mask), ...]``, one entry per bin, mask of shape ``(N,)``.
    """
    energy = np.asarray(incident_energy_mev, dtype=np.float64).reshape(-1)
    edges = np.asarray(edges_mev, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise InputError("energy bin edges must be at least two increasing values")
    bins = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        upper = energy <= high if (closed_last and i == edges.size - 2) else energy < high
        bins.append((float(low), float(high), (energy >= low) & upper))
    return bins


def energy_bin_label(low_mev: float, high_mev: float) -> str:
    """A short label of an energy bin in GeV, e.g. ``'1-10 GeV'``."""
    return f"{low_mev / 1e3:g}-{high_mev / 1e3:g} GeV"


#: width of the bins of the polar angle theta in which inclined showers are scored, degrees
THETA_BIN_DEG = 20.0


def theta_bin_masks(theta_deg: np.ndarray, width_deg: float = THETA_BIN_DEG
                    ) -> list[tuple[float, float, np.ndarray]]:
    """Masks of the showers in bins of ``width_deg`` of the polar angle theta (degrees).

    The edges are multiples of the width covering the angles present; each bin is ``[low, high)``
    except the last, which is closed. Normal incidence (theta 90) falls in the bin starting at 80
    with the default width. Returns ``[(low_deg, high_deg, mask), ...]`` as :func:`energy_bin_masks`.
    """
    theta = np.asarray(theta_deg, dtype=np.float64).reshape(-1)
    if not width_deg > 0:
        raise InputError(f"the theta bin width must be positive, got {width_deg}")
    if theta.size == 0:
        return []
    low = np.floor(theta.min() / width_deg) * width_deg
    n_bins = max(int(np.ceil((theta.max() - low) / width_deg)), 1)
    return energy_bin_masks(theta, low + width_deg * np.arange(n_bins + 1))


def theta_bin_label(low_deg: float, high_deg: float) -> str:
    """A short label of a theta bin, e.g. ``'theta 40-60 deg'``."""
    return f"theta {low_deg:g}-{high_deg:g} deg"
