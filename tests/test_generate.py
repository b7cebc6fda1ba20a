"""Batched, seeded generation: order, reproducibility, digitisation, the sampler handed in."""

from __future__ import annotations

import numpy as np
import pytest

from caloadapt.generate import iter_generate
from caloadapt.geometry import get_geometry
from caloadapt.models import Sampler, load_model
from conftest import ENERGIES_MEV, generate_both_ways, same_hits

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


@pytest.mark.parametrize("name", ["ild-ecal", "calochallenge-3"])
def test_generating_hits_directly_gives_the_digitised_points(tiny_checkpoints, name):
    """generate(digitise=True) groups the points into cells once (for the last energy calibration and the
    hits): the same hits, and the same energy outside the readout, as digitising the generated points."""
    model, sampler = load_model(tiny_checkpoints[0])
    hits, digitised = generate_both_ways(model, get_geometry(name), sampler.with_steps(2))
    assert len(hits.points) > 0 and "outside_energy_mev" in hits.meta
    same_hits(hits, digitised)


def test_a_depth_given_model_generates_each_point_in_the_layer_the_flow_gives_it(tmp_path):
    """With ``depth_given`` the network is handed, at every evaluation, the depth of the layer each
    point is to be in (layers in order, as many points as the flow asks for), and the model trains
    and survives a checkpoint round trip."""
    import torch

    from caloadapt.data import write_showers
    from caloadapt.models import ModelConfig, ShowerModel
    from caloadapt.simulate import simulate
    from caloadapt.train import TrainConfig, train

    geometry = get_geometry("ild-ecal")
    data = tmp_path / "ild.h5"
    write_showers(data, simulate(geometry, "photon", np.full(12, 20e3), seed=3))
    torch.manual_seed(0)
    config = ModelConfig(depth_given=True, widths=(16, 16), time_dim=8, flow_hidden=(16,), flow_transforms=1)
    train(ShowerModel(config), data, geometry, tmp_path / "run",
          TrainConfig(steps=3, batch_size=4, max_points=32, val_every=3, checkpoint_every=3, warmup_steps=1,
                      device="cpu", occupancy_showers=0), progress=False)
    model, sampler = load_model(tmp_path / "run" / "best.pt")
    assert model.config.depth_given and model.denoiser.given_channels == (2,)

    seen = []
    inner = model.denoiser

    class Spy(torch.nn.Module):
        def forward(self, x, sigma, context, mask=None):
            seen.append((x[..., 2].clone(), mask))
            return inner(x, sigma, context, mask)

    showers = model.generate(geometry, np.array([15e3, 25e3]), sampler.with_steps(2), occupancy=None,
                             generator=torch.Generator().manual_seed(0), denoiser=Spy())
    assert len(seen) == 3  # Heun, 2 steps (the fast path may hand the showers in another order)
    layer = geometry.layer_index(showers.points[:, 2])
    expected = (geometry.stack.x0_at(geometry.layer_centres_mm[layer]) - float(model.point_mean[2])) / float(
        model.point_std[2])
    per_shower = sorted((expected[showers.offsets[i]:showers.offsets[i + 1]] for i in range(2)), key=len)
    for depth, mask in seen:
        rows = sorted((d[m].numpy() for d, m in zip(depth, mask)), key=len)
        assert [len(r) for r in rows] == [len(r) for r in per_shower]
        for got, want in zip(rows, per_shower):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert all(np.all(np.diff(layer[showers.offsets[i]:showers.offsets[i + 1]]) >= 0) for i in range(2))


def test_a_shower_depth_conditioned_model_is_told_the_flows_longitudinal_centre(tmp_path):
    """With ``shower_depth_condition`` training batches carry each shower's energy-weighted mean layer
    depth (X0 / 20), the flow is not told it (it generates the layer energies), and in generation the
    network is handed the depth of the flow's own layer energies."""
    import torch

    from caloadapt.data import read_showers, write_showers
    from caloadapt.models import ModelConfig, ShowerModel
    from caloadapt.simulate import simulate
    from caloadapt.train import TrainConfig, train
    from caloadapt.train.data import make_batch

    geometry = get_geometry("ild-ecal")
    data = tmp_path / "ild.h5"
    write_showers(data, simulate(geometry, "photon", np.array([10e3, 20e3, 40e3, 80e3] * 3), seed=3))
    config = ModelConfig(depth_given=True, shower_depth_condition=True, widths=(16, 16), time_dim=8,
                         flow_hidden=(16,), flow_transforms=1)
    assert config.condition_dim == 3 and config.flow_condition_dim == 1

    showers = read_showers(data, geometry)
    batch = make_batch(showers, geometry, config, np.random.default_rng(0), max_points=32)
    depth_x0 = geometry.stack.x0_at(showers.points[:, 2])  # hits sit at layer centres
    weight = showers.points[:, 3]
    expected = np.bincount(showers.shower_index, weight * depth_x0) / np.bincount(showers.shower_index, weight)
    np.testing.assert_allclose(batch.condition[:, 2].numpy(), expected / 20.0, rtol=1e-5)
    assert 0.2 < expected.mean() / 20.0 < 0.6  # ILD photons peak near 7 X0
    torch.manual_seed(0)
    train(ShowerModel(config), data, geometry, tmp_path / "run",
          TrainConfig(steps=3, batch_size=4, max_points=32, val_every=3, checkpoint_every=3, warmup_steps=1,
                      device="cpu", occupancy_showers=0), progress=False)
    model, sampler = load_model(tmp_path / "run" / "best.pt")
    assert model.config.shower_depth_condition

    flow_layers, contexts = [], []
    sample_layers = model._sample_layers
    model._sample_layers = lambda *a: flow_layers.append(sample_layers(*a)) or flow_layers[-1]
    inner = model.denoiser

    class Spy(torch.nn.Module):
        def forward(self, x, sigma, context, mask=None):
            contexts.append(context.clone())
            return inner(x, sigma, context, mask)

    model.generate(geometry, np.array([15e3, 60e3]), sampler.with_steps(1), occupancy=None,
                   generator=torch.Generator().manual_seed(0), denoiser=Spy())
    _, (_, layer_energy, _) = flow_layers[0]
    layer_depth = geometry.stack.x0_at(geometry.layer_centres_mm)
    want = sorted(layer_energy @ layer_depth / layer_energy.sum(axis=1) / 20.0)
    for context in contexts:  # the fast path may hand the showers in another order
        np.testing.assert_allclose(sorted(context[:, 2].numpy()), want, rtol=1e-5)


def test_the_centre_of_gravity_shift_ignores_points_beyond_the_readout():
    """A stray point far outside the readout (never read out) must not drag the shower after it."""
    from caloadapt.models.shower_model import _shift_centre_of_gravity

    geometry = get_geometry("ild-ecal")
    rm = geometry.layer_moliere_radius_mm[3]
    inside = np.array([[4.0, 0.0], [-2.0, 0.0], [-2.0, 0.0]])  # centre of gravity on the axis
    stray = [[1.5 * geometry.readout.max_radius_mm, 0.0]]
    points = np.zeros((4, 4))
    points[:, :2] = np.concatenate([inside, stray])
    points[:, 2] = geometry.layer_centres_mm[3]
    points[:, 3] = [1.0, 1.0, 1.0, 0.5]
    cog = np.array([[0.5, 0.0]])  # the flow's centre, Moliere units
    _shift_centre_of_gravity(points, np.zeros(4, np.int64), np.full(4, 3), cog, geometry)
    np.testing.assert_allclose(points[:3, 0], inside[:, 0] + 0.5 * rm)
    np.testing.assert_allclose(points[:3, 1], 0.0)
