"""Batched, seeded generation: order, reproducibility, digitisation, the sampler handed in."""

from __future__ import annotations

import numpy as np

from caloadapt.generate import iter_generate
from caloadapt.geometry import get_geometry
from caloadapt.models import Sampler, load_model

ENERGIES_MEV = np.array([12e3, 30e3, 18e3, 25e3, 15e3])


def test_batches_come_in_order_and_repeat_with_the_seed(tiny_checkpoints):
    model, sampler = load_model(tiny_checkpoints[0])
    geometry = get_geometry("ild-ecal")

    def run(seed: int, chosen: Sampler = sampler.with_steps(2)):
        return list(iter_generate(model, geometry, ENERGIES_MEV, chosen, particle="photon", seed=seed, batch_size=2))

    a, b, c = run(1), run(1), run(2)
    assert [len(x) for x in a] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([x.incident_energy_mev for x in a]), ENERGIES_MEV)
    assert all(x.particle == "photon" and x.geometry == "ild-ecal" for x in a)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.points, y.points)
    assert any(not np.array_equal(x.points, y.points) for x, y in zip(a, c))
    other_steps = run(1, sampler.with_steps(3))
    assert any(not np.array_equal(x.points, y.points) for x, y in zip(a, other_steps))


def test_digitised_showers_are_cells_above_threshold(tiny_checkpoints):
    model, sampler = load_model(tiny_checkpoints[0])
    geometry = get_geometry("calochallenge-3")
    raw = next(iter_generate(model, geometry, ENERGIES_MEV, sampler.with_steps(2), digitise=False))
    hits = next(iter_generate(model, geometry, ENERGIES_MEV, sampler.with_steps(2), digitise=True))
    np.testing.assert_allclose(np.unique(raw.points[:, 2]), np.unique(geometry.layer_centres_mm[
        geometry.layer_index(raw.points[:, 2])]))  # raw points sit at layer centres
    assert np.all(hits.points[:, 3] >= geometry.energy.threshold_mev)
    cells = geometry.cell_index(hits.points)
    assert np.all(cells >= 0)
    for i in range(len(hits)):  # one point per hit cell
        one = cells[hits.offsets[i]:hits.offsets[i + 1]]
        assert len(np.unique(one)) == len(one)
