"""TorchScript export of the whole one-step generator: each rewritten step against the original, the
file loaded with torch alone, the DDML and Par04 contracts, agreement with ``generate`` in distribution."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from caloadapt.cli import app
from caloadapt.export.torchscript import (ShowerGenerator, cell_index, ddml_direction, export_torchscript,
                                          features_to_points, layers_from_statistics, par04_direction,
                                          parse_ddml_output, points_for_hits, scale_layers, shift_centre_of_gravity,
                                          torchscript_metadata, visible_cell_factor)
from caloadapt.geometry import get_geometry
from caloadapt.incidence import angles_from_local_direction, local_direction
from caloadapt.models import ModelConfig, Sampler, ShowerModel, load_model
from caloadapt.models.occupancy import OccupancyCalibration, layer_counts
from caloadapt.models.representation import DepthGrid, PointFrame, statistics_to_layers
from caloadapt.models.shower_model import _scale_layers, _shift_centre_of_gravity, _visible_cell_scale
from caloadapt.showers import Showers

runner = CliRunner()
ONE_STEP = Sampler(kind="consistency", steps=1, sigma_max=5.0)


def _double(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float64))


# -- each rewritten step equals the original on the same input ------------------------------------------

@pytest.mark.parametrize("name", ["ild-ecal", "generic-mesh"])
def test_layers_from_statistics_equals_statistics_to_layers(name):
    geometry, grid = get_geometry(name), DepthGrid()
    rng = np.random.default_rng(0)
    stats = np.concatenate([rng.normal(-6, 3, grid.n_bins), rng.normal(1, 2, grid.n_bins), rng.normal(0, 0.1, 2)])
    hits, energy, cog = statistics_to_layers(geometry, stats[None], np.array([40e3]), grid)
    overlap = grid.overlap(geometry)
    covered = overlap.sum(axis=0, keepdims=True)
    share = np.divide(overlap, covered, out=np.zeros_like(overlap), where=covered > 0).T
    got = layers_from_statistics(_double(stats), 40e3, _double(share),
                                 _double(geometry.energy.calibration * geometry.layer_visible_fraction))
    np.testing.assert_array_equal(got[0].numpy(), hits[0])
    np.testing.assert_allclose(got[1].numpy(), energy[0], rtol=1e-12)
    np.testing.assert_array_equal(got[2].numpy(), cog[0])


def test_points_for_hits_equals_the_calibration_with_the_same_draws():
    rng = np.random.default_rng(1)
    calibration = OccupancyCalibration("x", tuple(rng.normal(0, 0.5, 6)), tuple(rng.uniform(0, 0.3, 6)),
                                       tuple(rng.uniform(0.8, 1.2, 6)), {})
    hits = np.array([0, 1, 3, 17, 250, 2])
    expected = calibration.points_for_hits(hits, np.random.default_rng(7))
    uniform = np.random.default_rng(7).random(6)  # what stochastic_round draws
    got = points_for_hits(torch.as_tensor(hits), _double(calibration.log_efficiency), _double(calibration.exponent),
                          _double(calibration.hit_scale), _double(uniform))
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("name,frame,r0", [("ild-ecal", "physical", 0.2), ("ild-ecal", "physical", 0.0),
                                           ("ild-ecal", "box", 0.0), ("generic-mesh", "physical", 0.2)])
def test_features_to_points_equals_point_frame(name, frame, r0):
    geometry = get_geometry(name)
    point_frame = PointFrame(geometry, frame, r0)
    rng = np.random.default_rng(2)
    features = np.stack([rng.normal(0, 1, 400), rng.normal(0, 1, 400), rng.uniform(0, 20, 400),
                         rng.normal(-8, 2, 400)], axis=1)
    features[:3, :2] = 40.0  # beyond the bound
    layer = np.sort(rng.integers(0, geometry.n_layers, 400))
    expected = point_frame.to_points(features, layer, np.full(400, 30e3))
    got = features_to_points(_double(features), torch.as_tensor(layer), 30e3, frame == "physical", r0,
                             _double(geometry.layer_moliere_radius_mm),
                             _double(geometry.energy.calibration * geometry.layer_visible_fraction),
                             geometry.energy.calibration, point_frame._half_size_mm,
                             2.0 * geometry.readout.max_radius_mm, _double(geometry.layer_centres_mm))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ild-ecal", "generic-mesh"])
def test_layer_energies_centre_and_visible_cells_equal_generate_steps(name):
    geometry = get_geometry(name)
    rng = np.random.default_rng(3)
    n = 600
    layer = np.sort(rng.integers(0, geometry.n_layers, n))
    points = np.stack([rng.normal(0, 15, n), rng.normal(0, 15, n), geometry.layer_centres_mm[layer],
                       rng.exponential(0.3, n)], axis=1)
    layer_energy = rng.uniform(1, 50, (1, geometry.n_layers))
    cog = np.array([[0.1, -0.05]])
    shower = np.zeros(n, np.int64)
    expected = points.copy()
    _scale_layers(expected[:, 3], shower * geometry.n_layers + layer, layer_energy)
    got = scale_layers(_double(points[:, 3]), torch.as_tensor(layer), _double(layer_energy[0]))
    np.testing.assert_allclose(got.numpy(), expected[:, 3], rtol=1e-12)
    _shift_centre_of_gravity(expected, shower, layer, cog, geometry)
    moved = shift_centre_of_gravity(_double(np.column_stack([points[:, :3], got.numpy()])), torch.as_tensor(layer),
                                    _double(cog[0]), _double(geometry.layer_moliere_radius_mm),
                                    geometry.readout.max_radius_mm)
    np.testing.assert_allclose(moved.numpy(), expected, rtol=1e-10, atol=1e-10)
    inside, keys, inverse = geometry.group_into_cells(expected, shower)
    cell_energy = np.bincount(inverse, expected[inside, 3], len(keys))
    factor = _visible_cell_scale(geometry, keys, cell_energy, layer_energy)
    readout = geometry.readout
    planar = readout.kind == "planar"
    cells = cell_index(moved, torch.as_tensor(layer), planar, readout.x_min_mm if planar else 0.0,
                       readout.y_min_mm if planar else 0.0, readout.pitch_mm if planar else 1.0,
                       readout.n_x if planar else 1, readout.n_y if planar else 1,
                       _double(readout.r_edges_mm[0] if not planar else [0.0, 1.0]),
                       1 if planar else readout.n_alpha[0], int(readout.cells_per_layer[0]))
    np.testing.assert_array_equal(cells.numpy() >= 0, inside)
    got_keys, got_energy, got_factor, got_inverse = visible_cell_factor(
        cells, moved[:, 3], _double(layer_energy[0]), int(readout.cells_per_layer[0]), geometry.energy.threshold_mev)
    np.testing.assert_array_equal(got_keys.numpy(), keys)
    np.testing.assert_array_equal(got_inverse.numpy(), inverse)
    np.testing.assert_allclose(got_energy.numpy(), cell_energy, rtol=1e-12)
    np.testing.assert_allclose(got_factor.numpy(), factor, rtol=1e-12)


@pytest.mark.parametrize("theta_local,phi_local", [(0.0, 0.0), (30.0, 0.0), (20.0, 90.0), (15.0, -120.0)])
def test_ddml_angles_are_the_local_direction(theta_local, phi_local):
    """DDML's local (x', y', z') is (d_y, d_x, d_z); the barrel angles of that direction give it back
    (directions within the octagon face DDML rotated the particle to)."""
    d = ddml_direction(theta_local, phi_local).numpy()
    assert np.isclose(np.degrees(np.arccos(d[2])), theta_local)
    theta, phi = angles_from_local_direction(d[None])
    np.testing.assert_allclose(local_direction(theta, phi, 8)[0], d, atol=1e-12)
    np.testing.assert_allclose(par04_direction(70.0).numpy(), local_direction(70.0, 90.0, 0), atol=1e-12)


def test_traced_network_and_flow_equal_the_model(tiny_checkpoints):
    model, sampler = load_model(tiny_checkpoints[1])[:2]
    generator = ShowerGenerator(model, get_geometry("ild-ecal"), sampler)
    with torch.no_grad():
        base, context = torch.randn(1, generator.n_statistics), torch.rand(1, generator.flow_context_dim)
        torch.testing.assert_close(generator.flow_inverse(base, context), model.flow._invert(base, context))
        from caloadapt.models.consistency import consistency_function

        x, condition = torch.randn(1, 50, 4), torch.rand(1, generator.context_dim)
        sigma = torch.full((1,), sampler.sigma_max)
        torch.testing.assert_close(generator.consistency(x, sigma, condition),
                                   consistency_function(model.denoiser, sampler.sigma_min)(x, sigma, condition))


# -- the exported file ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tiny_checkpoints, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ts") / "sub" / "g.pt"
    path.parent.mkdir()
    result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoints[1]), "--format", "torchscript",
                                 "-o", str(path), "--max-points", "400"])
    assert result.exit_code == 0, result.output
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    return path


def test_loads_and_runs_with_torch_alone(exported):
    """A process in which importing caloadapt fails loads the file and makes a shower, seeded by the caller."""
    script = f"""
