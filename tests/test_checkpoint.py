"""One loader for every kind of checkpoint: plain, adapted (peft best.pt), distilled, multi-detector, 0.1-style."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from caloadapt.adapt import AdaptMethod, finetune
from caloadapt.cli import app
from caloadapt.data import write_showers
from caloadapt.errors import CheckpointError, InputError
from caloadapt.geometry import get_geometry
from caloadapt.models import Sampler, ShowerModel, load_model
from caloadapt.models.checkpoint import load_checkpoint, model_from_checkpoint
from caloadapt.simulate import simulate
from caloadapt.train import TrainConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoints, tmp_path_factory) -> Path:
    """A LoRA adaptation of the tiny model: its best.pt keeps the adapters separate."""
    root = tmp_path_factory.mktemp("lora")
    data = root / "cc3.h5"
    write_showers(data, simulate("calochallenge-3", "electron", np.random.default_rng(2).uniform(10e3, 30e3, 12),
                                 seed=2))
    config = TrainConfig(steps=2, batch_size=4, max_points=48, n_samples=12, val_every=2, checkpoint_every=2,
                         device="cpu", val_max_showers=4, occupancy_showers=0)
    finetune(tiny_checkpoints[0], data, get_geometry("calochallenge-3"), root / "run", AdaptMethod("lora", rank=2),
             config, progress=False, log=None)
    return root / "run"


def _showers(model: ShowerModel, sampler: Sampler, geometry: str = "ild-ecal"):
    return model.generate(get_geometry(geometry), np.array([12e3, 25e3]), sampler.with_steps(2),
                          generator=torch.Generator().manual_seed(3))


def test_plain_checkpoint_loads_with_the_default_sampler(tiny_checkpoints):
    model, sampler = load_model(tiny_checkpoints[0])
    assert isinstance(model, ShowerModel) and sampler == Sampler()
    reference = model_from_checkpoint(tiny_checkpoints[0])
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.occupancy == reference.occupancy
    assert load_checkpoint(tiny_checkpoints[0])["sampler"] == Sampler().to_dict()  # stored, not implied


def test_distilled_checkpoint_loads_with_its_consistency_sampler(tiny_checkpoints):
    model, sampler = load_model(tiny_checkpoints[1])
    assert sampler.distilled and sampler.steps == 1
    marker = load_checkpoint(tiny_checkpoints[1])["consistency"]
    assert (sampler.sigma_min, sampler.sigma_max, sampler.rho) == (marker["sigma_min"], marker["sigma_max"],
                                                                   marker["rho"])
    assert np.all(np.isfinite(_showers(model, sampler).points))


def test_lora_best_checkpoint_loads_merged(lora_run):
    payload = load_checkpoint(lora_run / "best.pt")
    assert any("lora_A" in key for key in payload["ema"])  # the adapters are stored separately
    model, sampler = load_model(lora_run / "best.pt")
    merged, _ = load_model(lora_run / "model.pt")
    assert set(model.state_dict()) == set(merged.state_dict()) == set(ShowerModel(model.config).state_dict())
    for key, value in merged.state_dict().items():
        assert torch.allclose(model.state_dict()[key], value, atol=1e-6), key
    assert sampler == Sampler()


def test_export_checkpoint_of_a_lora_best_checkpoint(lora_run, tmp_path):
    result = runner.invoke(app, ["export", "--checkpoint", str(lora_run / "best.pt"), "-f", "checkpoint",
                                 "-o", str(tmp_path / "copy.pt")])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    copy, sampler = load_model(tmp_path / "copy.pt")
    original, _ = load_model(lora_run / "best.pt")
    assert "optimizer" not in load_checkpoint(tmp_path / "copy.pt")
    a, b = _showers(copy, sampler, "calochallenge-3"), _showers(original, sampler, "calochallenge-3")
    assert np.array_equal(a.n_points, b.n_points) and np.allclose(a.points, b.points)


def test_multi_detector_checkpoint_loads():
    model, sampler = load_model("multi-detector")
    assert model.config.geometry_conditioning and sampler.kind == "heun"


def test_checkpoints_without_a_sampler_entry_still_load(tiny_checkpoints, tmp_path):
    """Checkpoints of caloadapt 0.1 hold no sampler: the default, or the consistency one of a distilled model."""
    for source, expected_kind in ((tiny_checkpoints[0], "heun"), (tiny_checkpoints[1], "consistency")):
        payload = torch.load(source, weights_only=True)
        del payload["sampler"]
        old = tmp_path / f"old-{expected_kind}.pt"
        torch.save(payload, old)
        _, sampler = load_model(old)
        assert sampler.kind == expected_kind and sampler == load_model(source)[1]


def test_an_unreadable_sampler_entry_is_a_one_line_error(tiny_checkpoints, tmp_path):
    payload = torch.load(tiny_checkpoints[0], weights_only=True)
    payload["sampler"] = {"kind": "ddim", "steps": 13}
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="unreadable sampler settings: unknown sampler 'ddim'"):
        load_model(tmp_path / "bad.pt")
    result = runner.invoke(app, ["generate", "--checkpoint", str(tmp_path / "bad.pt"), "-o", str(tmp_path / "g.h5"),
                                 "-n", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "unknown sampler 'ddim'" in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_sampler_settings_are_checked():
    for bad in ({"kind": "heun", "steps": 0}, {"kind": "heun", "sigma_min": 1.0, "sigma_max": 0.5},
                {"kind": "heun", "rho": 0.0}):
        with pytest.raises(InputError):
            Sampler(**bad)
    with pytest.raises(ValueError, match="unknown sampler settings"):
        Sampler.from_dict({"kind": "heun", "churn": 1.0})
    assert Sampler.from_dict(Sampler("euler", 4).to_dict()) == Sampler("euler", 4)
