"""Shared fixtures of the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from caloadapt.data import Showers
from caloadapt.geometry import Geometry, geometry_from_spec, get_geometry
from caloadapt.simulate import simulate

@pytest.fixture
def uninstalled(monkeypatch):
    """``uninstalled(name)``: ``importlib.util.find_spec`` finds no module ``name`` for the rest of the test
    (an extra that is not installed, as caloadapt checks for one before using it)."""
    import importlib.util

    find_spec = importlib.util.find_spec

    def hide(name: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda wanted, *args: None if wanted == name else find_spec(wanted, *args))

    return hide


#: a few low incident energies in MeV: fast to simulate, still hundreds of hits per shower
LOW_ENERGIES_MEV = np.array([1000.0, 3000.0, 2000.0, 1500.0, 2500.0])


@pytest.fixture(scope="session")
def simulated():
    """``simulated(geometry_name)``: five low-energy hit-level showers, cached per geometry."""
    cache: dict[str, Showers] = {}

    def get(name: str) -> Showers:
        if name not in cache:
            geometry = get_geometry(name)
            cache[name] = simulate(geometry, geometry.particle, LOW_ENERGIES_MEV, seed=7)
        return cache[name]

    return get


def deep_pbwo4(name: str, readout: dict) -> Geometry:
    """Homogeneous PbWO4, 60 X0 deep in 1 X0 slices, everything visible: no leakage behind, no sampling."""
    return geometry_from_spec({
        "name": name, "particle": "electron",
        "stack": [{"repeat": 300, "slabs": [{"material": "PbWO4", "thickness_mm": 0.2 * 8.903, "active": True}]}],
        "layers": {"segmentation": "slices", "slice_mm": 8.903, "n_layers": 60},
        "readout": readout,
        "energy": {"visible_fraction": 1.0, "threshold_mev": 0.0},
        "shower": {"sampling_term": 0.02},
    })


def make_showers(counts, *, seed: int = 0, geometry: str = "", particle: str = "electron",
                 meta: bool = True) -> Showers:
    """Hand-built showers with the given numbers of points and distinct, positive values."""
    rng = np.random.default_rng(seed)
    total = int(np.sum(counts))
    points = np.empty((total, 4), np.float32)
    points[:, 0] = rng.uniform(-50, 50, total)
    points[:, 1] = rng.uniform(-50, 50, total)
    points[:, 2] = rng.uniform(1, 150, total)
    points[:, 3] = rng.uniform(0.2, 5.0, total)
    energies = rng.uniform(1e3, 1e5, len(counts))
    extra = {"deposited_energy_mev": energies * 0.9, "tag": np.arange(len(counts), dtype=np.float64)} if meta else {}
    return Showers.from_counts(points, counts, energies, particle=particle, geometry=geometry, meta=extra)


@pytest.fixture(name="make_showers")
def make_showers_fixture():
    """The :func:`make_showers` helper as a fixture."""
    return make_showers


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model trained for a few steps on ILD photons, and a briefly distilled copy of it."""
    from caloadapt.data import write_showers
    from caloadapt.models import ModelConfig, ShowerModel
    from caloadapt.train.distill import DistillConfig, distill
    from caloadapt.train import TrainConfig, model_from_checkpoint, train

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    data = root / "ild.h5"
    write_showers(data, simulate("ild-ecal", "photon", np.random.default_rng(0).uniform(10e3, 30e3, 16), seed=1))
    geometry = get_geometry("ild-ecal")
    torch.manual_seed(0)
    tiny = ModelConfig(widths=(32, 32), time_dim=16, flow_hidden=(32,), flow_transforms=2)
    train(ShowerModel(tiny), data, geometry, root / "run",
          TrainConfig(steps=6, batch_size=8, max_points=64, val_every=6, checkpoint_every=6, warmup_steps=1,
                      device="cpu", val_max_showers=4), progress=False)
    distill(model_from_checkpoint(root / "run" / "best.pt"), data, geometry, root / "cm",
            DistillConfig(steps=2, batch_size=8, max_points=64, val_every=2, checkpoint_every=2, device="cpu",
                          val_max_showers=4, val_max_points=32, val_teacher_steps=3), progress=False)
    return root / "run" / "best.pt", root / "cm" / "best.pt"


#: incident energies of the generation tests [MeV]
ENERGIES_MEV = np.array([12e3, 30e3, 18e3, 25e3, 15e3])


def same_hits(a, b) -> None:
    """Two batches of hits are the same (cells, energies up to float32 rounding, meta)."""
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.points[:, :3], b.points[:, :3])
    # the hits path scales the cells' sums, digitise sums the scaled points: float32 rounding apart
    np.testing.assert_allclose(a.points[:, 3], b.points[:, 3], rtol=1e-5)
    assert a.meta.keys() == b.meta.keys()
    for key in a.meta:
        np.testing.assert_allclose(a.meta[key], b.meta[key], rtol=1e-6)  # float64 points or float32 ones


def generate_both_ways(model, geometry, sampler, **angles):
    """The hits ``model.generate`` makes itself, and those ``geometry.digitise`` makes of its points."""
    hits = model.generate(geometry, ENERGIES_MEV, sampler, generator=torch.Generator().manual_seed(3),
                          digitise=True, **angles)
    points = model.generate(geometry, ENERGIES_MEV, sampler, generator=torch.Generator().manual_seed(3), **angles)
    return hits, geometry.digitise(points)


#: torch.compile on a CPU (inductor) needs a C++ compiler; where there is none, the tests of compiled sampling skip
needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                               reason="torch.compile on a CPU needs a C++ compiler")