import sys, json
sys.modules['caloadapt'] = None  # any import of caloadapt now fails
import torch
torch.manual_seed(5)
files = {{'caloadapt.json': ''}}
m = torch.jit.load({str(exported)!r}, _extra_files=files)
a = m(torch.tensor([50.0]), torch.tensor([0.0]), torch.tensor([0.0]))
torch.manual_seed(5)
b = m(torch.tensor([50.0]), torch.tensor([0.0]), torch.tensor([0.0]))
meta = json.loads(files['caloadapt.json'])
print(json.dumps([a.dtype == torch.float32, list(a.shape), bool(torch.equal(a, b)), meta['output_size'],
                  float(a[0:4 * meta['n_layers']:4].sum())]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    is_float32, shape, reproducible, size, n_points = json.loads(done.stdout.strip().splitlines()[-1])
    assert is_float32 and shape == [400 * 4] and size == 1600 and reproducible and n_points > 0


def test_ddml_output_follows_the_header_rule(exported):
    meta = torchscript_metadata(exported)
    n_layers = meta["n_layers"]
    model = torch.jit.load(str(exported))
    torch.manual_seed(0)
    for energy in (10.0, 30.0, 90.0):
        out = model(torch.tensor([energy]), torch.tensor([0.0]), torch.tensor([0.0])).numpy()
        header = out[:4 * n_layers].reshape(n_layers, 4)
        assert np.all(header[:, 1:] == 0) and np.all(header[:, 0] == np.round(header[:, 0]))
        n = int(header[:, 0].sum())
        assert 0 < n <= meta["point_capacity"]
        body = out[4 * n_layers:].reshape(-1, 4)
        assert np.all(body[n:] == 0) and np.all(body[:n, 3] > 0)
        per_layer = parse_ddml_output(out, n_layers)
        assert [len(p) for p in per_layer] == header[:, 0].astype(int).tolist()  # each point in its header's layer
        assert all(np.all(p[:, 2] == layer) for layer, p in enumerate(per_layer))
    # outside the range: an empty shower, as the metadata says
    assert not model(torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([0.0])).any()
    assert "extrapolat" in meta["outside_training_range"] and meta["angles"].startswith("ignored")


def _ddml_showers(path: Path, geometry, energy_gev: float, n: int, seed: int) -> Showers:
    """``n`` showers of an exported DDML file, as caloadapt points (x, y back in the shower frame)."""
    model = torch.jit.load(str(path))
    torch.manual_seed(seed)
    points, counts = [], []
    for _ in range(n):
        out = model(torch.tensor([energy_gev]), torch.tensor([0.0]), torch.tensor([0.0])).numpy()
        body = np.concatenate(parse_ddml_output(out, geometry.n_layers))
        layer = body[:, 2].astype(np.int64)
        # convertOutput's negated (beam, across) = (y, x) of the shower frame
        points.append(np.stack([-body[:, 1], -body[:, 0], geometry.layer_centres_mm[layer], body[:, 3]], axis=1))
        counts.append(len(body))
    return Showers.from_counts(np.concatenate(points), np.array(counts), np.full(n, energy_gev * 1e3),
                               geometry=geometry.name)


def agreement(a: Showers, b: Showers, geometry) -> dict:
    """Mean shower energy ratio, total variation of the longitudinal profiles, hits per layer of two sets."""
    summary = {}
    for name, showers in (("a", a), ("b", b)):
        hits = geometry.digitise(showers)
        energy = np.bincount(hits.shower_index, hits.points[:, 3], len(hits))
        profile = np.bincount(geometry.layer_index(hits.points[:, 2]), hits.points[:, 3], geometry.n_layers)
        summary[name] = (energy, profile / profile.sum(), layer_counts(hits, geometry))
    (ea, pa, ha), (eb, pb, hb) = summary["a"], summary["b"]
    error = np.sqrt(ha.var(axis=0) / len(ha) + hb.var(axis=0) / len(hb))
    return {"energy_ratio": ea.mean() / eb.mean(), "energy_error": np.hypot(ea.std() / np.sqrt(len(ea)) / ea.mean(),
                                                                            eb.std() / np.sqrt(len(eb)) / eb.mean()),
            "profile_tv": 0.5 * np.abs(pa - pb).sum(), "hits_pull": np.abs(ha.mean(0) - hb.mean(0)) / (error + 0.05)}


def test_tiny_export_agrees_with_generate(exported, tiny_checkpoints):
    geometry = get_geometry("ild-ecal")
    model, sampler = load_model(tiny_checkpoints[1])[:2]
    ours = _ddml_showers(exported, geometry, 20.0, 150, seed=1)
    theirs = model.generate(geometry, np.full(150, 20e3), sampler, generator=torch.Generator().manual_seed(2))
    again = model.generate(geometry, np.full(150, 20e3), sampler, generator=torch.Generator().manual_seed(3))
    result = agreement(ours, theirs, geometry)
    assert abs(result["energy_ratio"] - 1) < max(0.05, 4 * result["energy_error"])
    # the tiny model's showers vary a lot: two runs of generate itself differ by a few per cent
    assert result["profile_tv"] < max(0.05, 2.5 * agreement(again, theirs, geometry)["profile_tv"])
    assert np.all(result["hits_pull"] < 5)


def test_shipped_one_step_model_agrees_at_50_gev(tmp_path):
    """The issue's check: ild-photons-1step exported, 50 GeV, mean energy within 5 %, profile within 0.05."""
    path = tmp_path / "g.pt"
    result = runner.invoke(app, ["export", "--checkpoint", "ild-photons-1step", "--format", "torchscript",
                                 "-o", str(path)])
    assert result.exit_code == 0, result.output
    geometry = get_geometry("ild-ecal")
    model, sampler = load_model("ild-photons-1step")[:2]
    ours = _ddml_showers(path, geometry, 50.0, 150, seed=3)
    theirs = model.generate(geometry, np.full(150, 50e3), sampler, generator=torch.Generator().manual_seed(4))
    result = agreement(ours, theirs, geometry)
    assert abs(result["energy_ratio"] - 1) < 0.05 and result["profile_tv"] < 0.05
    assert np.all(result["hits_pull"] < 5)  # merged in their cells over capacity: the same hits


def test_par04_mesh_agrees_with_generate_digitised(tiny_checkpoints, tmp_path):
    path = tmp_path / "p.pt"
    result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoints[1]), "--format", "torchscript",
                                 "--contract", "par04", "-o", str(path)])
    assert result.exit_code == 0, result.output
    geometry = get_geometry("generic-mesh")
    meta = torchscript_metadata(path)
    n_r, n_phi, n_z = meta["n_r"], meta["n_phi"], meta["n_z"]
    assert (n_r, n_phi, n_z) == (18, 50, 45) and meta["output_size"] == n_r * n_phi * n_z
    mesh_model = torch.jit.load(str(path))
    torch.manual_seed(0)
    gen = torch.zeros(10 + 4)
    gen[10], gen[11], gen[13] = 20e3 / meta["max_energy_mev"], 90.0 / meta["max_angle_deg"], 1.0
    n = 120
    meshes = np.stack([mesh_model(gen).numpy() for _ in range(n)]) * 20e3  # Par04 multiplies by the energy
    assert meshes.shape == (n, n_r * n_phi * n_z)
    layer_energy_ours = meshes.reshape(n, n_r, n_phi, n_z).sum(axis=(1, 2))
    model, sampler = load_model(tiny_checkpoints[1])[:2]
    hits = model.generate(geometry, np.full(n, 20e3), sampler, generator=torch.Generator().manual_seed(1),
                          digitise=True)
    layer_energy = np.zeros((n, n_z))
    np.add.at(layer_energy, (hits.shower_index, geometry.layer_index(hits.points[:, 2])), hits.points[:, 3])
    total_ours, total = layer_energy_ours.sum(1), layer_energy.sum(1)
    error = np.hypot(total_ours.std(), total.std()) / np.sqrt(n)
    assert abs(total_ours.mean() - total.mean()) < max(0.05 * total.mean(), 4 * error)
    profile_ours, profile = layer_energy_ours.sum(0), layer_energy.sum(0)
    assert 0.5 * np.abs(profile_ours / profile_ours.sum() - profile / profile.sum()).sum() < 0.05
    cells_ours = (meshes > 0).sum(1)
    assert abs(cells_ours.mean() - hits.n_points.mean()) < max(0.05 * hits.n_points.mean(),
                                                               4 * np.hypot(cells_ours.std(), hits.n_points.std())
                                                               / np.sqrt(n))


