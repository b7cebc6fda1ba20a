"""Training loop, checkpoints, resume, DDP, generation and cross-geometry use of the shower model."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from caloadapt.cli import app
from caloadapt.data import read_showers, write_showers
from caloadapt.errors import CheckpointError, TrainingError
from caloadapt.evaluate.plots import loss_curves
from caloadapt.generate import iter_generate
from caloadapt.geometry import get_geometry
from caloadapt.models import ModelConfig, Sampler, ShowerModel
from caloadapt.models.representation import DepthGrid, shower_statistics, statistics_to_layers
from caloadapt.simulate import simulate
from caloadapt.train import TrainConfig, load_checkpoint, model_from_checkpoint, train
from caloadapt.train.rundir import read_history

TINY = ModelConfig(widths=(32, 32), time_dim=16, flow_hidden=(32,), flow_transforms=2)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(steps=12, batch_size=8, max_points=128, val_every=6, checkpoint_every=6, lr=3e-3, flow_lr=3e-3,
                  warmup_steps=2, device="cpu", val_max_showers=16)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def ild_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "ild.h5"
    energies = np.random.default_rng(0).uniform(10e3, 30e3, 64)
    write_showers(path, simulate("ild-ecal", "photon", energies, seed=1))
    return path


@pytest.fixture(scope="module")
def ds3_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "ds3.h5"
    energies = np.exp(np.random.default_rng(1).uniform(np.log(1e3), np.log(20e3), 40))
    write_showers(path, simulate("calochallenge-3", "electron", energies, seed=2), format="calochallenge")
    return path


@pytest.fixture(scope="module")
def trained_run(ild_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    train(ShowerModel(TINY), ild_file, get_geometry("ild-ecal"), out, tiny_config(steps=60, val_every=20),
          progress=False)
    return out


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_losses_decrease_on_a_small_simulated_set(trained_run):
    rows = _metrics(trained_run)
    assert [int(r["step"]) for r in rows] == [20, 40, 60]
    assert float(rows[-1]["val_flow"]) < float(rows[0]["val_flow"])
    assert float(rows[-1]["val_diffusion"]) < float(rows[0]["val_diffusion"])


def test_history_is_read_back_and_plotted(trained_run, tmp_path):
    rows = _metrics(trained_run)
    history = read_history(trained_run)
    assert history["step"] == [20.0, 40.0, 60.0]
    assert history["val_diffusion"] == [float(r["val_diffusion"]) for r in rows]
    assert loss_curves(history, tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "metrics.csv").write_text("step,train_flow\n20,abc\n")
    with pytest.raises(TrainingError, match="not a number"):
        read_history(tmp_path)


def test_checkpoint_holds_everything_to_continue(trained_run):
    payload = load_checkpoint(trained_run / "last.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "train_state", "train_config", "geometry", "model_config"):
        assert key in payload
    assert payload["train_state"]["step"] == 60
    assert payload["geometry"]["name"] == "ild-ecal"
    model = model_from_checkpoint(trained_run / "best.pt")
    assert model.config == TINY
    assert float(model.point_std.min()) > 0  # normalisation travels with the weights


def test_resume_continues_to_the_same_result(ild_file, tmp_path):
    geometry = get_geometry("ild-ecal")
    straight, split = tmp_path / "straight", tmp_path / "split"
    torch.manual_seed(0)
    train(ShowerModel(TINY), ild_file, geometry, straight, tiny_config(), progress=False)
    # the interrupted run: stops after 5 steps (checkpoint written then), then resumes
    torch.manual_seed(0)
    train(ShowerModel(TINY), ild_file, geometry, split, tiny_config(), stop_after_steps=5, progress=False)
    assert load_checkpoint(split / "last.pt")["train_state"]["step"] == 5
    train(ShowerModel(TINY), ild_file, geometry, split, tiny_config(), resume=True, progress=False)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_resume_with_other_options_is_refused(trained_run, ild_file):
    with pytest.raises(CheckpointError, match="other training options"):
        train(ShowerModel(TINY), ild_file, get_geometry("ild-ecal"), trained_run, tiny_config(steps=99),
              resume=True, progress=False)


def test_bad_checkpoints_give_clear_errors(tmp_path, trained_run):
    missing, corrupt = tmp_path / "missing.pt", tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(missing)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a caloadapt checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        model_from_checkpoint(trained_run / "best.pt", config=ModelConfig())


def test_generation_is_seeded_and_valid_in_both_detectors(trained_run):
    model = model_from_checkpoint(trained_run / "best.pt")
    energies = np.array([5e3, 20e3, 60e3])
    for name in ("ild-ecal", "calochallenge-3"):  # a flow trained on 30 layers serves 45
        geometry = get_geometry(name)
        a = list(iter_generate(model, geometry, energies, Sampler(steps=3), seed=5))[0]
        b = list(iter_generate(model, geometry, energies, Sampler(steps=3), seed=5))[0]
        c = list(iter_generate(model, geometry, energies, Sampler(steps=3), seed=6))[0]
        assert np.array_equal(a.points, b.points)
        assert not np.array_equal(a.points, c.points)
        assert len(a) == 3 and a.geometry == name
        assert np.all(a.points[:, 3] >= geometry.energy.threshold_mev)
        assert np.all(geometry.cell_index(a.points) >= 0)


def test_generate_cli_writes_both_formats(trained_run, tmp_path):
    runner = CliRunner()
    for fmt in ("points", "calochallenge"):
        out = tmp_path / f"gen_{fmt}.h5"
        result = runner.invoke(app, ["generate", "--checkpoint", str(trained_run / "best.pt"), "-g", "calochallenge-3",
                                     "--n", "4", "--energy", "1:100", "--steps", "2", "-o", str(out), "-f", fmt,
                                     "--device", "cpu"])
        assert result.exit_code == 0, result.output
        showers = read_showers(out)
        assert len(showers) == 4 and showers.geometry == "calochallenge-3"
        assert np.all(showers.incident_energy_mev >= 1e3) and np.all(showers.incident_energy_mev <= 100e3)


def test_flow_statistics_map_between_30_and_45_layers(ds3_file, trained_run):
    grid = DepthGrid()
    ild, ds3 = get_geometry("ild-ecal"), get_geometry("calochallenge-3")
    showers = read_showers(ds3_file)
    stats = shower_statistics(ds3, showers, np.random.default_rng(0), grid)
    model = model_from_checkpoint(trained_run / "best.pt")
    assert stats.shape == (len(showers), model.flow.n_features)
    assert torch.isfinite(model.flow.log_prob(torch.as_tensor(stats, dtype=torch.float32),
                                              torch.zeros(len(showers), 1))).all()
    counts, energy, _ = statistics_to_layers(ds3, stats, showers.incident_energy_mev, grid)
    assert counts.shape == energy.shape == (len(showers), 45)
    # the round trip keeps totals: points and energy per shower
    assert np.allclose(counts.sum(1), showers.n_points, rtol=0.02, atol=3)
    assert np.allclose(energy.sum(1), showers.energy_sum_mev, rtol=0.01)
    counts_ild, _, _ = statistics_to_layers(ild, stats, showers.incident_energy_mev, grid)
    assert counts_ild.shape == (len(showers), 30)


def test_fine_tuning_step_on_the_other_detector(trained_run, ds3_file, tmp_path):
    model = model_from_checkpoint(trained_run / "best.pt")
    before = model.point_mean.clone()
    summary = train(model, ds3_file, get_geometry("calochallenge-3"), tmp_path / "ft", tiny_config(steps=4, val_every=2),
                    fit_normalisation=False, progress=False)
    assert summary["steps"] == 4
    assert torch.equal(model.point_mean, before)  # the meaning of the inputs never changes


def test_depth_grid_conserves_sums():
    grid, geometry = DepthGrid(), get_geometry("ild-ecal")
    per_layer = np.random.default_rng(0).random((5, geometry.n_layers))
    on_grid = grid.layers_to_grid(geometry, per_layer)
    assert np.allclose(on_grid.sum(1), per_layer.sum(1))
    assert np.allclose(grid.grid_to_layers(geometry, on_grid).sum(1), per_layer.sum(1))


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun gloo test on Linux")
def test_distributed_training_with_two_processes(ild_file, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "caloadapt", "pretrain",
               "--data", str(ild_file), "-o", str(tmp_path / "ddp"), "--steps", "4", "--batch-size", "8",
               "--max-points", "64", "--val-every", "2", "--widths", "16,16", "--flow-hidden", "16",
               "--flow-transforms", "1", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert payload["train_state"]["step"] == 4
