"""The geometry descriptor and the family of pre-training detectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from caloadapt.geometry import (
    BUILTIN_GEOMETRIES,
    DESCRIPTOR_DIM,
    DESCRIPTOR_FIELDS,
    DETECTOR_FAMILY,
    describe_geometry,
    geometry_descriptor,
    geometry_from_yaml,
    get_geometry,
)
from caloadapt.geometry.descriptor import DESCRIPTOR_RANGE
from caloadapt.simulate import simulate

DATA_DIR = Path(__file__).parents[1] / "src" / "caloadapt" / "geometry" / "data"


def _check_descriptor(vector: np.ndarray) -> None:
    assert vector.shape == (DESCRIPTOR_DIM,) and vector.dtype == np.float32
    assert np.all(np.isfinite(vector))
    low, high = DESCRIPTOR_RANGE
    assert np.all((vector >= low) & (vector <= high)), dict(zip(DESCRIPTOR_FIELDS, vector))


def _field(vector: np.ndarray, name: str) -> float:
    return float(vector[DESCRIPTOR_FIELDS.index(name)])


def test_family_is_built_in_and_starts_with_the_source() -> None:
    assert DETECTOR_FAMILY[0] == "ild-ecal" and len(DETECTOR_FAMILY) >= 5
    assert set(DETECTOR_FAMILY) <= set(BUILTIN_GEOMETRIES)
    assert len(set(BUILTIN_GEOMETRIES)) == len(BUILTIN_GEOMETRIES) and DESCRIPTOR_DIM == len(DESCRIPTOR_FIELDS)


@pytest.mark.parametrize("name", BUILTIN_GEOMETRIES)
def test_descriptor_of_every_builtin_geometry(name: str) -> None:
    g = get_geometry(name)
    vector = geometry_descriptor(g)
    _check_descriptor(vector)
    vector[:] = 99.0  # a copy: the cache is not touched
    np.testing.assert_array_equal(geometry_descriptor(g), geometry_descriptor(get_geometry(name)))
    assert np.all(geometry_descriptor(g) != 99.0)


def test_descriptor_of_an_unseen_yaml_geometry(tmp_path: Path) -> None:
    data = yaml.safe_load((DATA_DIR / "w-si-thick.yaml").read_text())
    data["name"] = "w-si-thin"
    data["stack"][0]["slabs"][0]["thickness_mm"] = 1.4  # thinner W plates, 30 layers
    data["stack"][0]["repeat"] = 30
    path = tmp_path / "w-si-thin.yaml"
    path.write_text(yaml.safe_dump(data))
    thin, thick = geometry_from_yaml(path), get_geometry("w-si-thick")
    d_thin, d_thick = geometry_descriptor(thin), geometry_descriptor(thick)
    _check_descriptor(d_thin)
    assert _field(d_thin, "log_layer_x0") < _field(d_thick, "log_layer_x0")
    assert _field(d_thin, "log_visible") > _field(d_thick, "log_visible")  # more silicon per tungsten
    assert _field(d_thin, "n_layers") == pytest.approx(30 / 50)
    assert describe_geometry(thin)["x0_mm"] > describe_geometry(thick)["x0_mm"]


def test_descriptors_of_distinct_geometries_differ() -> None:
    vectors = np.stack([geometry_descriptor(get_geometry(name)) for name in BUILTIN_GEOMETRIES])
    distance = np.linalg.norm(vectors[:, None] - vectors[None], axis=-1)
    assert np.all(distance[~np.eye(len(vectors), dtype=bool)] > 0.05)


def test_descriptor_physics_ordering() -> None:
    raw = {name: describe_geometry(get_geometry(name)) for name in BUILTIN_GEOMETRIES}
    assert raw["crystal-pbwo4"]["visible_fraction"] == pytest.approx(1.0)
    for si_w in ("ild-ecal", "w-si-thick", "calochallenge-3"):
        assert raw["crystal-pbwo4"]["visible_fraction"] > 10 * raw[si_w]["visible_fraction"]
        assert raw[si_w]["visible_fraction"] < raw["pb-scintillator"]["visible_fraction"]
    assert raw["w-si-thick"]["x0_mm"] < raw["pb-scintillator"]["x0_mm"]
    assert raw["w-si-thick"]["moliere_radius_mm"] < raw["crystal-pbwo4"]["moliere_radius_mm"] \
        < raw["pb-lar"]["moliere_radius_mm"]
    assert raw["w-si-thick"]["layer_thickness_x0"] == pytest.approx(4.2 / 3.504 + 0.5 / 93.70, rel=1e-3)
    for name, values in raw.items():
        expected = 1.0 if get_geometry(name).readout.kind == "cylindrical" else 0.0
        assert values["readout_kind"] == expected
        assert (values["cell_azimuth_rad"] > 0) == (expected == 1.0)
        assert values["active_depth_x0"] >= 20.0
    assert raw["calochallenge-2"]["cell_azimuth_rad"] == pytest.approx(2 * np.pi / 16)


def test_ild_values() -> None:
    raw = describe_geometry(get_geometry("ild-ecal"))
    assert raw["x0_mm"] == pytest.approx(9.61, rel=0.01)  # X0_eff of the stack-1 region, project notes
    assert raw["moliere_radius_mm"] == pytest.approx(20.6, rel=0.02)  # simulator reference §1.3
    assert raw["critical_energy_mev"] == pytest.approx(9.96, rel=0.02)
    assert raw["cell_size_moliere"] == pytest.approx(5.0883 / raw["moliere_radius_mm"])
    assert raw["n_layers"] == 30 and raw["readout_kind"] == 0.0
    # stack 1 (0.0256) and stack 2 (0.0146) visible fractions, weighted by depth
    assert 0.0146 < raw["visible_fraction"] < 0.0256
    assert raw["threshold_sensor_mips"] == pytest.approx(0.1 / 0.2035, rel=0.01)  # half a mip


@pytest.mark.parametrize("name", DETECTOR_FAMILY)
def test_family_geometry_simulates_contained_photons(name: str) -> None:
    g = get_geometry(name)
    assert g.particle == "photon"
    hits = simulate(g, "photon", np.full(5, 50e3), seed=3)
    cell_sum = np.bincount(hits.shower_index, weights=hits.points[:, 3], minlength=5)
    visible = cell_sum / g.energy.calibration / 50e3
    expected = describe_geometry(g)["visible_fraction"]
    np.testing.assert_allclose(visible, expected, rtol=0.2)
    containment = cell_sum / (cell_sum + hits.meta["outside_energy_mev"])
    assert np.all(containment > 0.95)  # transversally, in the readout
    assert np.all(hits.meta["leaked_energy_mev"] < 0.05 * 50e3)  # longitudinally, behind the stack
    assert np.all((hits.n_points > 200) & (hits.n_points < 5000))