def test_angle_conditioned_model_follows_ddml_angles(tmp_path):
    """A model told the direction: the file's showers at DDML's local angles are generate's at the same
    direction (an untrained model: the comparison is of the chain, not of physics)."""
    torch.manual_seed(0)
    model = ShowerModel(ModelConfig(widths=(16, 16), time_dim=8, flow_hidden=(16,), flow_transforms=1,
                                    angle_conditioning=True, depth_given=True, transverse_scale_rm=0.2)).eval()
    geometry = get_geometry("ild-ecal")
    path = export_torchscript(model, geometry, ONE_STEP, tmp_path / "a.pt", max_points=5000)
    theta_local, phi_local = 20.0, 60.0  # within the top face of the octagon
    d = ddml_direction(theta_local, phi_local).numpy()
    theta, phi = angles_from_local_direction(d[None])
    scripted = torch.jit.load(str(path))
    torch.manual_seed(1)
    n = 100
    x_mean = []
    for _ in range(n):
        out = scripted(torch.tensor([20.0]), torch.tensor([theta_local]), torch.tensor([phi_local])).numpy()
        body = np.concatenate(parse_ddml_output(out, geometry.n_layers))
        x_mean.append(np.average(-body[:, 1], weights=body[:, 3]))  # shower-frame x, energy-weighted
    showers = model.generate(geometry, np.full(n, 20e3), ONE_STEP, generator=torch.Generator().manual_seed(2),
                             theta_deg=theta[0], phi_deg=phi[0])
    reference = [np.average(s.points[:, 0], weights=s.points[:, 3]) for s in (showers[i] for i in range(n))]
    assert abs(np.mean(x_mean) - np.mean(reference)) < 4 * np.hypot(np.std(x_mean), np.std(reference)) / np.sqrt(n) \
        + 0.5


