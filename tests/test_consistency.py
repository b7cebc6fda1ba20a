"""Consistency distillation: scalings, training run, checkpoints, one-step sampler and generation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from caloadapt.data import write_showers
from caloadapt.geometry import get_geometry
from caloadapt.models import ModelConfig, Sampler, ShowerModel, load_model
from caloadapt.models.consistency import ConsistencyPrecond, multistep_sigmas, sample_consistency
from caloadapt.models.edm import EDMPrecond
from caloadapt.models.fused import FusedDenoiser
from caloadapt.models.pointwise import PointwiseNet
from caloadapt.simulate import simulate
from caloadapt.train import TrainConfig, load_checkpoint, model_from_checkpoint, train
from caloadapt.train.distill import DistillConfig, distill

TINY = ModelConfig(widths=(32, 32), time_dim=16, flow_hidden=(32,), flow_transforms=2)


def distill_config(**overrides) -> DistillConfig:
    values = dict(steps=6, batch_size=8, max_points=96, val_every=3, checkpoint_every=3, device="cpu",
                  val_max_showers=8, val_max_points=64, val_teacher_steps=6)
    values.update(overrides)
    return DistillConfig(**values)


@pytest.fixture(scope="module")
def ild_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "ild.h5"
    energies = np.random.default_rng(0).uniform(10e3, 30e3, 24)
    write_showers(path, simulate("ild-ecal", "photon", energies, seed=1))
    return path


@pytest.fixture(scope="module")
def teacher_path(ild_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    config = TrainConfig(steps=12, batch_size=8, max_points=96, val_every=12, checkpoint_every=12, lr=3e-3,
                         flow_lr=3e-3, warmup_steps=2, device="cpu", val_max_showers=8)
    train(ShowerModel(TINY), ild_file, get_geometry("ild-ecal"), out, config, progress=False)
    return out / "best.pt"


@pytest.fixture(scope="module")
def distilled(teacher_path, ild_file, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cm")
    summary = distill(model_from_checkpoint(teacher_path), ild_file, get_geometry("ild-ecal"), out,
                      distill_config(), checkpoint_parts={"teacher": str(teacher_path)}, progress=False)
    return out, summary


def test_boundary_condition_and_scalings():
    torch.manual_seed(0)
    net = PointwiseNet(widths=(16,), time_dim=8)
    f = ConsistencyPrecond(net, sigma_data=0.5, sigma_min=0.002)
    x, context = torch.randn(3, 7, 4), torch.randn(3, 2)
    # f(x, sigma_min) = x exactly: c_skip = 1, c_out = 0
    assert torch.allclose(f(x, 0.002, context), x, atol=1e-7)
    sigma = torch.tensor([0.01, 1.0, 80.0])
    c_skip, c_out, c_in, c_noise = f.scalings(sigma)
    s = sigma[:, None, None]
    assert torch.allclose(c_skip, 0.25 / ((s - 0.002) ** 2 + 0.25))
    assert torch.allclose(c_out, (s - 0.002) * 0.5 / (s**2 + 0.25).sqrt())
    assert torch.allclose(c_in, 1 / (s**2 + 0.25).sqrt())
    assert torch.allclose(c_noise, sigma.log() / 4)
    # wrapping an EDM denoiser shares (or copies) its network
    edm = EDMPrecond(net)
    assert ConsistencyPrecond.from_edm(edm).net is net
    assert ConsistencyPrecond.from_edm(edm, copy_net=True).net is not net


def test_multistep_levels():
    assert multistep_sigmas(1) == [80.0]
    two = multistep_sigmas(2)
    assert two[0] == pytest.approx(80.0) and 0.002 < two[1] < 80.0
    with pytest.raises(ValueError):
        multistep_sigmas(0)


def test_distillation_writes_loadable_checkpoints(distilled, teacher_path):
    out, summary = distilled
    assert summary["steps"] == 6 and Path(summary["checkpoint"]) == out / "best.pt"
    for name in ("best.pt", "last.pt", "metrics.csv"):
        assert (out / name).is_file()
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    assert all(np.isfinite(float(r["val_one_step"])) for r in rows)

    payload = load_checkpoint(out / "last.pt")
    for key in ("model", "ema", "target", "optimizer", "train_state", "train_config", "consistency", "geometry"):
        assert key in payload
    settings = load_checkpoint(out / "best.pt")["consistency"]
    assert settings["sigma_min"] == 0.002 and settings["sigma_max"] == 80.0 and settings["steps"] == [1, 2]
    assert settings["teacher"] == str(teacher_path)
    # the student is sampled in one consistency step on its range; the teacher with the EDM default
    assert load_model(out / "best.pt")[1] == Sampler("consistency", 1, 0.002, 80.0, 7.0)
    assert load_model(teacher_path)[1] == Sampler() and not Sampler().distilled

    teacher = model_from_checkpoint(teacher_path)
    student, _ = load_model(out / "best.pt")  # an ordinary ShowerModel checkpoint
    assert student.config == teacher.config
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key in t_state:
        if not key.startswith("denoiser.net."):  # the flow and the normalisation are the teacher's
            assert torch.equal(t_state[key], s_state[key]), key
    raw, _ = load_model(out / "last.pt", weights="model")
    assert any(not torch.equal(t_state[k], v) for k, v in raw.state_dict().items() if k.startswith("denoiser.net."))


def test_distillation_reduces_the_one_step_error(teacher_path, ild_file, tmp_path):
    """With a larger learning rate a few dozen steps already move f towards the teacher's ODE solution."""
    summary = distill(model_from_checkpoint(teacher_path), ild_file, get_geometry("ild-ecal"), tmp_path,
                      distill_config(steps=40, lr=2e-3, val_every=20, checkpoint_every=40), progress=False)
    with open(tmp_path / "metrics.csv") as f:
        scores = [float(r["val_one_step"]) for r in csv.DictReader(f)]
    assert scores[-1] < scores[0]
    assert summary["best_step"]["one_step"] > 0


