"""Incident-energy spectra (fixed, uniform, log-uniform, or a list of values) and incidence-angle samples."""

from __future__ import annotations

import numpy as np

from .._memory import check_memory
from ..errors import InputError

__all__ = ["SPECTRA", "parse_values", "parse_energy_range", "sample_incident_energies", "sample_angles_deg"]

SPECTRA = ("fixed", "uniform", "log-uniform", "list")


def parse_values(text: str, what: str, example: str, *, positive: bool) -> tuple[tuple[float, ...], str]:
    """Parse one value ``"50"``, a range ``"10:90"`` or a list ``"10,50,90"``.

    Returns the values and their kind, ``fixed``, ``range`` or ``list``. ``what`` names the
    quantity and ``example`` shows the three forms with their unit in error messages.
    """
    sep = ":" if ":" in text else ","
    try:
        values = tuple(float(v) for v in text.split(sep))
    except ValueError:
        raise InputError(f"cannot read {what} {text!r}; use {example}") from None
    if not values or any(not np.isfinite(v) for v in values):
        raise InputError(f"{what} must be finite numbers, got {text!r}")
    if positive and any(v <= 0 for v in values):
        raise InputError(f"{what} must be positive, got {text!r}")
    if sep == ":" and (len(values) != 2 or values[0] >= values[1]):
        raise InputError(f"a range of {what} needs MIN:MAX with MIN < MAX, got {text!r}")
    return values, "fixed" if len(values) == 1 else ("range" if sep == ":" else "list")


def parse_energy_range(text: str) -> tuple[float, ...]:
    """Parse ``"50"``, ``"10:90"`` (a range) or ``"10,50,90"`` (a list) of energies in GeV."""
    return parse_values(text, "energies", "50, 10:90 or 10,50,90 (GeV)", positive=True)[0]


#: memory held per shower for a whole run of simulate or generate: its incident energy and two angles,
#: with the working copies made while drawing and checking them (float64 each)
BYTES_PER_SHOWER = 64


def sample_incident_energies(n: int, energies_gev: tuple[float, ...], spectrum: str,
                             rng: np.random.Generator) -> np.ndarray:
    """``(n,)`` incident energies in MeV.

    Args:
        n: number of showers.
        energies_gev: one value (fixed), (min, max) for a uniform or log-uniform range, or the
            values of a list (each shower draws one of them uniformly).
        spectrum: one of :data:`SPECTRA`.
        rng: random generator.
    """
    if n < 0:
        raise InputError(f"number of showers must be >= 0, got {n}")
    check_memory(BYTES_PER_SHOWER * n, f"--n {n:,}: the incident energies and angles of {n:,} showers",
                 per_item_bytes=BYTES_PER_SHOWER, items="showers")
    values = np.asarray(energies_gev, dtype=np.float64)
    if spectrum == "fixed" or len(values) == 1:
        if len(values) != 1:
            raise InputError("a fixed spectrum takes one energy, e.g. --energy 50")
        gev = np.full(n, values[0])
    elif spectrum == "uniform":
        gev = rng.uniform(values.min(), values.max(), n)
    elif spectrum == "log-uniform":
        gev = np.exp(rng.uniform(np.log(values.min()), np.log(values.max()), n))
    elif spectrum == "list":
        gev = rng.choice(values, n)
    else:
        raise InputError(f"unknown spectrum {spectrum!r}; expected one of {', '.join(SPECTRA)}")
    return 1000.0 * gev


def sample_angles_deg(n: int, text: str, name: str, rng: np.random.Generator) -> np.ndarray:
    """``(n,)`` incidence angles in degrees from ``"90"``, ``"40:140"`` (uniform in the angle) or ``"40,90,140"``
    (each shower draws one of the values); ``name`` (``theta``, ``phi``) names the option in errors."""
    values, kind = parse_values(text, f"{name} angles", "90, 40:140 or 40,90,140 (degrees)", positive=False)
    if kind == "fixed":
        return np.full(n, values[0])
    if kind == "range":
        return rng.uniform(values[0], values[1], n)
    return rng.choice(np.asarray(values), n)
