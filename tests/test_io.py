"""Shower files: the points, ILD and CaloChallenge layouts, detection, chunked reading, atomic
writing and clear errors on bad input."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from caloadapt.data import (
    ShowerWriter,
    Showers,
    detect_format,
    file_info,
    iter_showers,
    read_showers,
    write_showers,
)
from caloadapt.errors import InputError
from caloadapt.geometry import get_geometry
from caloadapt.simulate import simulate


def _assert_same_showers(a: Showers, b: Showers, *, meta: bool = True) -> None:
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.incident_energy_mev, b.incident_energy_mev)
    assert (a.particle, a.geometry) == (b.particle, b.geometry)
    if meta:
        assert a.meta.keys() == b.meta.keys()
        for key in a.meta:
            np.testing.assert_array_equal(a.meta[key], b.meta[key])


def _h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f[key] = value
    return path


def _only(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# -- points ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ild-ecal", "calochallenge-3"])
def test_points_round_trip_is_exact(tmp_path: Path, simulated, name: str) -> None:
    showers = simulated(name)
    assert showers.meta  # the simulator records per-shower energies
    path = tmp_path / "showers.h5"
    write_showers(path, showers)
    assert _only(tmp_path) == ["showers.h5"]
    back = read_showers(path)
    _assert_same_showers(back, showers)
    assert back.particle == get_geometry(name).particle


def test_points_file_records_units_and_geometry(tmp_path: Path, simulated) -> None:
    path = tmp_path / "p.h5"
    write_showers(path, simulated("calochallenge-2"), attrs={"seed": 3, "note": {"a": 1}})
    with h5py.File(path) as f:
        assert f.attrs["format"] == "caloadapt-points"
        assert f.attrs["geometry"] == "calochallenge-2"
        assert "MeV" in f.attrs["units"] and "mm" in f.attrs["units"]
        assert "calochallenge-2" in f.attrs["geometry_spec"]
        assert f.attrs["seed"] == 3
        assert f["points"].dtype == np.float32 and f["points"].shape[1] == 4


def test_points_file_of_custom_geometry_is_self_contained(tmp_path: Path) -> None:
    spec = tmp_path / "pbsc.yaml"
    spec.write_text("""\
name: pb-scint
stack:
  - repeat: 12
    slabs: [{material: Pb, thickness_mm: 2.0}, {material: Scintillator, thickness_mm: 4.0, active: true}]
