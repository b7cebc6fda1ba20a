"""The embedded physics simulator: GFlash showers in any geometry, as spots or digitised hits."""

from __future__ import annotations

from .engine import SimulationSettings, simulate_chunk
from .simulator import iter_simulate, simulate
from .spectrum import SPECTRA, parse_energy_range, sample_angles_deg, sample_incident_energies

__all__ = ["simulate", "iter_simulate", "simulate_chunk", "SimulationSettings",
           "SPECTRA", "parse_energy_range", "sample_incident_energies", "sample_angles_deg"]