def test_export_refuses_bad_input_in_one_line(tiny_checkpoints, tmp_path):
    for args in (["--checkpoint", str(tiny_checkpoints[0]), "-o", str(tmp_path / "x.pt")],  # multi-step
                 ["--checkpoint", str(tiny_checkpoints[1]), "-o", str(tmp_path)]):  # a directory
        result = runner.invoke(app, ["export", "--format", "torchscript", *args])
        assert result.exit_code == 2
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("caloadapt: error:"), lines
    assert not (tmp_path / "x.pt").exists()


def test_embedded_python_backend(exported, monkeypatch):
    import importlib

    monkeypatch.setenv("CALOADAPT_TORCHSCRIPT", str(exported))
    backend = importlib.import_module("caloadapt.export.ddml_backend")
    backend = importlib.reload(backend)
    inputs = [np.array([30.0], np.float32), np.array([0.0], np.float32), np.array([0.0], np.float32)]
    out = backend.run_inference(inputs)
    assert out.dtype == np.float32 and out.shape == (backend.output_size(),) and out.flags.c_contiguous
    assert inputs[0][0] == 30.0 and out[:4 * 30:4].sum() > 0


# -- the C++ host (examples/cpp_host) ---------------------------------------------------------------------

def _cxx_tools() -> str | None:
    import shutil

    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler")
    return ", ".join(missing) or None