layers: {segmentation: sensors}
readout: {kind: cylindrical, n_r: 6, dr_moliere: 0.5, n_alpha: 4}
energy: {e_vis: 1.0, threshold_mev: 0.01}
shower: {sampling_term: 0.1}
""")
    geometry = get_geometry(spec)
    showers = simulate(geometry, "electron", [1500.0, 2500.0], seed=2)
    path = tmp_path / "custom.h5"
    write_showers(path, showers, geometry=geometry)
    spec.unlink()  # the file must not need the YAML any more
    back = read_showers(path)
    _assert_same_showers(back, showers)
    assert back.geometry == "pb-scint" and file_info(path)["geometry"] == "pb-scint"


# -- CaloChallenge ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, n_cells", [("calochallenge-3", 40500), ("calochallenge-2", 6480)])
def test_calochallenge_round_trip_keeps_voxels(tmp_path: Path, simulated, name: str, n_cells: int) -> None:
    geometry = get_geometry(name)
    showers = simulated(name)
    path = tmp_path / "cc.h5"
    write_showers(path, showers, "calochallenge")
    with h5py.File(path) as f:
        assert set(f.keys()) == {"incident_energies", "showers"}
        assert f["showers"].shape == (len(showers), n_cells)
        assert f["incident_energies"].shape == (len(showers), 1)
        stored = f["showers"][:]
        np.testing.assert_array_equal(f["incident_energies"][:, 0], showers.incident_energy_mev)
    np.testing.assert_array_equal(stored, geometry.voxelise(showers, threshold=True))
    assert np.all((stored == 0) | (stored >= geometry.energy.threshold_mev))
    assert detect_format(path) == "calochallenge"
    back = read_showers(path)
    assert back.geometry == name and len(back) == len(showers)
    np.testing.assert_array_equal(back.incident_energy_mev, showers.incident_energy_mev)
    np.testing.assert_array_equal(geometry.voxelise(back), geometry.voxelise(showers))
    # points sit at the cell centres unless smeared; smeared points stay in their cells
    centres = geometry.cell_centres_mm[geometry.cell_index(back.points)].astype(np.float32)
    np.testing.assert_array_equal(back.points[:, :3], centres)
    smeared = read_showers(path, smear=True, seed=4)
    assert not np.array_equal(smeared.points[:, :3], back.points[:, :3])
    np.testing.assert_array_equal(geometry.voxelise(smeared), geometry.voxelise(showers))


def test_calochallenge_voxel_order_is_layer_alpha_radius(tmp_path: Path) -> None:
    g = get_geometry("calochallenge-2")
    layer, ia, ir = 5, 3, 7
    r = 4.65 * (ir + 0.5)
    alpha = -np.pi + (ia + 0.5) * 2 * np.pi / 16
    point = [[r * np.cos(alpha), r * np.sin(alpha), 3.4 * (layer + 0.5), 2.0]]
    path = tmp_path / "one.h5"
    write_showers(path, Showers(point, [0, 1], [1e3], geometry=g.name), "calochallenge")
    with h5py.File(path) as f:
        grid = f["showers"][:].reshape(1, 45, 16, 9)
    assert grid[0, layer, ia, ir] == pytest.approx(2.0) and grid.sum() == pytest.approx(2.0)


def test_calochallenge_geometry_override(tmp_path: Path, simulated) -> None:
    path = tmp_path / "cc3.h5"
    write_showers(path, simulated("calochallenge-3"), "calochallenge")
    assert read_showers(path, "calochallenge-3").geometry == "calochallenge-3"
    assert read_showers(path, "generic-mesh").geometry == "generic-mesh"  # same cell count, explicit choice
    with pytest.raises(InputError, match=r"cc3\.h5.*40500.*6480"):
        read_showers(path, "calochallenge-2")


# -- ILD --------------------------------------------------------------------------------------------
def test_ild_round_trip(tmp_path: Path, simulated) -> None:
    geometry = get_geometry("ild-ecal")
    showers = simulated("ild-ecal")
    path = tmp_path / "ild.h5"
    write_showers(path, showers, "ild")
    with h5py.File(path) as f:
        assert set(f.keys()) == {"events", "energy"}
        events, energy = f["events"][:], f["energy"][:]
    n, four, width = events.shape
    assert (n, four) == (len(showers), 4) and width >= 6000
    np.testing.assert_allclose(energy[:, 0], showers.incident_energy_mev / 1000.0, rtol=1e-7)  # GeV
    for i in range(n):
        k = showers.n_points[i]
        assert np.all(events[i, :, :width - k] == 0)  # zero padding first
        hits = showers.shower(i)
        np.testing.assert_allclose(events[i, 3, width - k:], hits[:, 3] / 1000.0, rtol=1e-6)  # GeV
        np.testing.assert_allclose(events[i, 1, width - k:] % 1.0, 0.5, atol=1e-5)  # layer + 0.5 at centres
        np.testing.assert_array_equal(np.floor(events[i, 1, width - k:]).astype(int),
                                      geometry.layer_index(hits[:, 2]))
    assert detect_format(path) == "ild"
    back = read_showers(path)
    assert back.geometry == "ild-ecal" and back.particle == "photon"
    np.testing.assert_array_equal(back.n_points, showers.n_points)
    np.testing.assert_allclose(back.points[:, :2], showers.points[:, :2], atol=1e-4)
    np.testing.assert_allclose(back.points[:, 2], showers.points[:, 2], atol=1e-4)  # depth preserved
    np.testing.assert_allclose(back.points[:, 3], showers.points[:, 3], rtol=1e-6)  # MeV again
    np.testing.assert_allclose(back.incident_energy_mev, showers.incident_energy_mev, rtol=1e-7)
    voxels_back, voxels = geometry.voxelise(back), geometry.voxelise(showers)
    np.testing.assert_array_equal(voxels_back > 0, voxels > 0)  # same cells
    np.testing.assert_allclose(voxels_back, voxels, rtol=1e-6)  # GeV float32 in the file


# -- detection and chunked reading ----------------------------------------------------------------------
@pytest.fixture
def three_files(tmp_path: Path, simulated) -> dict[str, Path]:
    files = {"points": tmp_path / "p.h5", "calochallenge": tmp_path / "c.h5", "ild": tmp_path / "i.h5"}
    write_showers(files["points"], simulated("calochallenge-2"))
    write_showers(files["calochallenge"], simulated("calochallenge-2"), "calochallenge")
    write_showers(files["ild"], simulated("ild-ecal"), "ild")
    return files


def test_format_detection(three_files: dict[str, Path]) -> None:
    for fmt, path in three_files.items():
        assert detect_format(path) == fmt
        assert file_info(path)["format"] == fmt


def test_format_detection_ignores_the_file_name(tmp_path: Path, three_files: dict[str, Path]) -> None:
    renamed = tmp_path / "looks_like.points"
    os.replace(three_files["calochallenge"], renamed)
    assert detect_format(renamed) == "calochallenge"


@pytest.mark.parametrize("fmt", ["points", "calochallenge", "ild"])
@pytest.mark.parametrize("chunk_size", [1, 2, 4])
def test_chunked_reading_equals_one_read(three_files: dict[str, Path], fmt: str, chunk_size: int) -> None:
    path = three_files[fmt]
    whole = read_showers(path)
    chunks = list(iter_showers(path, chunk_size=chunk_size))
    assert len(whole) == 5
    assert [len(c) for c in chunks] == [min(chunk_size, 5 - s) for s in range(0, 5, chunk_size)]
    _assert_same_showers(Showers.concatenate(chunks), whole)


def test_start_stop_reading(three_files: dict[str, Path]) -> None:
    for path in three_files.values():
        whole = read_showers(path)
        part = read_showers(path, start=1, stop=4, chunk_size=2)
        _assert_same_showers(part, whole[1:4])
        assert len(read_showers(path, start=3, stop=100)) == 2


def test_file_info_summary(three_files: dict[str, Path], simulated) -> None:
    showers = simulated("calochallenge-2")
    info = file_info(three_files["points"], chunk_size=2)
    assert info["showers"] == 5 and info["geometry"] == "calochallenge-2" and info["particle"] == "electron"
    assert info["incident_energy_gev"] == pytest.approx([showers.incident_energy_mev.min() / 1000,
                                                         showers.incident_energy_mev.max() / 1000])
    assert info["points_per_shower"]["min"] == showers.n_points.min()
    assert info["points_per_shower"]["max"] == showers.n_points.max()
    assert info["points_per_shower"]["mean"] == pytest.approx(showers.n_points.mean())


# -- ShowerWriter ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["points", "ild"])
def test_writer_with_several_appends(tmp_path: Path, make_showers, fmt: str) -> None:
    # the second chunk has a shower wider than the ILD default of 6000 points: the file grows
    chunks = [make_showers([5, 0, 7], seed=1, geometry="ild-ecal", particle="photon"),
              make_showers([6100, 3], seed=2, geometry="ild-ecal", particle="photon"),
              make_showers([2], seed=3, geometry="ild-ecal", particle="photon")]
    path = tmp_path / f"multi_{fmt}.h5"
    with ShowerWriter(path, fmt) as writer:
        for chunk in chunks:
            writer.append(chunk)
        assert not path.exists()  # only the temporary file exists while writing
    assert writer.n == 6
    expected = Showers.concatenate(chunks)
    back = read_showers(path)
    np.testing.assert_array_equal(back.n_points, [5, 0, 7, 6100, 3, 2])
    if fmt == "points":
        _assert_same_showers(back, expected)
    else:
        np.testing.assert_allclose(back.points, expected.points, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(back.incident_energy_mev, expected.incident_energy_mev, rtol=1e-7)


def test_writer_calochallenge_several_appends(tmp_path: Path, simulated) -> None:
    showers = simulated("calochallenge-3")
    path = tmp_path / "cc.h5"
    with ShowerWriter(path, "calochallenge", "calochallenge-3") as writer:
        for chunk in showers.chunks(2):
            writer.append(chunk)
    g = get_geometry("calochallenge-3")
    np.testing.assert_array_equal(g.voxelise(read_showers(path)), g.voxelise(showers))


class Boom(Exception):
    pass


@pytest.mark.parametrize("fmt", ["points", "ild", "calochallenge"])
def test_failed_write_leaves_nothing(tmp_path: Path, simulated, fmt: str) -> None:
    showers = simulated("calochallenge-2")
    path = tmp_path / "out.h5"
    with pytest.raises(Boom):
        with ShowerWriter(path, fmt) as writer:
            writer.append(showers[:2])
            raise Boom()
    assert _only(tmp_path) == []


def test_failed_write_keeps_the_existing_file(tmp_path: Path, simulated) -> None:
    path = tmp_path / "out.h5"
    write_showers(path, simulated("calochallenge-2"))
    before = path.read_bytes()
    with pytest.raises(Boom):
        with ShowerWriter(path) as writer:
            writer.append(simulated("calochallenge-2")[:1])
            raise Boom()
    assert path.read_bytes() == before
    assert _only(tmp_path) == ["out.h5"]
    assert len(read_showers(path)) == 5


def test_writer_refuses_empty_output_and_mixed_geometries(tmp_path: Path, simulated) -> None:
    path = tmp_path / "none.h5"
    with pytest.raises(InputError, match="none.h5"):
        with ShowerWriter(path):
            pass
    with pytest.raises(InputError, match="none.h5"):
        write_showers(path, Showers.empty(geometry="calochallenge-2"))
    with pytest.raises(InputError):
        with ShowerWriter(path) as writer:
            writer.append(simulated("calochallenge-2"))
            writer.append(simulated("calochallenge-3"))
    with pytest.raises(InputError, match="xyz"):
        ShowerWriter(path, "xyz")
    assert _only(tmp_path) == []


# -- bad input ----------------------------------------------------------------------------------------------
def _input_error(path: Path, *words: str, geometry=None) -> None:
    for fn in (lambda: read_showers(path, geometry), lambda: file_info(path, geometry),
               lambda: list(iter_showers(path, geometry, chunk_size=1))):
        with pytest.raises(InputError) as info:
            fn()
        message = str(info.value)
        assert path.name in message and "\n" not in message, message
        for word in words:
            assert word in message, (word, message)


def test_missing_file(tmp_path: Path) -> None:
    _input_error(tmp_path / "nowhere.h5", "no such file")
    with pytest.raises(InputError, match="nowhere.h5"):
        detect_format(tmp_path / "nowhere.h5")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "folder.h5"
    folder.mkdir()
    _input_error(folder, "directory")


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "text.h5"
    path.write_text("these are not the showers you are looking for\n")
    _input_error(path, "HDF5")
    with pytest.raises(InputError, match="text.h5"):
        detect_format(path)


def test_hdf5_with_unknown_keys(tmp_path: Path) -> None:
    _input_error(_h5(tmp_path / "unknown.h5", foo=np.zeros(3), bar=np.ones((2, 2))), "foo")
    _input_error(_h5(tmp_path / "nokeys.h5"), "layout")


def test_calochallenge_with_unknown_voxel_count(tmp_path: Path) -> None:
    path = _h5(tmp_path / "cc100.h5", incident_energies=np.ones((2, 1)), showers=np.zeros((2, 100)))
    _input_error(path, "100")


def test_calochallenge_with_wrong_voxel_count_for_the_geometry(tmp_path: Path) -> None:
    path = _h5(tmp_path / "ds2.h5", incident_energies=np.ones((2, 1)), showers=np.zeros((2, 6480)))
    _input_error(path, "6480", "40500", geometry="calochallenge-3")


@pytest.mark.parametrize("energies", [np.ones(2), np.ones((2, 2)), np.ones((3, 1)), np.ones((2, 1, 1))])
def test_incident_energies_with_wrong_shape(tmp_path: Path, energies: np.ndarray) -> None:
    path = _h5(tmp_path / "shape.h5", incident_energies=energies, showers=np.zeros((2, 6480)))
    _input_error(path, "incident_energies")


@pytest.mark.parametrize("what, voxels, energies", [
    ("voxel", np.full((2, 6480), np.nan), np.ones((2, 1))),
    ("voxel", np.full((2, 6480), np.inf), np.ones((2, 1))),
    ("incident", np.zeros((2, 6480)), np.array([[1.0], [np.nan]])),
])
def test_nan_energies(tmp_path: Path, what: str, voxels, energies) -> None:
    path = _h5(tmp_path / "nan.h5", incident_energies=energies, showers=voxels)
    _input_error(path, what, "NaN")


@pytest.mark.parametrize("what, voxels, energies", [
    ("voxel", -np.ones((2, 6480)), np.ones((2, 1))),
    ("incident", np.zeros((2, 6480)), -np.ones((2, 1))),
    ("incident", np.zeros((2, 6480)), np.zeros((2, 1))),
])
def test_negative_energies(tmp_path: Path, what: str, voxels, energies) -> None:
    path = _h5(tmp_path / "neg.h5", incident_energies=energies, showers=voxels)
    _input_error(path, what)


def test_bad_energies_in_ild_and_points_files(tmp_path: Path) -> None:
    events = np.ones((2, 4, 10), np.float32)
    events[1, 3, 4] = np.nan
    _input_error(_h5(tmp_path / "ild_nan.h5", events=events, energy=np.ones((2, 1))), "NaN")
    events[1, 3, 4] = -1.0
    _input_error(_h5(tmp_path / "ild_neg.h5", events=events, energy=np.ones((2, 1))), "negative")
    points = np.ones((3, 4), np.float32)
    points[2, 3] = np.nan
    _input_error(_h5(tmp_path / "pts_nan.h5", points=points, offsets=np.array([0, 1, 3]),
                     incident_energy_mev=np.ones(2)), "NaN")
    _input_error(_h5(tmp_path / "pts_neg.h5", points=np.ones((3, 4)), offsets=np.array([0, 1, 3]),
                     incident_energy_mev=np.array([1.0, -1.0])), "positive")


def test_inconsistent_points_file(tmp_path: Path) -> None:
    path = _h5(tmp_path / "misfit.h5", points=np.zeros((3, 4)), offsets=np.array([0, 1, 5]),
               incident_energy_mev=np.ones(2))
    _input_error(path, "offsets")


@pytest.mark.parametrize("offsets", [np.array([1, 2, 3]), np.array([0, 2, 1, 3])])
def test_points_file_with_bad_offsets_names_the_file(tmp_path: Path, offsets: np.ndarray) -> None:
    path = _h5(tmp_path / "offsets.h5", points=np.arange(12, dtype=np.float32).reshape(3, 4) + 1,
               offsets=offsets, incident_energy_mev=np.ones(len(offsets) - 1))
    _input_error(path, "offsets")


@pytest.mark.parametrize("datasets", [
    {"incident_energies": np.ones((0, 1)), "showers": np.zeros((0, 6480))},
    {"events": np.zeros((0, 4, 10), np.float32), "energy": np.ones((0, 1))},
    {"points": np.zeros((0, 4), np.float32), "offsets": np.zeros(1, np.int64),
     "incident_energy_mev": np.zeros(0)},
])
def test_empty_file(tmp_path: Path, datasets: dict) -> None:
    _input_error(_h5(tmp_path / "empty.h5", **datasets), "no showers")


def test_failed_open_closes_the_file(tmp_path: Path) -> None:
    path = _h5(tmp_path / "unknown.h5", foo=np.zeros(3))
    with pytest.raises(InputError) as info:
        read_showers(path)
    assert info.value is not None  # keep the exception (and its traceback) alive
    with h5py.File(path, "w") as f:  # fails while the reader still holds the file open
        f["x"] = 1


# -- incidence angles (docs/inclined.md) -------------------------------------------------------------
@pytest.fixture(scope="module")
def inclined_ild() -> Showers:
    theta, phi = np.array([60.0, 90.0, 125.0, 80.0]), np.array([90.0, 105.0, 80.0, 90.0])
    return simulate("ild-ecal", "photon", np.full(4, 5e3), theta_deg=theta, phi_deg=phi, seed=3)


def test_points_file_keeps_the_angles_of_each_shower(tmp_path: Path, inclined_ild: Showers) -> None:
    path = tmp_path / "inclined.h5"
    write_showers(path, inclined_ild)
    back = read_showers(path)
    _assert_same_showers(back, inclined_ild)
    np.testing.assert_array_equal(back.theta_deg, inclined_ild.theta_deg)
    np.testing.assert_array_equal(back.phi_deg, inclined_ild.phi_deg)


def test_ild_file_stores_the_direction_in_the_caloclouds3_local_frame(tmp_path: Path, inclined_ild: Showers) -> None:
    path = tmp_path / "ild.h5"
    write_showers(path, inclined_ild, "ild")
    with h5py.File(path) as f:
        assert set(f.keys()) == {"events", "energy", "p_norm_local"}
        local = f["p_norm_local"][:].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(local, axis=1), 1.0, rtol=1e-6)
    # (beam axis, x, depth): the beam component is cos(theta), the depth component cos(inclination)
    np.testing.assert_allclose(local[:, 0], np.cos(np.radians(inclined_ild.theta_deg)), atol=1e-6)
    assert local[1, 1] == pytest.approx(-np.sin(np.radians(15.0)), abs=1e-6)  # phi 15 degrees off the face normal
    back = read_showers(path)
    np.testing.assert_allclose(back.theta_deg, inclined_ild.theta_deg, atol=1e-4)
    np.testing.assert_allclose(back.phi_deg, inclined_ild.phi_deg, atol=1e-4)  # all within the top face


def test_calochallenge_file_stores_angle_datasets(tmp_path: Path) -> None:
    showers = simulate("calochallenge-2", "electron", np.full(3, 5e3), theta_deg=[70.0, 90.0, 110.0],
                       phi_deg=[10.0, 90.0, 200.0], seed=2)
    path = tmp_path / "cc.h5"
    write_showers(path, showers, "calochallenge")
    with h5py.File(path) as f:
        assert set(f.keys()) == {"incident_energies", "showers", "incident_theta_deg", "incident_phi_deg"}
        np.testing.assert_array_equal(f["incident_theta_deg"][:, 0], [70.0, 90.0, 110.0])
    back = read_showers(path)
    np.testing.assert_array_equal(back.theta_deg, showers.theta_deg)
    np.testing.assert_array_equal(back.phi_deg, showers.phi_deg)


@pytest.mark.parametrize("fmt", ["ild", "calochallenge"])
def test_normal_chunks_written_before_inclined_ones_read_as_normal(tmp_path: Path, fmt: str) -> None:
    geometry = "ild-ecal" if fmt == "ild" else "calochallenge-2"
    particle = "photon" if fmt == "ild" else "electron"
    normal = simulate(geometry, particle, np.full(2, 5e3), seed=1)
    inclined = simulate(geometry, particle, np.full(3, 5e3), theta_deg=65.0, seed=2)
    path = tmp_path / f"{fmt}.h5"
    with ShowerWriter(path, fmt, geometry) as writer:
        writer.append(normal)  # no angle dataset yet: the published layout
        writer.append(inclined)
    back = read_showers(path)
    np.testing.assert_allclose(back.theta_deg, [90, 90, 65, 65, 65], atol=1e-4)
    np.testing.assert_allclose(back.phi_deg, 90.0, atol=1e-4)


def test_files_without_angles_read_as_normal_incidence(tmp_path: Path, simulated) -> None:
    path = tmp_path / "old.h5"
    showers = simulated("calochallenge-2")
    write_showers(path, showers, "calochallenge")  # normal incidence: no angle datasets, as before
    back = read_showers(path)
    np.testing.assert_array_equal(back.theta_deg, 90.0)
    np.testing.assert_array_equal(back.phi_deg, 90.0)


def test_bad_angle_datasets_give_clear_errors(tmp_path: Path, inclined_ild: Showers) -> None:
    path = tmp_path / "ild.h5"
    write_showers(path, inclined_ild, "ild")
    with h5py.File(path, "r+") as f:
        f["p_norm_local"][0] = [0.0, 0.0, -1.0]
    with pytest.raises(InputError, match="do not enter the calorimeter through its front"):
        read_showers(path)
    cc = tmp_path / "cc.h5"
    write_showers(cc, simulate("calochallenge-2", "electron", np.full(2, 5e3), theta_deg=70.0, seed=1),
                  "calochallenge")
    with h5py.File(cc, "r+") as f:
        del f["incident_phi_deg"]
    with pytest.raises(InputError, match="only one of incident_theta_deg and incident_phi_deg"):
        read_showers(cc)


def test_dense_layouts_are_read_in_bounded_blocks_with_the_same_result(tmp_path, monkeypatch):
    """A CaloChallenge chunk is turned into hits a few rows at a time (a readout of millions of cells
    would not fit densely); the showers, smeared or not, are the same however many reads it takes."""
    import caloadapt.data.io as io_module

    path = tmp_path / "ds2.h5"
    geometry = get_geometry("calochallenge-2")
    write_showers(path, simulate(geometry, "electron", np.array([2e3, 5e3, 3e3, 4e3, 1e3]), seed=3),
                  format="calochallenge")
    whole = [read_showers(path, smear=smear, seed=4) for smear in (False, True)]
    monkeypatch.setattr(io_module, "DENSE_READ_BYTES", 2 * 8 * geometry.n_cells)  # two showers per read
    blocks = [read_showers(path, smear=smear, seed=4) for smear in (False, True)]
    for a, b in zip(whole, blocks):
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.offsets, b.offsets)