def test_resume_continues_to_the_same_result(teacher_path, ild_file, tmp_path):
    geometry = get_geometry("ild-ecal")
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill(model_from_checkpoint(teacher_path), ild_file, geometry, straight, distill_config(), progress=False)
    distill(model_from_checkpoint(teacher_path), ild_file, geometry, split, distill_config(), stop_after_steps=4,
            progress=False)
    assert load_checkpoint(split / "last.pt")["train_state"]["step"] == 4
    distill(model_from_checkpoint(teacher_path), ild_file, geometry, split, distill_config(), resume=True,
            progress=False)
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(straight / name), load_checkpoint(split / name)
        for part in ("model", "ema", "target"):
            assert a[part].keys() == b[part].keys()
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), (name, part, key)
        assert a["train_state"]["best"] == b["train_state"]["best"]

    def scores(run: Path) -> list[tuple[str, ...]]:  # (the running training loss restarts with the call)
        with open(run / "metrics.csv") as f:
            return [(r["step"], r["val_loss"], r["val_one_step"]) for r in csv.DictReader(f)]

    assert scores(straight) == scores(split) and [int(r[0]) for r in scores(split)] == [0, 3, 6]


def test_a_distillation_is_an_ordinary_training_run(teacher_path, ild_file, tmp_path):
    """Distillation goes through the training loop: the run folder is locked, a finished run is not
    resumed by another distillation and a distillation from another options set is refused."""
    from caloadapt.errors import CheckpointError, TrainingError
    from caloadapt.train.rundir import run_lock

    geometry = get_geometry("ild-ecal")
    with run_lock(tmp_path / "held"), pytest.MonkeyPatch.context() as patch:
        patch.setattr("caloadapt.train.rundir._held", {})  # as if another process held it
        with pytest.raises(TrainingError, match="another caloadapt run"):
            distill(model_from_checkpoint(teacher_path), ild_file, geometry, tmp_path / "held", distill_config(),
                    progress=False)
    distill(model_from_checkpoint(teacher_path), ild_file, geometry, tmp_path / "cm", distill_config(),
            stop_after_steps=3, progress=False)
    with pytest.raises(CheckpointError, match="other training options"):
        distill(model_from_checkpoint(teacher_path), ild_file, geometry, tmp_path / "cm",
                distill_config(sigma_max=20.0), resume=True, progress=False)


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_both_checkpoints_of_a_distillation_load_and_generate(distilled, name):
    model, sampler = load_model(distilled[0] / name)
    assert sampler == Sampler("consistency", 1, 0.002, 80.0, 7.0)
    geometry = get_geometry("ild-ecal")
    showers = model.generate(geometry, np.array([10e3, 25e3]), sampler, generator=torch.Generator().manual_seed(0))
    assert len(showers) == 2 and np.all(np.isfinite(showers.points)) and np.all(showers.n_points > 0)


