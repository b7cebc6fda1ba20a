"""Angle conditioning: showers about their axis, the direction as a condition, generation at any angle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from caloadapt.cli import app
from caloadapt.data import read_showers, write_showers
from caloadapt.errors import InputError
from caloadapt.geometry import get_geometry
from caloadapt.incidence import local_direction
from caloadapt.models import ModelConfig, ShowerModel, load_model
from caloadapt.models.representation import (DepthGrid, PointFrame, along_axis, axis_slope, direction_condition,
                                             shower_statistics)
from caloadapt.models.shower_model import shower_condition
from caloadapt.simulate import simulate
from caloadapt.train import TrainConfig, train
from conftest import generate_both_ways, same_hits

TINY = dict(widths=(16, 16), time_dim=8, flow_hidden=(16,), flow_transforms=1, depth_given=True,
            transverse_scale_rm=0.2)
THETA = np.array([50.0, 130.0, 70.0, 90.0])  # inclinations 40, 40, 20 and 0 degrees along the beam axis


@pytest.fixture(scope="module")
def inclined(tmp_path_factory) -> tuple[Path, object]:
    geometry = get_geometry("ild-ecal")
    showers = simulate(geometry, "photon", np.full(4, 30e3), theta_deg=THETA, phi_deg=np.full(4, 90.0), seed=5)
    path = tmp_path_factory.mktemp("angular") / "inclined.h5"
    write_showers(path, showers)
    return path, showers


def test_the_direction_condition_and_the_axis_slope():
    ild, mesh = get_geometry("ild-ecal"), get_geometry("generic-mesh")
    theta, phi = np.array([90.0, 50.0, 90.0]), np.array([90.0, 90.0, 135.0])  # normal, along the beam, face normal
    condition = direction_condition(ild, theta, phi)
    np.testing.assert_array_equal(condition[[0, 2]], 0.0)  # exactly normal: 135 degrees faces an octagon side
    np.testing.assert_allclose(condition[1], local_direction(50.0, 90.0, 8)[:2])
    slope = axis_slope(ild, theta, phi)
    np.testing.assert_allclose(slope[1], [0.0, np.tan(np.radians(40.0))], atol=1e-12)
    assert not np.any(axis_slope(mesh, theta, phi))  # a mesh along the particle holds showers about the axis
    points = np.array([[1.0, 2.0, 100.0, 5.0]])
    np.testing.assert_allclose(along_axis(along_axis(points, slope[1:2]), slope[1:2], -1.0), points)
    assert along_axis(points, slope[:1]) is points  # nothing to move at normal incidence


def test_features_and_the_flows_centre_of_gravity_are_about_the_axis(inclined):
    """An inclined shower's layers lie along z tan(i); its features and its flow statistics do not,
    and features turned back into points and put on the axis give the hits again."""
    _, showers = inclined
    geometry = get_geometry("ild-ecal")
    tan = np.tan(np.radians(np.abs(90.0 - THETA)))
    frame = PointFrame(geometry, "physical", 0.2, layer_depth=True)
    features = frame.to_features(showers)
    layer = geometry.layer_index(showers.points[:, 2])
    energy = np.repeat(showers.incident_energy_mev, showers.n_points)
    back = frame.to_points(features, layer, energy)
    slope = axis_slope(geometry, showers.theta_deg, showers.phi_deg)[showers.shower_index]
    np.testing.assert_allclose(along_axis(back, slope)[:, :2], showers.points[:, :2], rtol=1e-4, atol=1e-3)

    stats = shower_statistics(geometry, showers, np.random.default_rng(0), DepthGrid())
    about_axis_mm = stats[:, -2:] * geometry.moliere_radius_mm
    assert np.all(np.abs(about_axis_mm) < 3.0)  # within a few mm of the axis
    depth = np.bincount(showers.shower_index, showers.points[:, 3] * showers.points[:, 2]) / showers.energy_sum_mev
    detector_cog_y = np.bincount(showers.shower_index, showers.points[:, 3] * showers.points[:, 1]) \
        / showers.energy_sum_mev
    # in the detector frame the centre of gravity sits tan(i) x depth off the impact point (tens of mm)
    np.testing.assert_allclose(np.abs(detector_cog_y), tan * depth, rtol=0.05, atol=1.0)
    assert np.abs(detector_cog_y[:3]).min() > 10 * np.abs(about_axis_mm[:3]).max()


def test_the_condition_holds_the_direction_only_when_asked():
    geometry = get_geometry("ild-ecal")
    energy, n, angles = np.full(2, 2e4), np.full(2, 500), (np.array([50.0, 90.0]), np.array([90.0, 90.0]))
    plain = shower_condition(energy, n, geometry, ModelConfig(), angles_deg=angles)
    told = shower_condition(energy, n, geometry, ModelConfig(angle_conditioning=True), angles_deg=angles)
    assert plain.shape == (2, 2) and told.shape == (2, 4) == (2, ModelConfig(angle_conditioning=True).condition_dim)
    np.testing.assert_allclose(told[:, 2:], direction_condition(geometry, *angles))
    assert ModelConfig(angle_conditioning=True).flow_condition_dim == 3  # energy and direction


@pytest.fixture(scope="module")
def angular_model(inclined, tmp_path_factory) -> Path:
    """A tiny angle-conditioned model trained for a few steps on the inclined showers."""
    path, _ = inclined
    out = tmp_path_factory.mktemp("angular_run")
    torch.manual_seed(0)
    train(ShowerModel(ModelConfig(angle_conditioning=True, **TINY)), path, get_geometry("ild-ecal"), out,
          TrainConfig(steps=3, batch_size=2, max_points=64, val_every=3, checkpoint_every=3, warmup_steps=1,
                      device="cpu", occupancy_showers=2), progress=False)
    return out / "best.pt"


def test_an_angular_model_trains_and_generates_showers_along_their_axis(angular_model, tmp_path):
    """Trained on inclined showers (a few steps), the model is told the direction and generates at the
    angles asked for: the showers carry them and every point is moved onto the axis, by tan(i) x its
    depth; a checkpoint without angle conditioning refuses inclined generation with a clear error."""
    geometry = get_geometry("ild-ecal")
    model, sampler = load_model(angular_model)
    assert model.config.angle_conditioning and geometry.name in model.occupancy
    theta = np.array([50.0, 130.0])
    contexts = []
    inner = model.denoiser

    class Spy(torch.nn.Module):
        def forward(self, x, sigma, context, mask=None):
            contexts.append(context.clone())
            return inner(x, sigma, context, mask)

    def generate(**patch):
        with pytest.MonkeyPatch.context() as monkey:
            for name, value in patch.items():
                monkey.setattr(f"caloadapt.models.shower_model.{name}", value)
            return model.generate(geometry, np.full(2, 30e3), sampler.with_steps(3), theta_deg=theta, phi_deg=90.0,
                                  generator=torch.Generator().manual_seed(0), particle="photon", denoiser=Spy())

    showers = generate()
    np.testing.assert_array_equal(showers.theta_deg, theta)
    np.testing.assert_array_equal(showers.phi_deg, 90.0)
    assert np.all(np.isfinite(showers.points))
    told = contexts[0][:, 2:4].numpy()  # (energy, points, direction): the network is told the direction
    np.testing.assert_allclose(np.sort(told, axis=0), np.sort(direction_condition(geometry, theta, np.full(2, 90.0)),
                                                                axis=0), atol=1e-6)
    # the same draw left about the axis: every point moved by tan(i) x its depth along the lean, nothing else
    about_axis = generate(along_axis=lambda points, slope, sign=1.0: points)
    slope = axis_slope(geometry, showers.theta_deg, showers.phi_deg)[showers.shower_index]
    np.testing.assert_allclose(showers.points[:, :3] - about_axis.points[:, :3],
                               np.c_[slope * showers.points[:, 2:3], np.zeros(len(slope))], atol=1e-3)
    assert np.abs(slope[:, 1]).max() == pytest.approx(np.tan(np.radians(40.0)))

    # hits generated directly (one grouping into cells) are the digitised points, inclined too
    same_hits(*generate_both_ways(model, geometry, sampler.with_steps(3), theta_deg=np.linspace(45, 135, 5),
                                   phi_deg=np.linspace(0, 300, 5)))

    # the exported network takes the direction with the rest of the condition: the same showers
    pytest.importorskip("onnxruntime")
    from caloadapt.export.onnx import export_onnx, onnx_model

    view = onnx_model(model, export_onnx(model, tmp_path / "net.onnx"), threads=1)
    through_onnx = view.generate(geometry, np.full(2, 30e3), sampler.with_steps(3), theta_deg=theta, phi_deg=90.0,
                                 generator=torch.Generator().manual_seed(0), particle="photon")
    np.testing.assert_array_equal(through_onnx.n_points, showers.n_points)
    np.testing.assert_allclose(through_onnx.points[:, :3], showers.points[:, :3], atol=0.05)

    plain, plain_sampler = load_model(angular_model)
    object.__setattr__(plain.config, "angle_conditioning", False)  # as a checkpoint without the option
    with pytest.raises(InputError, match="without angle conditioning"):
        plain.generate(geometry, np.full(2, 30e3), plain_sampler.with_steps(2), theta_deg=theta)
    with pytest.raises(InputError, match="theta"):
        model.generate(geometry, np.full(2, 30e3), sampler.with_steps(2), theta_deg=0.0)


def test_generate_takes_the_angles_of_the_reference_and_refuses_them_for_a_normal_model(inclined, tmp_path,
                                                                                        tiny_checkpoints):
    runner = CliRunner()
    path, _ = inclined
    refused = runner.invoke(app, ["generate", "--checkpoint", str(tiny_checkpoints[0]), "-g", "ild-ecal",
                                  "--energies-from", str(path), "--device", "cpu", "-o", str(tmp_path / "no.h5")])
    assert refused.exit_code == 2 and "without angle conditioning" in refused.stderr
    assert not (tmp_path / "no.h5").exists()
    normal = runner.invoke(app, ["generate", "--checkpoint", str(tiny_checkpoints[0]), "-g", "ild-ecal", "--n", "2",
                                 "--energy", "20", "--theta", "90", "--device", "cpu", "-o", str(tmp_path / "ok.h5")])
    assert normal.exit_code == 0, normal.output + (normal.stderr or "")
    assert len(read_showers(tmp_path / "ok.h5")) == 2
    # --n with --energies-from takes the file's first n showers, as simulate does; more than it holds is refused
    source = read_showers(path)
    first = runner.invoke(app, ["generate", "--checkpoint", str(tiny_checkpoints[0]), "-g", "ild-ecal", "--n", "2",
                                "--energies-from", str(path), "--theta", "90", "--phi", "90", "--steps", "2",
                                "--device", "cpu", "-o", str(tmp_path / "first.h5")])
    assert first.exit_code == 0, first.output + (first.stderr or "")
    np.testing.assert_array_equal(read_showers(tmp_path / "first.h5").incident_energy_mev,
                                  source.incident_energy_mev[:2])
    too_many = runner.invoke(app, ["generate", "--checkpoint", str(tiny_checkpoints[0]), "-g", "ild-ecal", "--n",
                                   str(len(source) + 1), "--energies-from", str(path), "--theta", "90", "--phi", "90",
                                   "--device", "cpu", "-o", str(tmp_path / "many.h5")])
    assert too_many.exit_code == 2 and "fewer than --n" in too_many.stderr and not (tmp_path / "many.h5").exists()


def test_the_benchmark_times_inclined_showers_with_an_angular_model_only(tiny_checkpoints, angular_model, tmp_path):
    from caloadapt.benchmark import run_benchmark

    report = run_benchmark(angular_model, tmp_path / "a.json", quick=True, device="cpu", threads=(1,), theta_deg=50.0,
                           n_steps=2, repeats=1, batch_sizes=(2,), scan_energies_gev=(1.0,), scan_batch=1, onnx=False)
    assert report["settings"]["theta_deg"] == 50.0
    assert {"simulator", "heun"} <= {r["case"] for r in report["results"] if "ms_per_shower" in r}

    with pytest.raises(InputError, match="without angle conditioning"):
        run_benchmark(tiny_checkpoints[0], tmp_path / "b.json", quick=True, device="cpu", threads=(1,),
                      theta_deg=50.0, onnx=False)
    assert not (tmp_path / "b.json").exists()
