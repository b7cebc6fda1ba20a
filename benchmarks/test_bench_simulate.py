"""Simulator throughput (pytest-benchmark; not part of the test suite).

Run: ``OMP_NUM_THREADS=1 python -m pytest benchmarks --benchmark-enable``.
Target (foundation issue): >= 500 showers/s for 50 GeV photons in ild-ecal on one core.
"""

from __future__ import annotations

import numpy as np
import pytest

from caloadapt.simulate import simulate


@pytest.mark.parametrize(("geometry", "particle", "energy_gev", "n"), [
    ("ild-ecal", "photon", 50.0, 500),
    ("calochallenge-3", "electron", 10.0, 200),
    ("calochallenge-3", "electron", 1000.0, 10),
])
def test_simulate_throughput(benchmark, geometry, particle, energy_gev, n):
    energies = np.full(n, 1000.0 * energy_gev)
    showers = benchmark(simulate, geometry, particle, energies, seed=1)
    assert len(showers) == n
    benchmark.extra_info["showers_per_call"] = n
