"""CLI of fast generation: distill, export --format onnx, generate --engine onnxruntime / --steps 1, benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from caloadapt.cli import app
from caloadapt.data import read_showers, write_showers
from caloadapt.geometry import get_geometry
from caloadapt.models import ModelConfig, ShowerModel
from caloadapt.simulate import simulate
from caloadapt.train import TrainConfig, train
from conftest import needs_cxx

TINY = ModelConfig(widths=(16, 16), time_dim=8, flow_hidden=(16,), flow_transforms=1)
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fast")
    data = root / "ild.h5"
    write_showers(data, simulate("ild-ecal", "photon", np.random.default_rng(0).uniform(10e3, 30e3, 24), seed=1))
    torch.manual_seed(0)
    train(ShowerModel(TINY), data, get_geometry("ild-ecal"), root / "run",
          TrainConfig(steps=4, batch_size=8, max_points=64, val_every=2, checkpoint_every=2, device="cpu",
                      val_max_showers=8), progress=False)
    result = runner.invoke(app, ["distill", "--checkpoint", str(root / "run" / "best.pt"), "--data", str(data),
                                 "-o", str(root / "cm"), "--steps", "3", "--batch-size", "4", "--max-points", "32",
                                 "--val-every", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    return {"data": data, "model": root / "run" / "best.pt", "distilled": root / "cm" / "best.pt"}


def _generate(checkpoint: Path, out: Path, *extra: str):
    return runner.invoke(app, ["generate", "--checkpoint", str(checkpoint), "-g", "ild-ecal", "--n", "3",
                               "--energy", "10:30", "--device", "cpu", "-o", str(out), *extra])


def test_one_step_generation_from_a_distilled_model(trained, tmp_path):
    result = _generate(trained["distilled"], tmp_path / "one.h5")
    assert result.exit_code == 0, result.output + (result.stderr or "")
    showers = read_showers(tmp_path / "one.h5")
    assert len(showers) == 3 and np.all(np.isfinite(showers.points))
    refused = _generate(trained["model"], tmp_path / "no.h5", "--sampler", "consistency")
    assert refused.exit_code == 2 and "distilled checkpoint" in refused.stderr
    assert not (tmp_path / "no.h5").exists()


def test_one_step_generation_runs_on_one_thread_unless_told(trained, tmp_path, monkeypatch):
    """Its operations are too small to split (docs/speed.md): without --threads or OMP_NUM_THREADS a
    distilled model generates on one thread; --threads still decides."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("caloadapt._threads.auto_threads", lambda **_: 2)  # a machine with two free cores
    threads = torch.get_num_threads()
    try:
        for i, (extra, expected) in enumerate((([], 1), (["--threads", "2"], 2))):
            torch.set_num_threads(2)
            result = _generate(trained["distilled"], tmp_path / f"t{i}.h5", *extra)
            assert result.exit_code == 0, result.output
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(threads)


def test_onnx_export_and_onnxruntime_generation(trained, tmp_path):
    result = runner.invoke(app, ["export", "--checkpoint", str(trained["model"]), "-f", "onnx",
                                 "-o", str(tmp_path / "net.onnx")])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    assert "dynamic batch and points" in result.output
    for distilled in (False, True):  # one line, never the exporters' own prints (a whole graph, for the student)
        out = tmp_path / f"quiet-{distilled}.onnx"
        quiet = runner.invoke(app, ["export", "--checkpoint", str(trained["distilled" if distilled else "model"]),
                                    "-f", "onnx", "-o", str(out)])
        assert quiet.exit_code == 0 and quiet.output.strip().count("\n") == 0, quiet.output
    torch_run = _generate(trained["model"], tmp_path / "torch.h5", "--steps", "2")
    onnx_run = _generate(trained["model"], tmp_path / "ort.h5", "--steps", "2", "--engine", "onnxruntime",
                         "--onnx", str(tmp_path / "net.onnx"))
    assert torch_run.exit_code == 0 and onnx_run.exit_code == 0, onnx_run.output + (onnx_run.stderr or "")
    a, b = read_showers(tmp_path / "torch.h5"), read_showers(tmp_path / "ort.h5")
    assert np.array_equal(a.n_points, b.n_points)
    np.testing.assert_allclose(a.energy_sum_mev, b.energy_sum_mev, rtol=1e-3)


def test_benchmark_quick_writes_json(trained, tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["benchmark", "--quick", "--checkpoint", str(trained["model"]), "--distilled",
                                 str(trained["distilled"]), "--device", "cpu", "-o", str(out), "--no-onnx",
                                 "--budget-s", "30"])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    report = json.loads(out.read_text())
    assert report and "ms" in result.output and report["settings"]["budget_s"] == 30.0
    refused = runner.invoke(app, ["benchmark", "--quick", "--budget-s", "0", "-o", str(tmp_path / "no.json")])
    assert refused.exit_code == 2 and "--budget-s" in refused.stderr and not (tmp_path / "no.json").exists()


