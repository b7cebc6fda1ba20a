"""ONNX export of the point network: dynamic shapes, parity with PyTorch, generation through onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from caloadapt.export.onnx import (PARITY_TOLERANCE, OnnxDenoiser, export_checkpoint_onnx, export_onnx,  # noqa: E402
                                   onnx_metadata, onnx_model, parity_check)
from caloadapt.geometry import get_geometry  # noqa: E402
from caloadapt.models import Sampler, ShowerModel, load_model  # noqa: E402
from caloadapt.models.consistency import sample_consistency  # noqa: E402
from caloadapt.models.edm import sample_heun  # noqa: E402
from caloadapt.train import model_from_checkpoint  # noqa: E402



@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints) -> tuple[Path, Path]:
    return tiny_checkpoints


@pytest.fixture(scope="module")
def edm_export(checkpoints, tmp_path_factory) -> tuple[ShowerModel, Path]:
    model = model_from_checkpoint(checkpoints[0])
    return model, export_onnx(model, tmp_path_factory.mktemp("edm") / "sub" / "model.onnx")


def test_edm_export_has_dynamic_batch_and_points(edm_export):
    import onnx

    model, path = edm_export
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))  # written atomically
    proto = onnx.load(str(path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["x"][0] == dims["sigma"][0] == dims["context"][0] and isinstance(dims["x"][0], str)
    assert isinstance(dims["x"][1], str) and dims["x"][2] == 4 and dims["context"][1] == 2
    meta = onnx_metadata(path)
    assert meta["kind"] == "edm" and meta["point_dim"] == "4" and meta["exporter"].startswith("torch.onnx.export")


def test_edm_parity_on_several_batch_and_point_counts(edm_export):
    model, path = edm_export
    assert parity_check(model, path, n_trials=5) <= PARITY_TOLERANCE


def test_distilled_checkpoint_exports_the_consistency_function(checkpoints, tmp_path):
    path, model, settings = export_checkpoint_onnx(checkpoints[1], tmp_path / "cm.onnx")
    assert settings is not None and onnx_metadata(path)["kind"] == "consistency"
    assert parity_check(model, path, n_trials=4) <= PARITY_TOLERANCE
    # one-step generation through onnxruntime equals the torch path up to float rounding
    onnx_view = onnx_model(model, path, threads=1)
    assert onnx_view.denoiser.kind == "consistency" and model.denoiser.__class__.__name__ == "EDMPrecond"
    geometry, energies = get_geometry("ild-ecal"), np.array([20e3, 50e3])
    sampler = load_model(checkpoints[1])[1]
    ours = onnx_view.generate(geometry, energies, sampler, generator=torch.Generator().manual_seed(2),
                              particle="photon")
    ref = model.generate(geometry, energies, sampler, generator=torch.Generator().manual_seed(2), particle="photon")
    assert np.array_equal(ours.n_points, ref.n_points) and np.all(np.isfinite(ours.points))
    assert np.isclose(ours.points[:, 3].sum(), ref.points[:, 3].sum(), rtol=1e-4)
    context = torch.tensor([[0.5, 0.6], [0.1, 0.3]])
    a = sample_consistency(onnx_view.denoiser, context, 300, generator=torch.Generator().manual_seed(0))
    b = sample_consistency(model.denoiser, context, 300, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, atol=1e-4)


def test_onnx_denoiser_drives_the_heun_sampler(edm_export):
    model, path = edm_export
    denoiser = OnnxDenoiser(path, threads=1)
    context = torch.tensor([[0.4, 0.5], [0.7, 0.6], [0.2, 0.1]])
    mask = torch.arange(40)[None, :] < torch.tensor([40, 10, 25])[:, None]
    noise = torch.randn(3, 40, 4, generator=torch.Generator().manual_seed(0))
    ours = sample_heun(denoiser, context, mask=mask, n_steps=4, noise=noise)
    ref = sample_heun(model.denoiser, context, mask=mask, n_steps=4, noise=noise)
    assert torch.allclose(ours, ref, atol=1e-4)
    # ... and whole-shower generation with the ONNX network (the flow stays in torch)
    view = onnx_model(model, path, threads=1)
    showers = view.generate(get_geometry("calochallenge-3"), np.array([10e3, 40e3]), Sampler(steps=2),
                            generator=torch.Generator().manual_seed(1))
    assert len(showers) == 2 and np.all(np.isfinite(showers.points))
    assert model.denoiser.__class__.__name__ == "EDMPrecond"  # the view did not touch the model
    # an EDM export is no consistency function
    with pytest.raises(ValueError, match="not a consistency function"):
        sample_consistency(denoiser, context, 10)


def test_missing_onnx_file_is_a_clear_error(tmp_path):
    from caloadapt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no such ONNX file"):
        OnnxDenoiser(tmp_path / "missing.onnx")


def test_transformer_export_takes_the_padding_mask(tmp_path):
    """The transformer attends between points: its export has a mask input, and padding must not
    change the real points' outputs in onnxruntime either."""
    from caloadapt.models import ModelConfig

    torch.manual_seed(0)
    model = ShowerModel(ModelConfig(backbone="transformer", geometry_conditioning=True, transformer_dim=16,
                                    transformer_depth=2, transformer_heads=2, transformer_inducing=4, time_dim=16,
                                    flow_hidden=(16,), flow_transforms=1)).eval()
    for p in model.denoiser.net.parameters():  # off the zero initialisation, so attention matters
        p.data.normal_(0.0, 0.3)
    path = export_onnx(model, tmp_path / "transformer.onnx")
    assert onnx_metadata(path)["mask"] == "1"
    denoiser = OnnxDenoiser(path, threads=1)
    assert denoiser.takes_mask
    assert parity_check(model, path, n_trials=4) <= PARITY_TOLERANCE
    gen = torch.Generator().manual_seed(2)
    x, context = torch.randn(1, 30, 4, generator=gen), torch.randn(1, model.net.context_dim, generator=gen)
    sigma = torch.tensor([1.0])
    mask = torch.arange(30)[None, :] < 20
    padded = denoiser(x, sigma, context, mask)[:, :20]
    alone = denoiser(x[:, :20], sigma, context)
    assert torch.allclose(padded, alone, atol=1e-5)
    showers = onnx_model(model, path, threads=1).generate(get_geometry("ild-ecal"), np.array([20e3]), Sampler(steps=2),
                                                          generator=torch.Generator().manual_seed(1))
    assert len(showers) == 1 and np.all(np.isfinite(showers.points))