@pytest.mark.skipif(_cxx_tools() is not None, reason=f"the C++ host needs {_cxx_tools()}")
def test_cpp_host_builds_and_agrees_with_generate(exported, tiny_checkpoints, tmp_path):
    import torch.utils

    source = Path(__file__).resolve().parents[1] / "examples" / "cpp_host"
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                               capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    built = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    n, energy_gev = 150, 20.0
    showers_file = tmp_path / "showers.txt"
    run = subprocess.run([str(build / "caloadapt_host"), str(exported), str(n), str(energy_gev), "0", "0",
                          str(showers_file), "7"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "ms per shower" in run.stdout
    table = np.loadtxt(showers_file, ndmin=2)
    geometry = get_geometry("ild-ecal")
    shower, layer = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
    # the host's space points (convertOutput's x, y) back in the shower frame: (x, y) = (-y', -x')
    points = np.stack([-table[:, 3], -table[:, 2], geometry.layer_centres_mm[layer], table[:, 4]], axis=1)
    ours = Showers.from_counts(points, np.bincount(shower, minlength=n), np.full(n, energy_gev * 1e3),
                               geometry=geometry.name)
    model, sampler = load_model(tiny_checkpoints[1])[:2]
    theirs = model.generate(geometry, np.full(n, energy_gev * 1e3), sampler,
                            generator=torch.Generator().manual_seed(8))
    again = model.generate(geometry, np.full(n, energy_gev * 1e3), sampler,
                           generator=torch.Generator().manual_seed(9))
    result = agreement(ours, theirs, geometry)
    assert abs(result["energy_ratio"] - 1) < max(0.05, 4 * result["energy_error"])
    assert result["profile_tv"] < max(0.05, 2.5 * agreement(again, theirs, geometry)["profile_tv"])
    assert np.all(result["hits_pull"] < 5)  # hits per layer within their statistical errors
