"""A tiny sweep runs, resumes without redoing finished runs, and summarises; the adapt CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from caloadapt.cli import app
from caloadapt.data import write_showers
from caloadapt.geometry import get_geometry
from caloadapt.models import ModelConfig, ShowerModel
from caloadapt.simulate import simulate
from caloadapt.sweep import SweepSpec, plan_runs, run_sweep, summarise
from caloadapt.train import TrainConfig, train

TINY = ModelConfig(widths=(16, 16), time_dim=8, flow_hidden=(16,), flow_transforms=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    source, target, reference = root / "source.h5", root / "target.h5", root / "reference.h5"
    write_showers(source, simulate("ild-ecal", "photon", rng.uniform(10e3, 30e3, 32), seed=1))
    write_showers(target, simulate("calochallenge-2", "electron", np.exp(rng.uniform(0, 3, 40)) * 1e3, seed=2),
                  format="calochallenge")
    write_showers(reference, simulate("calochallenge-2", "electron", np.exp(rng.uniform(0, 3, 12)) * 1e3, seed=3),
                  format="calochallenge")
    torch.manual_seed(0)
    train(ShowerModel(TINY), source, get_geometry("ild-ecal"), root / "pre",
          TrainConfig(steps=4, batch_size=8, max_points=64, val_every=2, checkpoint_every=2, device="cpu",
                      val_max_showers=8), progress=False)
    return {"source": source, "target": target, "reference": reference, "pretrained": root / "pre" / "best.pt"}


def _spec(files) -> SweepSpec:
    return SweepSpec(checkpoints={"ild": str(files["pretrained"])}, data=str(files["target"]),
                     reference=str(files["reference"]), geometry="calochallenge-2", sizes=(10, 20),
                     methods=("scratch", "bitfit", "lora:rank=2,alpha=2"), seeds=(0,), steps=3, batch_size=4,
                     max_points=32, val_every=3, n_eval=8, n_steps_sampler=2)


def test_sweep_runs_resumes_and_summarises(files, tmp_path):
    spec = _spec(files)
    logs: list[str] = []
    results = run_sweep(spec, tmp_path, workers=1, log=logs.append)
    assert len(results) == 6 and len(plan_runs(spec, tmp_path)) == 6
    assert all(np.isfinite(r["geometric_mean"]) for r in results)
    bitfit = next(r for r in results if r["method"] == "bitfit")
    net_row = next(row for row in bitfit["parameters"] if row["group"] == "net")
    assert net_row["trainable"] == sum(p.numel() for _, p in ShowerModel(TINY).net.bias_vectors())
    # a restart finds every run finished and trains nothing
    stamps = {r: (Path(r.directory) / "result.json").stat().st_mtime_ns for r in plan_runs(spec, tmp_path)}
    again = run_sweep(spec, tmp_path, workers=1, log=logs.append)
    assert any("6 already finished, 0 to run" in line for line in logs)
    assert [r["geometric_mean"] for r in again] == [r["geometric_mean"] for r in results]
    assert all((Path(r.directory) / "result.json").stat().st_mtime_ns == t for r, t in stamps.items())
    rows = summarise(again, tmp_path)
    lora = next(r for r in rows if r["method"].startswith("lora") and r["size"] == 10)
    scratch = next(r for r in rows if r["method"] == "scratch" and r["size"] == 10)
    assert lora["improvement_over_scratch"] == pytest.approx(1 - lora["median"] / scratch["median"])
    for name in ("summary.json", "summary.csv", "summary.md", "geometric_mean_vs_size.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_a_partly_finished_sweep_runs_only_the_rest(files, tmp_path):
    spec = _spec(files)
    runs = plan_runs(spec, tmp_path)
    first = runs[0]
    Path(first.directory).mkdir(parents=True)
    (Path(first.directory) / "result.json").write_text(json.dumps({
        "pretrained": first.pretrained, "method": first.method, "size": first.size, "seed": first.seed,
        "geometric_mean": 123.0}))
    logs: list[str] = []
    results = run_sweep(spec, tmp_path, workers=1, log=logs.append)
    assert "1 already finished, 5 to run" in logs[0]
    assert results[0]["geometric_mean"] == 123.0


def test_finetune_and_analyze_updates_cli(files, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", "--checkpoint", str(files["pretrained"]), "--data", str(files["target"]),
                                 "--n-samples", "12", "--method", "bitfit-context", "--steps", "2", "--val-every", "2",
                                 "--batch-size", "4", "--max-points", "32", "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "net.context_bias" in result.output and (out / "model.pt").exists()
    report = json.loads((out / "parameters.json").read_text())
    assert report  # trainable / total per group recorded with the run
    result = runner.invoke(app, ["analyze-updates", str(files["pretrained"]), str(out / "model.pt"),
                                 "-o", str(tmp_path / "updates")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "updates" / "updates.json").stat().st_size > 0
    bad = runner.invoke(app, ["finetune", "--checkpoint", str(files["pretrained"]), "--data", str(files["target"]),
                              "--method", "nonsense", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "nonsense" in bad.stderr


def test_sweep_through_submitit(files, tmp_path):
    """The Slurm path goes through submitit; without a Slurm cluster submitit runs the jobs locally."""
    spec = SweepSpec(**{**_spec(files).to_dict(), "sizes": (10,), "methods": ("bitfit",)})
    results = run_sweep(spec, tmp_path, executor="slurm", slurm={"timeout_min": 10}, log=lambda *_: None)
    assert len(results) == 1 and np.isfinite(results[0]["geometric_mean"])
    assert (tmp_path / "slurm").is_dir()  # submitit's job folder


def test_sweep_compares_backbones_and_runs_zero_shot(files, tmp_path):
    """Several pre-trained checkpoints of different backbones in one sweep, plus zero-shot runs (D = 0)."""
    torch.manual_seed(0)
    transformer = ModelConfig(backbone="transformer", geometry_conditioning=True, transformer_dim=8,
                              transformer_depth=1, transformer_heads=2, transformer_inducing=2, time_dim=8,
                              flow_hidden=(16,), flow_transforms=1)
    train(ShowerModel(transformer), files["source"], get_geometry("ild-ecal"), tmp_path / "pre_t",
          TrainConfig(steps=2, batch_size=8, max_points=32, val_every=2, checkpoint_every=2, device="cpu",
                      val_max_showers=8), progress=False)
    spec = SweepSpec(**{**_spec(files).to_dict(), "sizes": (10,), "methods": ("scratch", "full", "zero-shot"),
                        "checkpoints": {"pointwise": str(files["pretrained"]),
                                        "transformer": str(tmp_path / "pre_t" / "best.pt")}})
    runs = plan_runs(spec, tmp_path)
    assert sorted((r.pretrained, r.method, r.size) for r in runs if r.method == "zero-shot") == [
        ("pointwise", "zero-shot", 0), ("transformer", "zero-shot", 0)]
    results = run_sweep(spec, tmp_path, workers=1, log=lambda *_: None)
    assert len(results) == 6 and all(np.isfinite(r["geometric_mean"]) for r in results)
    assert {(r["pretrained"], r["backbone"]) for r in results} == {("pointwise", "pointwise"),
                                                                 ("transformer", "transformer")}
    zero = [r for r in results if r["method"] == "zero-shot"]
    assert all(r["train_s"] < r["total_s"] and r["parameters"] == [] for r in zero)
    assert not any((Path(r.directory) / "model.pt").exists() for r in runs if r.method == "zero-shot")
    rows = summarise(results, tmp_path)
    assert {(r["pretrained"], r["method"], r["size"]) for r in rows} >= {("transformer", "zero-shot", 0)}
    assert (tmp_path / "geometric_mean_vs_size.png").stat().st_size > 0
