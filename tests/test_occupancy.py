"""Occupancy calibration: the map, its fit on training showers, checkpoints, every generation path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from caloadapt.data import write_showers
from caloadapt.geometry import get_geometry
from caloadapt.models import ModelConfig, Sampler, ShowerModel, load_model
from caloadapt.models.occupancy import OccupancyCalibration, fit_occupancy, layer_counts, stochastic_round
from caloadapt.simulate import simulate
from caloadapt.models.checkpoint import inference_checkpoint
from caloadapt.train import TrainConfig, load_checkpoint, model_from_checkpoint, split_indices, train

TINY = ModelConfig(widths=(32, 32), time_dim=16, flow_hidden=(32,), flow_transforms=2)


def test_stochastic_round_keeps_the_mean():
    values = np.full(20000, 2.3)
    rounded = stochastic_round(values, np.random.default_rng(0))
    assert set(np.unique(rounded)) == {2, 3}
    assert rounded.mean() == pytest.approx(2.3, abs=0.02)


def test_uniform_calibration_multiplies_the_points():
    calibration = OccupancyCalibration.uniform("g", 3, 2.0)
    hits = np.array([[0, 10, 101]] * 400)
    points = calibration.points_for_hits(hits, np.random.default_rng(1))
    assert np.all(points[:, 0] == 0)  # no hit wanted, no point
    assert points[:, 1].mean() == pytest.approx(20, rel=0.01)
    assert points[:, 2].mean() == pytest.approx(202, rel=0.01)


def test_points_per_hit_are_interpolated_between_the_passes():
    # layer 0: hits grow as (points per hit)^0.5 from 50 at k = 1: 60 hits need k = 1.44;
    # layer 1: already at its target with one point per hit
    mean_hits = (np.array([50.0, 20.0]), np.array([50.0 * 2 ** 0.5, 30.0]))
    calibration = OccupancyCalibration.from_mean_hits("g", (1.0, 2.0), mean_hits, np.array([60.0, 20.0]), {})
    k = np.exp(-np.asarray(calibration.log_efficiency))
    assert k[0] == pytest.approx((60.0 / 50.0) ** 2, rel=1e-3)
    assert k[1] == pytest.approx(1.0, rel=1e-3)
    placed = calibration.points_for_hits(np.array([[100.0, 100.0]] * 4000), np.random.default_rng(3)).mean(axis=0)
    np.testing.assert_allclose(placed, 100.0 * k, rtol=0.01)


def test_saturated_layers_are_not_extrapolated():
    # a layer that loses hits with more points (cells pushed below threshold) keeps two points per
    # hit; one that gains slowly is extrapolated at most to 1.5 times the second pass
    mean_hits = (np.array([50.0, 50.0, 80.0]), np.array([49.0, 55.0, 40.0]))
    target = np.array([70.0, 70.0, 40.0])
    calibration = OccupancyCalibration.from_mean_hits("g", (1.0, 2.0), mean_hits, target, {})
    k = np.exp(-np.asarray(calibration.log_efficiency))
    np.testing.assert_allclose(k, [2.0, 3.0, 0.5], rtol=1e-3)  # layer 2: fewer points, proportionally
    placed = calibration.points_for_hits(np.array([[10.0, 10.0, 10.0]] * 4000), np.random.default_rng(4))
    # where the flow asks for more hits than the training showers have, fewer points than hits
    np.testing.assert_allclose(placed.mean(axis=0), [20.0, 30.0, 5.0], rtol=0.02)


def test_every_layer_the_flow_fills_keeps_a_point():
    """Points per hit far below 1 (an undertrained flow asking for far too many hits) never empty a
    layer the flow fills, so no shower is left without points; an empty layer stays empty."""
    calibration = OccupancyCalibration("g", (-np.log(0.1),) * 3, (0.0,) * 3, (1.0,) * 3, {})
    placed = calibration.points_for_hits(np.array([[4.0, 0.5, 0.0]] * 4000), np.random.default_rng(5))
    assert placed[:, 0].min() >= 1 and placed[:, 2].max() == 0
    np.testing.assert_allclose(placed.mean(axis=0), [1.0, 0.5, 0.0], rtol=0.05)


def test_round_trip_and_bad_values():
    calibration = OccupancyCalibration("ild-ecal", (0.1, 0.2), (-0.1, -0.2), (1.0, 0.9), {"n_showers": 3})
    assert OccupancyCalibration.from_dict(calibration.to_dict()) == calibration
    with pytest.raises(ValueError):
        OccupancyCalibration("g", (0.1,), (-0.1, 0.0), (1.0,), {})
    with pytest.raises(ValueError):
        OccupancyCalibration("g", (float("nan"),), (0.0,), (1.0,), {})
    with pytest.raises(ValueError, match="unreadable"):
        OccupancyCalibration.from_dict({"geometry": "g"})


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    """A tiny ILD model trained for a few steps: training ends with the occupancy fit."""
    root = tmp_path_factory.mktemp("occupancy")
    showers = simulate("ild-ecal", "photon", np.random.default_rng(0).uniform(10e3, 40e3, 40), seed=2)
    write_showers(root / "train.h5", showers)
    torch.manual_seed(0)
    config = TrainConfig(steps=8, batch_size=8, max_points=128, val_every=8, checkpoint_every=8, warmup_steps=1,
                         device="cpu", val_fraction=0.1, occupancy_showers=36)
    train(ShowerModel(TINY), root / "train.h5", get_geometry("ild-ecal"), root / "run", config, progress=False)
    return root, showers


def test_calibration_is_fitted_on_training_showers_and_matches_their_hits(calibrated_run):
    root, showers = calibrated_run
    geometry = get_geometry("ild-ecal")
    model = model_from_checkpoint(root / "run" / "best.pt")
    calibration = model.occupancy["ild-ecal"]
    fit = calibration.fit
    assert fit["n_showers"] == 36  # training showers only: 40 minus the 4 held out for validation
    # the hits it was fitted to are those of the training split, not of the validation showers
    train_idx, val_idx = split_indices(40, None, 0.1, 0)
    np.testing.assert_allclose(fit["training_hits"], layer_counts(showers[train_idx], geometry).mean(axis=0))
    assert not np.allclose(fit["training_hits"], layer_counts(showers, geometry).mean(axis=0))
    energies = np.tile(showers.incident_energy_mev, 4)
    generator = torch.Generator().manual_seed(11)
    calibrated = geometry.digitise(model.generate(geometry, energies, generator=generator))
    plain = geometry.digitise(model.generate(geometry, energies, generator=torch.Generator().manual_seed(11),
                                             occupancy=None))
    training = layer_counts(showers, geometry).mean(axis=0)
    with_calibration = layer_counts(calibrated, geometry).mean(axis=0)
    without = layer_counts(plain, geometry).mean(axis=0)
    total_error = abs(with_calibration.sum() / training.sum() - 1)
    assert total_error < 0.08
    assert total_error < abs(without.sum() / training.sum() - 1)
    busy = training >= 0.03 * training.sum()  # layers holding a few per cent of the hits
    np.testing.assert_allclose(with_calibration[busy], training[busy], rtol=0.2)


def test_calibration_survives_inference_copies(calibrated_run, tmp_path):
    root, _ = calibrated_run
    inference_checkpoint(root / "run" / "best.pt", tmp_path / "model.pt")
    original = model_from_checkpoint(root / "run" / "best.pt").occupancy
    assert model_from_checkpoint(tmp_path / "model.pt").occupancy == original
    assert load_checkpoint(root / "run" / "last.pt")["occupancy"] == load_checkpoint(tmp_path / "model.pt")["occupancy"]


def test_no_calibration_when_disabled_or_interrupted(tmp_path):
    showers = simulate("ild-ecal", "photon", np.array([10e3, 12e3, 14e3, 16e3]), seed=3)
    write_showers(tmp_path / "train.h5", showers)
    geometry = get_geometry("ild-ecal")
    for name, options in (("off", {"occupancy_showers": 0}), ("cut", {})):
        config = TrainConfig(steps=4, batch_size=2, max_points=32, val_every=2, checkpoint_every=2, warmup_steps=1,
                             device="cpu", val_fraction=0.25, **options)
        train(ShowerModel(TINY), tmp_path / "train.h5", geometry, tmp_path / name, config, progress=False,
              stop_after_steps=2 if name == "cut" else None)
        assert load_checkpoint(tmp_path / name / "last.pt")["occupancy"] == {}


def test_fit_needs_showers():
    with pytest.raises(ValueError, match="no training showers"):
        fit_occupancy(ShowerModel(TINY), get_geometry("ild-ecal"),
                      simulate("ild-ecal", "photon", np.array([10e3]), seed=1)[np.array([], dtype=int)])


def test_calibration_applies_on_every_sampler_and_onnx(calibrated_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from caloadapt.export import export_onnx, onnx_metadata, onnx_model

    root, showers = calibrated_run
    geometry = get_geometry("ild-ecal")
    model = model_from_checkpoint(root / "run" / "best.pt")
    energies = showers.incident_energy_mev[:6]
    export_onnx(model, tmp_path / "net.onnx")
    stored = onnx_metadata(tmp_path / "net.onnx")["occupancy"]
    assert OccupancyCalibration.from_dict(__import__("json").loads(stored)["ild-ecal"]) == model.occupancy["ild-ecal"]
    runtime = onnx_model(model, tmp_path / "net.onnx")
    for sampler, network in (("heun", model), ("euler", model), ("heun", runtime)):
        counts = []
        for occupancy in ("auto", None):
            out = network.generate(geometry, energies, Sampler(sampler, 2), occupancy=occupancy,
                                   generator=torch.Generator().manual_seed(5))
            counts.append(out.n_points.sum())
        points_per_hit = counts[0] / counts[1]
        assert points_per_hit > 1.05, (sampler, network is runtime)  # calibrated: more points than hits


def test_distilled_model_keeps_and_applies_the_calibration(tiny_checkpoints):
    teacher_path, distilled_path = tiny_checkpoints
    model, sampler = load_model(distilled_path)
    assert model.occupancy == model_from_checkpoint(teacher_path).occupancy != {}
    geometry = get_geometry("ild-ecal")
    energies = np.array([15e3, 20e3, 25e3])
    counts = [model.generate(geometry, energies, sampler, occupancy=occupancy,
                             generator=torch.Generator().manual_seed(4)).n_points.sum()
              for occupancy in ("auto", None)]
    assert counts[0] > 1.05 * counts[1]


def test_calibrate_command_refits_on_the_training_split(calibrated_run, tmp_path):
    from typer.testing import CliRunner

    from caloadapt.cli import app

    root, _ = calibrated_run
    plain = model_from_checkpoint(root / "run" / "best.pt")
    plain.occupancy = {}
    payload = load_checkpoint(root / "run" / "best.pt")
    from caloadapt.train import write_inference_checkpoint
    write_inference_checkpoint(plain, payload, tmp_path / "uncalibrated.pt")
    assert model_from_checkpoint(tmp_path / "uncalibrated.pt").occupancy == {}
    result = CliRunner().invoke(app, ["calibrate", "--checkpoint", str(tmp_path / "uncalibrated.pt"), "--data",
                                      str(root / "train.h5"), "-o", str(tmp_path / "calibrated.pt"),
                                      "--n-showers", "36", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "ild-ecal:" in result.stdout
    refitted = model_from_checkpoint(tmp_path / "calibrated.pt").occupancy["ild-ecal"]
    # the same training showers and seed as the fit at the end of training: the same calibration; only the
    # command runs the fit's check pass
    trained = model_from_checkpoint(root / "run" / "best.pt").occupancy["ild-ecal"]
    assert "generated_hits" in refitted.fit and "generated_hits" not in trained.fit
    assert dataclasses.replace(refitted, fit={k: v for k, v in refitted.fit.items() if k != "generated_hits"}) == trained
    # another starting noise level: fitted with it, and stored for generation beside the calibration
    result = CliRunner().invoke(app, ["calibrate", "--checkpoint", str(tmp_path / "uncalibrated.pt"), "--data",
                                      str(root / "train.h5"), "-o", str(tmp_path / "low.pt"),
                                      "--n-showers", "36", "--device", "cpu", "--sigma-max", "5", "--steps", "7"])
    assert result.exit_code == 0, result.output
    model, sampler = load_model(tmp_path / "low.pt")
    fit = model.occupancy["ild-ecal"].fit
    assert (sampler.sigma_max, sampler.steps) == (5.0, 7) and (fit["sigma_max"], fit["n_steps"]) == (5.0, 7)
    assert model.occupancy["ild-ecal"] != refitted


def test_runs_begun_before_the_calibration_resume(tmp_path):
    """A last.pt written by caloadapt 0.1 has no occupancy_showers option: --resume still continues it."""
    from caloadapt.models.checkpoint import save_checkpoint

    showers = simulate("ild-ecal", "photon", np.array([10e3, 12e3, 14e3, 16e3]), seed=3)
    write_showers(tmp_path / "train.h5", showers)
    config = TrainConfig(steps=4, batch_size=2, max_points=32, val_every=2, checkpoint_every=2, warmup_steps=1,
                         device="cpu", val_fraction=0.25, occupancy_showers=0)
    geometry = get_geometry("ild-ecal")
    train(ShowerModel(TINY), tmp_path / "train.h5", geometry, tmp_path / "run", config, progress=False,
          stop_after_steps=2)
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    old_options = {k: v for k, v in payload["train_config"].items() if k != "occupancy_showers"}
    save_checkpoint(tmp_path / "run" / "last.pt", model_from_checkpoint(payload, weights="model"),
                    **{**{k: v for k, v in payload.items() if k not in ("model", "model_config", "occupancy")},
                       "train_config": old_options})
    resumed = TrainConfig(**{**old_options, "occupancy_showers": 128})
    summary = train(ShowerModel(TINY), tmp_path / "train.h5", geometry, tmp_path / "run", resumed, resume=True,
                    progress=False)
    assert summary["steps"] == 4
    with pytest.raises(Exception, match="other training options"):
        train(ShowerModel(TINY), tmp_path / "train.h5", geometry, tmp_path / "run",
              TrainConfig(**{**old_options, "occupancy_showers": 5}), resume=True, progress=False)