def test_generate_takes_the_starting_noise_level(trained, tmp_path):
    import h5py

    low = _generate(trained["model"], tmp_path / "low.h5", "--steps", "2", "--sigma-max", "5")
    high = _generate(trained["model"], tmp_path / "high.h5", "--steps", "2", "--sigma-max", "80")
    assert low.exit_code == 0 and high.exit_code == 0, low.output + (low.stderr or "")
    with h5py.File(tmp_path / "low.h5") as f:
        assert float(f.attrs["sigma_max"]) == 5.0
    assert not np.array_equal(read_showers(tmp_path / "low.h5").points, read_showers(tmp_path / "high.h5").points)
    bad = _generate(trained["model"], tmp_path / "bad.h5", "--sigma-max", "0.001")
    assert bad.exit_code == 2 and "sigma_min < sigma_max" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.h5").exists()


def test_distill_sizes_the_student_and_refuses_a_wrong_size(trained, tmp_path):
    def distil(out: Path, *size: str):
        return runner.invoke(app, ["distill", "--checkpoint", str(trained["model"]), "--data", str(trained["data"]),
                                   "-o", str(out), "--steps", "2", "--batch-size", "4", "--max-points", "32",
                                   "--val-every", "2", "--device", "cpu", *size])

    result = distil(tmp_path / "small", "--student-widths", "8")
    assert result.exit_code == 0, result.output + (result.stderr or "")
    assert torch.load(tmp_path / "small" / "best.pt", weights_only=True)["model_config"]["widths"] in ((8,), [8])
    for size, message in ((("--student-widths", "8,x"), "integers"), (("--student-widths", "8,0"), "positive"),
                          (("--student-dim", "32"), "transformer student"),
                          (("--student-flow-hidden", "8,x"), "integers"), (("--student-flow-transforms", "0"), "greater than or equal to 1")):
        refused = distil(tmp_path / "bad", *size)
        assert refused.exit_code == 2 and message in refused.stderr, refused.stderr
        assert not (tmp_path / "bad").exists()


def test_distill_starts_from_the_teachers_noise_level(trained, tmp_path):
    """The student learns the map from the noise level its teacher is sampled from, unless told another."""
    from caloadapt.models.checkpoint import load_checkpoint, load_model

    teacher = tmp_path / "teacher.pt"
    payload = load_checkpoint(trained["model"])
    payload["sampler"] = {**payload["sampler"], "sigma_max": 5.0, "steps": 30}
    torch.save(payload, teacher)

    def distil(out: Path, *extra: str):
        return runner.invoke(app, ["distill", "--checkpoint", str(teacher), "--data", str(trained["data"]),
                                   "-o", str(out), "--steps", "1", "--batch-size", "4", "--max-points", "32",
                                   "--val-every", "1", "--device", "cpu", *extra])

    for out, extra, sigma_max in ((tmp_path / "own", (), 5.0), (tmp_path / "told", ("--sigma-max", "20"), 20.0)):
        result = distil(out, *extra)
        assert result.exit_code == 0, result.output + (result.stderr or "")
        sampler = load_model(out / "best.pt")[1]
        assert sampler.distilled and sampler.sigma_max == sigma_max
    for value in ("0.001", "0", "-1", "nan"):
        refused = distil(tmp_path / "bad", "--sigma-max", value)
        assert refused.exit_code == 2 and "sigma" in refused.stderr and "Traceback" not in refused.stderr
        assert not (tmp_path / "bad").exists()