def test_a_distilled_checkpoint_of_the_earlier_layout_loads_and_generates(distilled, teacher_path, ild_file,
                                                                          tmp_path):
    """Distilled checkpoints written before distillation shared the training loop (no scheduler, the
    train state of its own loop) load and generate; resuming such a run is a one-line error."""
    from caloadapt.errors import CheckpointError
    from caloadapt.train import save_checkpoint

    payload = load_checkpoint(distilled[0] / "last.pt")
    model, _ = load_model(distilled[0] / "last.pt", weights="model")
    old = {key: payload[key] for key in ("ema", "target", "geometry", "consistency", "sampler")}
    old["optimizer"] = payload["optimizer"]
    old["train_state"] = {"step": 6, "epoch": 2, "position": 0, "best": {"one_step": 0.5, "loss": 0.1},
                          "best_step": 6, "final": {"one_step": 0.5, "loss": 0.1}, "wall_s": 1.0}
    old["train_config"] = {k: v for k, v in payload["train_config"].items()
                           if k not in ("flow_lr", "schedule", "warmup_steps", "patience", "occupancy_showers")}
    run = tmp_path / "old"
    run.mkdir()
    save_checkpoint(run / "last.pt", model, **old)
    loaded, sampler = load_model(run / "last.pt")
    assert sampler.distilled
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, payload["ema"][key]), key
    showers = loaded.generate(get_geometry("ild-ecal"), np.array([10e3]), sampler,
                              generator=torch.Generator().manual_seed(0))
    assert np.all(np.isfinite(showers.points))
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        distill(model_from_checkpoint(teacher_path), ild_file, get_geometry("ild-ecal"), run, distill_config(),
                resume=True, progress=False)


