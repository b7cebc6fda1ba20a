"""A tiny sweep runs, resumes without redoing finished runs, and summarises; the adapt CLI commands."""

from __future__ import annotations

import csv
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
                                 "--n-samples", "12", "--method", "bitfit-context", "--flow", "frozen", "--steps", "2",
                                 "--val-every", "2", "--batch-size", "4", "--max-points", "32", "--device", "cpu",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "net.context_bias" in result.output and (out / "model.pt").exists()
    report = json.loads((out / "parameters.json").read_text())
    groups = {r["group"]: r for r in report["groups"]}  # trainable / total per group recorded with the run
    whole = report["whole_model"]  # the point network and the flow together
    assert whole["trainable"] == groups["all"]["trainable"] == groups["net"]["trainable"] == whole["trainable_net"]
    assert whole["trainable_flow"] == 0 and whole["total"] == groups["net"]["total"] + groups["flow"]["total"]
    assert (f"trains {whole['trainable']:,} of {whole['total']:,} parameters of the whole model "
            f"({whole['percent']:.2f} %") in result.output
    result = runner.invoke(app, ["analyze-updates", str(files["pretrained"]), str(out / "model.pt"),
                                 "-o", str(tmp_path / "updates")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "updates" / "updates.json").stat().st_size > 0
    bad = runner.invoke(app, ["finetune", "--checkpoint", str(files["pretrained"]), "--data", str(files["target"]),
                              "--method", "nonsense", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "nonsense" in bad.stderr


def test_finetune_one_step_writes_a_calibrated_student_that_generates(files, tmp_path):
    """``finetune --one-step``: the adapted model and its one-step student, which starts from a given
    student's network (or a fresh one) and loads and generates like any checkpoint."""
    from caloadapt.models.checkpoint import load_checkpoint, load_model
    from caloadapt.train import model_from_checkpoint
    from caloadapt.train.distill import DistillConfig, distill

    geometry = get_geometry("calochallenge-2")
    distill(model_from_checkpoint(files["pretrained"]), files["source"], get_geometry("ild-ecal"), tmp_path / "cm",
            DistillConfig(steps=1, batch_size=4, max_points=32, val_every=1, checkpoint_every=1, device="cpu",
                          val_max_showers=4, val_max_points=16, val_teacher_steps=2, student_widths=(8, 8),
                          sigma_max=5.0), progress=False)
    runner = CliRunner()
    common = ["finetune", "--checkpoint", str(files["pretrained"]), "--data", str(files["target"]), "--n-samples",
              "12", "--steps", "2", "--val-every", "2", "--batch-size", "4", "--max-points", "32", "--device", "cpu",
              "--occupancy-showers", "4", "--one-step", "--one-step-steps", "2"]
    for init, widths in ((str(tmp_path / "cm" / "best.pt"), (8, 8)), ("fresh", (32, 32))):
        out = tmp_path / f"ft-{widths[0]}"
        result = runner.invoke(app, [*common, "--student-init", init, "-o", str(out)])
        assert result.exit_code == 0, result.output
        student = load_checkpoint(out / "model-1step.pt")
        assert tuple(student["model_config"]["widths"]) == widths and student["teacher"] == str(out / "model.pt")
        assert student["occupancy"]["calochallenge-2"]["fit"]["training_hits"] is not None  # calibrated for it
        model, sampler = load_model(out / "model-1step.pt")
        assert sampler.kind == "consistency" and sampler.steps == 1
        if init != "fresh":  # distilled on the noise range of the student it started from
            assert sampler.sigma_max == 5.0
        hits = model.generate(geometry, np.array([5e3, 20e3]), sampler, generator=torch.Generator().manual_seed(0),
                              digitise=True)
        assert len(hits) == 2 and np.all(np.isfinite(hits.points))
        assert (out / "model.pt").exists() and (out / "model-1step" / "metrics.csv").exists()
    bad = runner.invoke(app, [*common, "--student-init", str(files["pretrained"]), "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "not a one-step" in bad.stderr and not (tmp_path / "bad").exists()


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
    assert len(results) == 6 and all(np.isfinite(r["geometric_mean"]) for r in results), [
        (r["pretrained"], r["method"], r["geometric_mean"]) for r in results]
    assert {(r["pretrained"], r["backbone"]) for r in results} == {("pointwise", "pointwise"),
                                                                 ("transformer", "transformer")}
    zero = [r for r in results if r["method"] == "zero-shot"]
    assert all(r["train_s"] < r["total_s"] and r["parameters"] == [] for r in zero)
    assert not any((Path(r.directory) / "model.pt").exists() for r in runs if r.method == "zero-shot")
    rows = summarise(results, tmp_path)
    assert {(r["pretrained"], r["method"], r["size"]) for r in rows} >= {("transformer", "zero-shot", 0)}
    assert (tmp_path / "geometric_mean_vs_size.png").stat().st_size > 0


def test_sweep_floor_converged_scratch_and_whole_model_counts(files, tmp_path):
    """The floor in every result and the summary; scratch-converged stops early; trainable counts include the flow."""
    from caloadapt.data import read_showers

    reference = read_showers(files["reference"])
    floor = tmp_path / "floor.h5"
    write_showers(floor, simulate("calochallenge-2", "electron", reference.incident_energy_mev, seed=4),
                  format="calochallenge")
    # the tiny scratch model plateaus after a few hundred steps (validating every 20); the cap is far beyond
    base = {**_spec(files).to_dict(), "sizes": (10,), "methods": ("scratch", "scratch-converged", "bitfit:flow=frozen"),
            "val_every": 20, "patience": 1, "max_steps": 4000}
    first = run_sweep(SweepSpec(**base), tmp_path, workers=1, log=lambda *_: None)
    assert all("geometric_mean_floor" not in r for r in first)
    results = run_sweep(SweepSpec(**{**base, "floor": str(floor)}), tmp_path, workers=1, log=lambda *_: None)
    by_method = {r["method"]: r for r in results}
    # finished runs are kept (same G), the floor is added to each
    assert [r["geometric_mean"] for r in results] == [r["geometric_mean"] for r in first]
    floors = {r["geometric_mean_floor"] for r in results}
    assert len(floors) == 1 and 0 < floors.pop() < max(r["geometric_mean"] for r in results)
    for r in results:
        assert r["ratio_to_floor"] == pytest.approx(r["geometric_mean"] / r["geometric_mean_floor"])
        assert r["n_floor"] == base["n_eval"] == 8 and set(r["scores_floor"]) == set(r["scores"])

    converged = by_method["scratch-converged"]
    assert by_method["scratch"]["steps"] == 3
    assert converged["stopped_early"] and 3 < converged["steps"] < 4000
    with open(Path(plan_runs(SweepSpec(**base), tmp_path)[1].directory) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert int(rows[-1]["step"]) == converged["steps"]
    patience = base["patience"]
    for key in ("val_diffusion", "val_flow"):  # the last `patience` validations improved on neither loss
        best_before = min(float(row[key]) for row in rows[:-patience])
        assert all(float(row[key]) >= best_before for row in rows[-patience:])
        assert min(float(row[key]) for row in rows[1:-patience]) < float(rows[0][key])  # it did train

    frozen = by_method["bitfit:flow=frozen"]
    biases = sum(p.numel() for _, p in ShowerModel(TINY).net.bias_vectors())
    assert frozen["trainable_net"] == frozen["trainable_all"] == biases and frozen["trainable_flow"] == 0
    assert frozen["total_all"] == sum(p.numel() for p in ShowerModel(TINY).parameters())
    scratch = by_method["scratch"]
    assert scratch["trainable_all"] == scratch["total_all"] and scratch["percent_all"] == 100.0

    rows = {r["method"]: r for r in summarise(results, tmp_path)}
    assert rows["bitfit:flow=frozen"]["ratio_to_floor"] == pytest.approx(frozen["ratio_to_floor"])
    assert rows["bitfit:flow=frozen"]["improvement_over_scratch_converged"] == pytest.approx(
        1 - frozen["geometric_mean"] / converged["geometric_mean"])
    assert rows["scratch-converged"]["steps"] == converged["steps"]
    table = (tmp_path / "summary.md").read_text()
    assert "G_floor" in table and "vs scratch-converged" in table and f"{frozen['percent_all']:.2f} %" in table