def test_distill_chooses_a_small_student_for_a_wide_teacher(trained, tmp_path):
    """Without --student-widths a pointwise teacher wider than DEFAULT_STUDENT_WIDTHS gets that student and the
    learning rate of a fresh start; 'teacher' keeps the teacher's size, its weights and the warm-start rate."""
    from caloadapt.train.distill import DEFAULT_STUDENT_WIDTHS, FRESH_STUDENT_LR, DistillConfig

    torch.manual_seed(0)
    wide = ModelConfig(widths=(96, 96), time_dim=8, flow_hidden=(16,), flow_transforms=1)
    train(ShowerModel(wide), trained["data"], get_geometry("ild-ecal"), tmp_path / "wide",
          TrainConfig(steps=1, batch_size=8, max_points=64, val_every=1, checkpoint_every=1, device="cpu",
                      val_max_showers=8), progress=False)

    def distil(out: Path, *extra: str) -> dict:
        result = runner.invoke(app, ["distill", "--checkpoint", str(tmp_path / "wide" / "best.pt"), "--data",
                                     str(trained["data"]), "-o", str(out), "--steps", "1", "--batch-size", "4",
                                     "--max-points", "32", "--val-every", "1", "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output + (result.stderr or "")
        return torch.load(out / "best.pt", weights_only=True)

    small, same = distil(tmp_path / "small"), distil(tmp_path / "same", "--student-widths", "teacher")
    assert tuple(small["model_config"]["widths"]) == DEFAULT_STUDENT_WIDTHS
    assert small["train_config"]["lr"] == FRESH_STUDENT_LR
    assert tuple(same["model_config"]["widths"]) == (96, 96) and same["train_config"]["lr"] == DistillConfig.lr


def test_train_flow_trains_the_flow_alone_and_can_give_a_student_a_smaller_flow(trained, tmp_path):
    """train-flow changes the flow and nothing else (the point network, the feature normalisation, the
    sampler), validates on the showers the checkpoint's run held out, and resumes; with a size it puts a
    new flow of that size beside the student's point network; the result generates."""
    from caloadapt.models import load_model
    from caloadapt.train import load_checkpoint

    def run(checkpoint, out, *extra):
        return runner.invoke(app, ["train-flow", "--checkpoint", str(checkpoint), "--data", str(trained["data"]),
                                   "-o", str(out), "--steps", "4", "--batch-size", "4", "--val-every", "2",
                                   "--occupancy-showers", "0", "--device", "cpu", *extra])

    result = run(trained["model"], tmp_path / "more")
    assert result.exit_code == 0, result.output
    before, before_sampler = load_model(trained["model"])
    after, after_sampler = load_model(tmp_path / "more" / "best.pt")
    assert after_sampler == before_sampler and after.config == before.config
    old, new = before.state_dict(), after.state_dict()
    for key in old:
        if not key.startswith("flow."):
            assert torch.equal(old[key], new[key]), key
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("flow.") and old[k].is_floating_point())
    ran, here = load_checkpoint(trained["model"])["train_config"], load_checkpoint(tmp_path / "more" / "last.pt")
    assert {k: here["train_config"][k] for k in ("val_fraction", "data_seed", "n_samples")} == {
        k: ran[k] for k in ("val_fraction", "data_seed", "n_samples")}
    assert here["train_config"]["flow_lr"] == 3e-4 and list(here["trainable"]) == [
        n for n, _ in after.named_parameters() if n.startswith("flow.")]
    resumed = runner.invoke(app, ["train-flow", "--checkpoint", str(trained["model"]), "--data", str(trained["data"]),
                                  "-o", str(tmp_path / "more"), "--steps", "6", "--batch-size", "4", "--val-every",
                                  "2", "--occupancy-showers", "0", "--device", "cpu", "--resume"])
    assert resumed.exit_code != 0 and "other training options" in resumed.output  # --steps changed

    result = run(trained["distilled"], tmp_path / "small", "--flow-transforms", "2", "--flow-hidden", "8,8")
    assert result.exit_code == 0, result.output
    student, _ = load_model(trained["distilled"])
    small, small_sampler = load_model(tmp_path / "small" / "best.pt")
    assert small_sampler.kind == "consistency" and small.config.flow_transforms == 2
    assert small.config.flow_hidden == (8, 8) and load_checkpoint(tmp_path / "small" / "last.pt")["train_config"][
        "flow_lr"] == 1e-3
    for key, value in student.state_dict().items():
        if not key.startswith("flow."):
            assert torch.equal(value, small.state_dict()[key]), key
    assert sum(p.numel() for p in small.flow.parameters()) != sum(p.numel() for p in student.flow.parameters())
    assert _generate(tmp_path / "small" / "best.pt", tmp_path / "small.h5").exit_code == 0

    bad = run(trained["model"], tmp_path / "bad", "--flow-lr", "-1")
    assert bad.exit_code == 2 and "--flow-lr must be a positive number" in bad.output


def test_generate_compile_that_fails_is_a_one_line_error(trained, tmp_path, monkeypatch):
    def no_compiler(function, **options):
        def compiled(*args):
            raise OSError("no C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    result = _generate(trained["distilled"], tmp_path / "c.h5", "--compile")
    assert result.exit_code == 2 and "--compile: torch.compile could not compile the flow's sampling: no C++ " \
                                       "compiler found" in result.stderr
    assert not (tmp_path / "c.h5").exists()


@needs_cxx
def test_generate_compile_writes_the_same_showers(trained, tmp_path):
    plain, compiled = _generate(trained["distilled"], tmp_path / "p.h5"), _generate(
        trained["distilled"], tmp_path / "c.h5", "--compile")
    assert plain.exit_code == 0 and compiled.exit_code == 0, compiled.output
    a, b = read_showers(tmp_path / "p.h5"), read_showers(tmp_path / "c.h5")
    np.testing.assert_array_equal(a.n_points, b.n_points)
    np.testing.assert_allclose(a.points, b.points, rtol=1e-4, atol=1e-3)