def test_one_step_sampler_is_seeded_finite_and_masked(distilled):
    model, _ = load_model(distilled[0] / "best.pt")
    context = torch.tensor([[0.5, 0.6], [0.2, 0.4], [0.9, 0.8]])
    mask = torch.arange(50)[None, :] < torch.tensor([50, 20, 35])[:, None]

    def draw(seed: int, n_steps: int = 1) -> torch.Tensor:
        return sample_consistency(model.denoiser, context, 50, mask=mask, n_steps=n_steps,
                                  generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(1), draw(1), draw(2)
    assert a.shape == (3, 50, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a[~mask] == 0)
    two = draw(1, n_steps=2)
    assert torch.isfinite(two).all() and not torch.equal(two, a)
    # explicit ConsistencyPrecond and the EDMPrecond of the distilled model give the same function
    f = ConsistencyPrecond.from_edm(model.denoiser)
    assert torch.equal(sample_consistency(f, context, 50, mask=mask, generator=torch.Generator().manual_seed(1)), a)


@pytest.mark.parametrize("name", ["ild-ecal", "calochallenge-3"])
def test_one_step_generation_writes_valid_showers(distilled, name):
    model, sampler = load_model(distilled[0] / "best.pt")
    geometry = get_geometry(name)
    energies = np.array([5e3, 20e3, 50e3])

    def run(seed: int):
        showers = model.generate(geometry, energies, sampler, particle=geometry.particle,
                                 generator=torch.Generator().manual_seed(seed))
        return showers, geometry.digitise(showers)

    (raw, hits), (raw_b, _), (raw_c, _) = run(3), run(3), run(4)
    assert len(raw) == 3 and raw.geometry == name
    assert np.all(np.isfinite(raw.points))
    assert np.array_equal(raw.points, raw_b.points) and not np.array_equal(raw.points, raw_c.points)
    assert np.all(hits.points[:, 3] >= geometry.energy.threshold_mev)
    assert np.all(geometry.cell_index(hits.points) >= 0)
    # the two-step sampler goes through the same path
    two = model.generate(geometry, energies, sampler.with_steps(2), generator=torch.Generator().manual_seed(3))
    assert np.all(np.isfinite(two.points)) and np.array_equal(two.n_points, raw.n_points)
    assert model.denoiser.__class__ is EDMPrecond  # generation leaves the model as it was


@pytest.mark.parametrize("wrapped", ["edm", "consistency"])
def test_fused_chunked_evaluation_matches_the_network(wrapped):
    torch.manual_seed(0)
    edm = EDMPrecond(PointwiseNet(widths=(24, 40), time_dim=8))
    denoiser = edm if wrapped == "edm" else ConsistencyPrecond.from_edm(edm)
    counts = torch.tensor([30, 0, 7, 50, 1, 19])
    mask = torch.arange(50)[None, :] < counts[:, None]
    x, context = torch.randn(6, 50, 4), torch.randn(6, 2)
    sigma = torch.tensor([80.0, 3.0, 0.5, 0.01, 1.0, 10.0])
    with torch.no_grad():
        plain = denoiser(x, sigma, context)
        masked = FusedDenoiser(denoiser, chunk_points=40)(x, sigma, context, mask)  # several size groups
        assert torch.allclose(masked[mask], plain[mask], atol=1e-5)
        assert torch.all(masked[~mask] == 0)
        chunked = FusedDenoiser(denoiser, chunk_points=120)(x, sigma, context)  # no mask: whole showers
        assert torch.allclose(chunked, plain, atol=1e-5)
        scattered = mask.flip(1)  # not a prefix: falls back to whole showers
        assert torch.allclose(FusedDenoiser(denoiser, chunk_points=64)(x, sigma, context, scattered), plain,
                              atol=1e-5)
    # under autograd it is the wrapped module itself
    out = FusedDenoiser(denoiser)(x, sigma, context, mask)
    assert out.requires_grad and torch.equal(out, denoiser(x, sigma, context))
    # the fast one-step sampler equals the plain one up to rounding
    with torch.no_grad():
        fast = sample_consistency(denoiser, context, 50, mask=mask, generator=torch.Generator().manual_seed(0))
        slow = sample_consistency(denoiser, context, 50, mask=mask, generator=torch.Generator().manual_seed(0),
                                  fast=False)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_generation_with_the_consistency_sampler_rewraps_the_denoiser(distilled):
    """ShowerModel.generate hands its EDMPrecond (holding the student) to the consistency sampler,
    which evaluates it as the consistency function: the same showers as an explicit ConsistencyPrecond."""
    model, sampler = load_model(distilled[0] / "best.pt")
    geometry, energies = get_geometry("ild-ecal"), np.array([10e3, 30e3])
    implicit = model.generate(geometry, energies, sampler, generator=torch.Generator().manual_seed(5))
    explicit = model.generate(geometry, energies, sampler, generator=torch.Generator().manual_seed(5),
                              denoiser=ConsistencyPrecond.from_edm(model.denoiser, sampler.sigma_min))
    assert np.array_equal(implicit.points, explicit.points)
    # a FusedDenoiser around the EDMPrecond (what generate passes) is re-wrapped correctly
    context = torch.tensor([[0.5, 0.5]])
    mask = torch.ones(1, 30, dtype=torch.bool)
    a = sample_consistency(FusedDenoiser(model.denoiser), context, 30, mask=mask,
                           generator=torch.Generator().manual_seed(0))
    b = sample_consistency(model.denoiser, context, 30, mask=mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_generate_uses_the_noise_range_the_model_was_distilled_on(teacher_path, ild_file, tmp_path):
    """`caloadapt generate` with a distilled checkpoint samples on the checkpoint's own sigma range."""
    from typer.testing import CliRunner

    from caloadapt.cli import app
    from caloadapt.data import read_showers
    from caloadapt.generate import iter_generate

    distill(model_from_checkpoint(teacher_path), ild_file, get_geometry("ild-ecal"), tmp_path / "cm",
            distill_config(steps=2, val_every=2, checkpoint_every=2, sigma_max=20.0), progress=False)
    model, sampler = load_model(tmp_path / "cm" / "best.pt")
    assert sampler == Sampler("consistency", 1, 0.002, 20.0, 7.0)
    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(tmp_path / "cm" / "best.pt"), "-g", "ild-ecal",
                                      "--n", "4", "--energy", "10:30", "--device", "cpu", "-o", str(tmp_path / "g.h5")])
    assert result.exit_code == 0, result.output
    written = read_showers(tmp_path / "g.h5")
    geometry = get_geometry("ild-ecal")

    def generated(chosen: Sampler):
        return next(iter_generate(model, geometry, written.incident_energy_mev, chosen, particle=written.particle))

    ours, default_range = generated(sampler), generated(Sampler("consistency", 1))
    assert np.array_equal(written.n_points, ours.n_points)
    assert np.allclose(written.points, ours.points.astype(written.points.dtype))
    assert not (np.array_equal(default_range.n_points, ours.n_points)
                and np.allclose(default_range.points, ours.points))