def test_depth_given_export_keeps_the_given_channel(tmp_path):
    """A depth-given model exports its given channel (returned unchanged by onnxruntime too) and
    generates through onnxruntime the showers it generates in PyTorch."""
    from caloadapt.models import ModelConfig

    torch.manual_seed(0)
    model = ShowerModel(ModelConfig(depth_given=True, widths=(16, 16), time_dim=8, flow_hidden=(16,),
                                    flow_transforms=1)).eval()
    for p in model.denoiser.net.parameters():
        p.data.normal_(0.0, 0.3)
    path = export_onnx(model, tmp_path / "given.onnx")
    assert onnx_metadata(path)["given_channels"] == "2"
    assert parity_check(model, path, n_trials=3) <= PARITY_TOLERANCE
    x = torch.randn(2, 9, 4)
    out = OnnxDenoiser(path, threads=1)(x, torch.tensor([3.0, 0.2]), torch.randn(2, model.net.context_dim))
    torch.testing.assert_close(out[..., 2], x[..., 2], rtol=0, atol=1e-6)
    geometry, energies = get_geometry("ild-ecal"), np.array([15e3, 25e3])
    runs = [m.generate(geometry, energies, Sampler(steps=3), generator=torch.Generator().manual_seed(1))
            for m in (model, onnx_model(model, path, threads=1))]
    np.testing.assert_array_equal(runs[0].n_points, runs[1].n_points)
    np.testing.assert_allclose(runs[0].points, runs[1].points, rtol=1e-3, atol=1e-3)
