"""Geometry conditioning, joint pre-training on several detectors, the transformer backbone and
every adaptation method on it, zero-shot generation for an unseen detector."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from caloadapt.adapt import METHODS, AdaptMethod, merge, prepare
from caloadapt.cli import app
from caloadapt.data import write_showers
from caloadapt.errors import CheckpointError
from caloadapt.geometry import DESCRIPTOR_DIM, geometry_descriptor, get_geometry
from caloadapt.models import ModelConfig, PointTransformer, PointwiseNet, Sampler, ShowerModel, load_model
from caloadapt.simulate import simulate
from caloadapt.train import (DataSource, TrainConfig, load_checkpoint, make_batch, model_from_checkpoint,
                             train)

TINY = dict(widths=(32, 32), time_dim=16, flow_hidden=(32,), flow_transforms=2)
TINY_TRANSFORMER = dict(backbone="transformer", transformer_dim=16, transformer_depth=2, transformer_heads=2,
                        transformer_inducing=4, time_dim=16, flow_hidden=(32,), flow_transforms=2)
SECOND_DETECTOR = "w-si-thick"


def tiny_config(**overrides) -> TrainConfig:
    values = dict(steps=8, batch_size=8, max_points=96, val_every=4, checkpoint_every=4, lr=3e-3, flow_lr=3e-3,
                  warmup_steps=2, device="cpu", val_max_showers=8)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def two_detectors(tmp_path_factory) -> list[Path]:
    """32 photons of 10-20 GeV in ild-ecal and in a second detector of the family."""
    folder = tmp_path_factory.mktemp("family")
    paths = []
    for i, name in enumerate(("ild-ecal", SECOND_DETECTOR)):
        energies = np.random.default_rng(i).uniform(10e3, 20e3, 32)
        paths.append(folder / f"{name}.h5")
        write_showers(paths[-1], simulate(name, "photon", energies, seed=10 + i))
    return paths


def _sources(paths: list[Path], weights=(1.0, 1.0)) -> list[DataSource]:
    return [DataSource(p, get_geometry(p.stem), w) for p, w in zip(paths, weights)]


# -- geometry conditioning -------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", [TINY, TINY_TRANSFORMER])
def test_conditioning_on_and_off_give_the_documented_shapes(backbone, two_detectors):
    geometry = get_geometry("ild-ecal")
    showers = simulate(geometry, "photon", np.array([15e3, 25e3]), seed=3)
    for conditioned, width in ((False, 2), (True, 2 + DESCRIPTOR_DIM)):
        config = ModelConfig(geometry_conditioning=conditioned, **backbone)
        model = ShowerModel(config)
        assert config.condition_dim == width
        assert model.net.context_dim == width
        assert model.flow.context_dim == width - 1  # the flow is not told the number of points
        batch = make_batch(showers, geometry, config, np.random.default_rng(0), 64)
        assert batch.condition.shape == (2, width)
        if conditioned:
            expected = torch.as_tensor(geometry_descriptor(geometry)).expand(2, -1)
            assert torch.equal(batch.condition[:, 2:], expected)
        losses = model(batch.points, batch.mask, batch.condition, batch.statistics)
        assert all(torch.isfinite(v) for v in losses.values())


def test_existing_single_detector_checkpoints_keep_working(tmp_path):
    from caloadapt.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pt", ShowerModel(ModelConfig(**TINY)))
    payload = load_checkpoint(tmp_path / "model.pt")
    # a checkpoint as caloadapt 0.1 wrote it before these options (and the occupancy calibration) existed
    newer = ("geometry_conditioning", "transverse_scale_rm", "depth_given", "shower_depth_condition", "backbone",
             "transformer_dim", "transformer_depth", "transformer_heads", "transformer_inducing")
    payload = {**{k: v for k, v in payload.items() if k != "occupancy"},
               "model_config": {k: v for k, v in payload["model_config"].items() if k not in newer}}
    model = model_from_checkpoint(payload)
    assert model.occupancy == {}
    assert model.config.backbone == "pointwise" and not model.config.geometry_conditioning
    assert isinstance(model.net, PointwiseNet) and model.net.context_dim == 2
    showers = model.generate(get_geometry("ild-ecal"), np.array([20e3]), Sampler(steps=2),
                             generator=torch.Generator().manual_seed(0))
    assert len(showers) == 1 and showers.n_points[0] > 0


def test_the_descriptor_reaches_the_model_and_changes_its_output():
    """A conditioned model sees which detector it simulates: other descriptor, other denoised points."""
    torch.manual_seed(0)
    model = ShowerModel(ModelConfig(geometry_conditioning=True, **TINY)).eval()
    for p in model.net.parameters():  # move off the initialisation so every input matters
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 16, 4)
    base = torch.tensor([[0.3, 0.5]])
    outputs = [model.denoiser(x, torch.tensor([1.0]),
                              torch.cat([base, torch.as_tensor(geometry_descriptor(get_geometry(name)))[None]], 1))
               for name in ("ild-ecal", SECOND_DETECTOR)]
    assert not torch.allclose(outputs[0], outputs[1])


# -- joint pre-training ----------------------------------------------------------------------------

def test_joint_pretraining_runs_per_detector_and_resumes_exactly(two_detectors, tmp_path):
    config = ModelConfig(geometry_conditioning=True, **TINY)
    sources = _sources(two_detectors, weights=(2.0, 1.0))
    torch.manual_seed(0)
    summary = train(ShowerModel(config), sources, None, tmp_path / "full", tiny_config(), progress=False)
    assert summary["steps"] == 8

    with open(tmp_path / "full" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 8]
    for name in ("ild-ecal", SECOND_DETECTOR):  # validation losses per detector
        assert np.isfinite(float(rows[-1][f"val_diffusion[{name}]"]))
    combined = float(rows[-1]["val_flow"])
    per_detector = [float(rows[-1][f"val_flow[{n}]"]) for n in ("ild-ecal", SECOND_DETECTOR)]
    assert combined == pytest.approx((2 * per_detector[0] + per_detector[1]) / 3, rel=1e-5)

    payload = load_checkpoint(tmp_path / "full" / "last.pt")
    assert [g["name"] for g in payload["geometries"]] == ["ild-ecal", SECOND_DETECTOR]
    assert [g["weight"] for g in payload["geometries"]] == pytest.approx([2 / 3, 1 / 3])
    cursors = payload["train_state"]["cursors"]
    batches_per_epoch = [int(np.ceil(0.9 * 32 / 8))] * 2  # 29 training showers of 32 in batches of 8
    taken = [c["epoch"] * n + c["position"] for c, n in zip(cursors, batches_per_epoch)]
    assert sum(taken) == 8 and min(taken) > 0  # every step drew one batch, from both detectors

    torch.manual_seed(0)
    train(ShowerModel(config), sources, None, tmp_path / "split", tiny_config(), progress=False,
          stop_after_steps=5)
    torch.manual_seed(123)  # the resumed run must not depend on the fresh model's initialisation
    train(ShowerModel(config), sources, None, tmp_path / "split", tiny_config(), resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    with pytest.raises(CheckpointError, match="2 training file"):
        train(ShowerModel(config), sources[:1], None, tmp_path / "split", tiny_config(), resume=True,
              progress=False)


def test_pretrain_cli_mixes_detectors(two_detectors, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(two_detectors[0]), "--data", str(two_detectors[1]), "-o", str(out),
            "--steps", "4", "--batch-size", "8", "--max-points", "64", "--val-every", "2", "--device", "cpu",
            "--backbone", "transformer", "--transformer-dim", "16", "--transformer-depth", "1",
            "--flow-hidden", "16", "--flow-transforms", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = load_checkpoint(out / "best.pt")
    assert payload["model_config"]["backbone"] == "transformer"
    assert payload["model_config"]["geometry_conditioning"] is True  # default with several detectors
    bad = CliRunner().invoke(app, [*args[:5], "--data-weight", "1", "-o", str(tmp_path / "x"), "--steps", "1"])
    assert bad.exit_code == 2 and "--data-weight" in bad.output
    unknown = CliRunner().invoke(app, [*args, "--backbone", "mamba"])
    assert unknown.exit_code == 2 and "unknown backbone" in unknown.output


# -- transformer backbone --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def transformer_model(two_detectors) -> ShowerModel:
    """A tiny geometry-conditioned transformer model, trained a few steps on both detectors."""
    torch.manual_seed(1)
    model = ShowerModel(ModelConfig(geometry_conditioning=True, **TINY_TRANSFORMER))
    out = two_detectors[0].parent / "transformer"
    train(model, _sources(two_detectors), None, out, tiny_config(steps=6, val_every=3), progress=False)
    return model_from_checkpoint(out / "best.pt")


def test_transformer_trains_and_generates_in_seen_and_unseen_detectors(transformer_model, tmp_path):
    assert isinstance(transformer_model.net, PointTransformer)
    spec = copy.deepcopy(get_geometry(SECOND_DETECTOR).spec)
    spec["name"] = "w-si-unseen"
    spec["stack"][0]["slabs"][0]["thickness_mm"] = 3.5  # thinner absorber than any training detector
    path = tmp_path / "unseen.yaml"
    path.write_text(yaml.safe_dump(spec))
    unseen = get_geometry(path)  # zero-shot: a detector the model never saw, known by its descriptor
    for geometry in (get_geometry("ild-ecal"), unseen, get_geometry("calochallenge-3")):
        showers = transformer_model.generate(geometry, np.array([12e3, 18e3]), Sampler(steps=2),
                                             generator=torch.Generator().manual_seed(0))
        assert len(showers) == 2
        assert np.all(np.isfinite(showers.points))
        assert np.all(geometry.layer_index(showers.points[:, 2]) >= 0)


def _expected_trainable(net, method: AdaptMethod) -> set[int]:
    if method.name in ("full", "scratch"):
        return {id(p) for p in net.parameters()}
    if method.name == "bitfit":
        return {id(p) for _, p in net.bias_vectors()}
    if method.name == "bitfit-context":
        return {id(p) for _, p in net.bias_vectors() + net.conditioning_maps()}
    if method.name == "top-k":
        return {id(p) for _, p in net.top_layers(method.k)}
    raise AssertionError(method.name)


@pytest.mark.parametrize("name", METHODS)
def test_every_adaptation_method_trains_exactly_its_groups_on_the_transformer(name, transformer_model,
                                                                               two_detectors, tmp_path):
    if name in ("lora", "dora", "ia3", "loha"):
        pytest.importorskip("peft")
    method = AdaptMethod(name, k=1, rank=2, alpha=2.0, target="linear")
    model, names = prepare(transformer_model, method, seed=0)
    net_prefix = "denoiser.net."
    net_names = {n for n in names if n.startswith(net_prefix)}
    params = dict(model.named_parameters())
    if method.is_peft:
        adapter = {n for n in net_names if "base_layer" not in n}
        assert adapter == net_names and net_names, "only adapter tensors of the network train"
        targets = set(transformer_model.net.adapter_targets(("linear",), None))
        wrapped = {n[len(net_prefix):].split(".base_layer")[0] for n in params if ".base_layer." in n}
        assert wrapped == targets
    else:
        expected = _expected_trainable(model.net, method)
        assert {id(params[n]) for n in net_names} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Adam's normalised first step moves even tensors with tiny gradients (adaLN gates start near 0)
    config = tiny_config(steps=1, val_every=1, lr=1e-2, optimizer="adam")
    train(model, _sources(two_detectors[:1]), None, tmp_path, config, trainable=names, fit_normalisation=False,
          progress=False)
    for n, p in model.named_parameters():
        if n not in names:
            assert torch.equal(p, before[n]), f"{name}: frozen {n} changed"
    assert any(not torch.equal(params[n], before[n]) for n in net_names), f"{name}: nothing trained"
    plain = merge(model, method)
    assert list(plain.state_dict()) == list(transformer_model.state_dict())



def test_transformer_distils_to_one_step_generation(transformer_model, two_detectors, tmp_path):
    from caloadapt.train.distill import DistillConfig, distill

    config = DistillConfig(steps=2, batch_size=8, max_points=64, val_every=2, checkpoint_every=2, device="cpu",
                           val_max_showers=8, val_max_points=48, val_teacher_steps=3)
    summary = distill(transformer_model, two_detectors[1], get_geometry(SECOND_DETECTOR), tmp_path, config,
                      progress=False)
    assert np.isfinite(summary["best"]["one_step"])
    model, sampler = load_model(tmp_path / "best.pt")
    assert sampler.distilled
    assert isinstance(model.net, PointTransformer) and model.config.geometry_conditioning
    showers = model.generate(get_geometry(SECOND_DETECTOR), np.array([15e3, 30e3]), sampler,
                             generator=torch.Generator().manual_seed(0))
    assert len(showers) == 2 and np.all(np.isfinite(showers.points)) and np.all(showers.n_points > 0)


def test_a_run_from_before_joint_training_resumes(two_detectors, tmp_path):
    """Checkpoints of version 0.1 kept one (epoch, position) cursor; resuming them still works."""
    config, sources = ModelConfig(**TINY), _sources(two_detectors[:1])
    train(ShowerModel(config), sources, None, tmp_path, tiny_config(), progress=False, stop_after_steps=4)
    payload = load_checkpoint(tmp_path / "last.pt")
    cursor = payload["train_state"].pop("cursors")[0]
    payload["train_state"].update(cursor)
    torch.save(payload, tmp_path / "last.pt")
    summary = train(ShowerModel(config), sources, None, tmp_path, tiny_config(), resume=True, progress=False)
    assert summary["steps"] == 8
    after = load_checkpoint(tmp_path / "last.pt")["train_state"]["cursors"][0]
    per_epoch = 4  # 29 training showers in batches of 8
    assert after["epoch"] * per_epoch + after["position"] == cursor["epoch"] * per_epoch + cursor["position"] + 4


def test_shipped_multi_detector_model_generates_for_the_held_out_detector():
    payload = load_checkpoint("multi-detector")  # shipped models load by name
    trained_on = [g["name"] for g in payload["geometries"]]
    assert "pb-scintillator" not in trained_on and len(trained_on) >= 4
    model = model_from_checkpoint(payload)
    assert model.config.geometry_conditioning
    showers = model.generate(get_geometry("pb-scintillator"), np.array([30e3, 60e3]), Sampler(steps=2),
                             generator=torch.Generator().manual_seed(0))
    assert len(showers) == 2 and np.all(showers.n_points > 50)
    # the visible energy follows the held-out detector's sampling fraction (0.16), not ILD's (0.02)
    calibration = get_geometry("pb-scintillator").energy.calibration
    fraction = showers.energy_sum_mev / calibration / showers.incident_energy_mev
    assert np.all((fraction > 0.08) & (fraction < 0.3)), fraction