def test_a_smaller_student_is_distilled_saved_and_resumed(teacher_path, ild_file, tmp_path):
    """A pointwise student narrower than the teacher: its own size in the checkpoint (fewer parameters),
    the teacher's flow and normalisation, a one-step error that falls from its fresh start, and a
    resumed run that ends where an uninterrupted one does."""
    geometry, teacher = get_geometry("ild-ecal"), model_from_checkpoint(teacher_path)
    config = distill_config(steps=30, lr=3e-3, val_every=15, checkpoint_every=15, student_widths=(16,))
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill(teacher, ild_file, geometry, straight, config, progress=False)
    distill(teacher, ild_file, geometry, split, config, stop_after_steps=15, progress=False)
    distill(teacher, ild_file, geometry, split, config, resume=True, progress=False)

    student, sampler = load_model(straight / "best.pt")
    assert sampler.distilled and student.config.widths == (16,) and teacher.config.widths == (32, 32)
    settings = load_checkpoint(straight / "best.pt")["consistency"]
    assert settings["student_parameters"] == sum(p.numel() for p in student.denoiser.net.parameters())
    assert settings["student_parameters"] < settings["teacher_parameters"]
    for key, value in teacher.state_dict().items():
        if not key.startswith("denoiser."):
            assert torch.equal(value, student.state_dict()[key]), key
    with open(straight / "metrics.csv") as f:
        scores = [float(r["val_one_step"]) for r in csv.DictReader(f)]
    assert scores[-1] < scores[0]
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    for part in ("model", "ema", "target"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    showers = student.generate(geometry, np.array([20e3, 30e3]), sampler, generator=torch.Generator().manual_seed(0))
    assert len(showers) == 2 and np.all(np.isfinite(showers.points))


def test_a_student_sized_for_the_other_backbone_is_refused(teacher_path):
    from caloadapt.errors import InputError

    teacher = model_from_checkpoint(teacher_path)
    with pytest.raises(InputError, match="transformer student"):
        distill_config(student_dim=32).student_config(teacher.config)
    with pytest.raises(InputError, match="positive"):
        distill_config(student_widths=(16, 0))


def test_a_student_with_a_smaller_flow_trains_it_by_likelihood_and_is_recalibrated(teacher_path, ild_file, tmp_path):
    """A student flow of another size starts fresh and learns the showers' statistics beside the
    distillation (its validation likelihood improves), its weights move while the teacher's flow is
    not copied, and the occupancy calibration is fitted again for it."""
    geometry, teacher = get_geometry("ild-ecal"), model_from_checkpoint(teacher_path)
    config = distill_config(steps=30, lr=3e-3, flow_lr=3e-3, val_every=15, checkpoint_every=15,
                            student_flow_transforms=1, student_flow_hidden=(8,))
    summary = distill(teacher, ild_file, geometry, tmp_path, config, progress=False)
    student, sampler = load_model(tmp_path / "best.pt")
    assert (student.config.flow_transforms, student.config.flow_hidden) == (1, (8,))
    assert student.config.widths == teacher.config.widths  # the point network keeps the teacher's size
    settings = load_checkpoint(tmp_path / "best.pt")["consistency"]
    assert settings["student_flow_parameters"] == sum(p.numel() for p in student.flow.parameters())
    assert settings["student_flow_parameters"] < settings["teacher_flow_parameters"]
    with open(tmp_path / "metrics.csv") as f:
        flow_nll = [float(r["val_flow"]) for r in csv.DictReader(f)]
    assert len(flow_nll) == 3 and flow_nll[-1] < flow_nll[0]
    assert summary["best_step"]["flow"] > 0
    fit = student.occupancy[geometry.name].fit
    assert fit["sampler"] == "consistency" and fit["n_showers"] > 0  # fitted again, with the student's sampler
    showers = student.generate(geometry, np.array([20e3]), sampler, generator=torch.Generator().manual_seed(0))
    assert len(showers) == 1 and np.all(np.isfinite(showers.points))
