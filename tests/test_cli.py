"""The ``caloadapt`` command line: simulate, convert, info, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from caloadapt.cli import app
from caloadapt.data import detect_format, read_showers
from caloadapt.geometry import get_geometry

CALOADAPT = Path(sys.executable).parent / "caloadapt"


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Invoke the app in ``tmp_path``; stdout and stderr are kept apart."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def _assert_one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("caloadapt: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result.output


@pytest.fixture
def files(run, tmp_path: Path) -> dict[str, Path]:
    """A small points file (ild-ecal) and a CaloChallenge dataset-3 file made by ``simulate``."""
    points, cc = tmp_path / "ild.h5", tmp_path / "ds3.h5"
    r1 = run("simulate", "-o", points, "--energy", "1:4", "--n", "3", "--seed", "2")
    r2 = run("simulate", "-o", cc, "--format", "calochallenge", "-g", "calochallenge-3",
             "--energy", "1:10", "--spectrum", "log-uniform", "--n", "5")
    assert r1.exit_code == 0, r1.output
    assert r2.exit_code == 0, r2.output
    return {"points": points, "calochallenge": cc}


# -- simulate -------------------------------------------------------------------------------------
def test_simulate_points_file(files: dict[str, Path]) -> None:
    path = files["points"]
    assert detect_format(path) == "points"
    showers = read_showers(path)
    assert len(showers) == 3 and showers.geometry == "ild-ecal" and showers.particle == "photon"
    assert np.all((showers.incident_energy_mev >= 1000) & (showers.incident_energy_mev <= 4000))
    assert np.all(showers.n_points > 0)
    with h5py.File(path) as f:
        assert f.attrs["seed"] == 2 and f.attrs["spectrum"] == "uniform"


def test_simulate_calochallenge_file(files: dict[str, Path]) -> None:
    path = files["calochallenge"]
    with h5py.File(path) as f:
        assert f["showers"].shape == (5, 40500) and f["incident_energies"].shape == (5, 1)
        energies = f["incident_energies"][:, 0]
        total = f["showers"][:].sum(axis=1)
    assert np.all((energies >= 1000) & (energies <= 10000))
    assert np.all((total > 0.3 * energies) & (total < 1.5 * energies))  # files hold E_Si / 0.033


def test_simulate_is_reproducible_with_a_seed(run, tmp_path: Path) -> None:
    for name in ("a.h5", "b.h5"):
        assert run("simulate", "-o", name, "-g", "calochallenge-2", "--energy", "2", "--n", "2",
                   "--seed", "5").exit_code == 0
    a, b = read_showers(tmp_path / "a.h5"), read_showers(tmp_path / "b.h5")
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.incident_energy_mev, [2000.0, 2000.0])


def test_simulate_prints_a_summary(run, tmp_path: Path) -> None:
    result = run("simulate", "-o", "s.h5", "-g", "calochallenge-2", "--energy", "1,2", "--spectrum", "list",
                 "--n", "4", "--particle", "photon")
    assert result.exit_code == 0, result.output
    assert "4" in result.stdout and "photon" in result.stdout and "s.h5" in result.stdout
    showers = read_showers(tmp_path / "s.h5")
    assert showers.particle == "photon" and set(showers.incident_energy_mev) <= {1000.0, 2000.0}


# -- info -----------------------------------------------------------------------------------------
def test_info_text(run, files: dict[str, Path]) -> None:
    result = run("info", files["calochallenge"])
    assert result.exit_code == 0, result.output
    assert "calochallenge" in result.stdout and "calochallenge-3" in result.stdout
    assert "showers    5" in result.stdout and "GeV" in result.stdout


def test_info_json(run, files: dict[str, Path]) -> None:
    result = run("info", files["points"], "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "points" and summary["showers"] == 3
    assert summary["geometry"] == "ild-ecal" and summary["particle"] == "photon"
    lo, hi = summary["incident_energy_gev"]
    assert 1.0 <= lo <= hi <= 4.0
    assert summary["points_per_shower"]["min"] > 0


# -- convert --------------------------------------------------------------------------------------
def test_convert_calochallenge_to_points_and_back(run, files: dict[str, Path], tmp_path: Path) -> None:
    source = files["calochallenge"]
    assert run("convert", source, "p.h5").exit_code == 0
    assert detect_format(tmp_path / "p.h5") == "points"
    result = run("convert", "p.h5", "cc.h5", "--format", "calochallenge")
    assert result.exit_code == 0, result.output
    assert "5" in result.stdout
    with h5py.File(source) as a, h5py.File(tmp_path / "cc.h5") as b:
        np.testing.assert_array_equal(a["showers"][:], b["showers"][:])
        np.testing.assert_array_equal(a["incident_energies"][:], b["incident_energies"][:])


def test_convert_smeared_keeps_the_voxels(run, files: dict[str, Path], tmp_path: Path) -> None:
    assert run("convert", files["calochallenge"], "smeared.h5", "--smear", "--seed", "3",
               "--chunk-size", "2").exit_code == 0
    g = get_geometry("calochallenge-3")
    np.testing.assert_array_equal(g.voxelise(read_showers(tmp_path / "smeared.h5")),
                                  g.voxelise(read_showers(files["calochallenge"])))


def test_convert_points_to_ild(run, files: dict[str, Path], tmp_path: Path) -> None:
    result = run("convert", files["points"], "ild_layout.h5", "-f", "ild")
    assert result.exit_code == 0, result.output
    assert detect_format(tmp_path / "ild_layout.h5") == "ild"
    a, b = read_showers(files["points"]), read_showers(tmp_path / "ild_layout.h5")
    np.testing.assert_array_equal(a.n_points, b.n_points)
    np.testing.assert_allclose(b.points, a.points, rtol=1e-6, atol=1e-4)


def test_convert_file_of_custom_geometry(run, tmp_path: Path) -> None:
    (tmp_path / "crystal.yaml").write_text("""\
name: crystal
particle: photon
stack:
  - {material: PbWO4, thickness_mm: 230, active: true}
layers: {segmentation: slices, slice_mm: 23.0}
readout: {kind: planar, pitch_mm: 22.0, n_x: 5, n_y: 5}
energy: {e_vis: 1.0, threshold_mev: 0.1}
shower: {sampling_term: 0.03}
""")
    assert run("simulate", "-o", "crystal.h5", "-g", "crystal.yaml", "--energy", "2", "--n", "2").exit_code == 0
    result = run("convert", "crystal.h5", "copy.h5", "-g", "crystal.yaml")
    assert result.exit_code == 0, result.stderr
    result = run("convert", "crystal.h5", "copy2.h5")
    assert result.exit_code == 0, result.stderr


def test_convert_refuses_to_overwrite_its_input(run, files: dict[str, Path]) -> None:
    before = files["points"].read_bytes()
    _assert_one_line_error(run("convert", files["points"], files["points"]), "overwrite")
    assert files["points"].read_bytes() == before



@pytest.mark.parametrize("command", ["simulate", "generate"])
def test_output_that_is_the_energies_file_is_refused(run, files: dict[str, Path], command: str) -> None:
    """Writing the showers over the file the energies come from (e.g. the evaluation reference) is refused,
    given by another spelling of the same path too."""
    before = files["points"].read_bytes()
    other_spelling = Path(".") / files["points"].name
    _assert_one_line_error(run(command, "-o", other_spelling, "--energies-from", files["points"], "-n", "2",
                               "-g", "ild-ecal"), "overwrite", "--energies-from")
    assert files["points"].read_bytes() == before

# -- errors ---------------------------------------------------------------------------------------
def _no_output(tmp_path: Path, name: str) -> None:
    assert not (tmp_path / name).exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{name}")]  # no temp files


@pytest.mark.parametrize("command", ["info", "convert"])
def test_missing_file(run, tmp_path: Path, command: str) -> None:
    args = [command, "missing.h5"] + (["out.h5"] if command == "convert" else [])
    _assert_one_line_error(run(*args), "missing.h5", "no such file")
    _no_output(tmp_path, "out.h5")


@pytest.mark.parametrize("command", ["info", "convert"])
def test_not_hdf5(run, tmp_path: Path, command: str) -> None:
    (tmp_path / "notes.h5").write_text("not a shower file\n")
    args = [command, "notes.h5"] + (["out.h5"] if command == "convert" else [])
    _assert_one_line_error(run(*args), "notes.h5", "HDF5")
    _no_output(tmp_path, "out.h5")


def test_hdf5_with_unknown_layout(run, tmp_path: Path) -> None:
    with h5py.File(tmp_path / "odd.h5", "w") as f:
        f["something"] = np.zeros(3)
    _assert_one_line_error(run("info", "odd.h5"), "odd.h5")
    _assert_one_line_error(run("convert", "odd.h5", "out.h5"), "odd.h5")
    _no_output(tmp_path, "out.h5")


def test_convert_with_wrong_geometry(run, files: dict[str, Path], tmp_path: Path) -> None:
    _assert_one_line_error(run("convert", files["calochallenge"], "out.h5", "-g", "calochallenge-2"), "40500")
    _no_output(tmp_path, "out.h5")


def test_simulate_unknown_geometry(run, tmp_path: Path) -> None:
    _assert_one_line_error(run("simulate", "-o", "out.h5", "-g", "no-such-detector", "--n", "2"),
                           "no-such-detector")
    _no_output(tmp_path, "out.h5")


def test_simulate_malformed_geometry_yaml(run, tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n  stack: {\n")
    _assert_one_line_error(run("simulate", "-o", "out.h5", "-g", "broken.yaml", "--n", "2"), "broken.yaml")
    (tmp_path / "unknown.yaml").write_text("name: x\ncolour: red\n")
    _assert_one_line_error(run("simulate", "-o", "out.h5", "-g", "unknown.yaml", "--n", "2"), "unknown.yaml")
    _no_output(tmp_path, "out.h5")


@pytest.mark.parametrize("energy", ["abc", "90:10", "10:10", "-5", "1:2:3", "0", "nan"])
def test_simulate_bad_energy(run, tmp_path: Path, energy: str) -> None:
    _assert_one_line_error(run("simulate", "-o", "out.h5", "--energy", energy, "--n", "2"), energy)
    _no_output(tmp_path, "out.h5")


def test_simulate_inclined_showers_from_the_barrel_range(run, tmp_path: Path) -> None:
    result = run("simulate", "-o", "inclined.h5", "--energy", "2:4", "--n", "6", "--theta", "40:140", "--phi", "0:360")
    assert result.exit_code == 0, result.output
    showers = read_showers(tmp_path / "inclined.h5")
    assert np.all((showers.theta_deg >= 40) & (showers.theta_deg <= 140)) and np.ptp(showers.theta_deg) > 0
    assert np.all((showers.phi_deg >= 0) & (showers.phi_deg <= 360)) and np.ptp(showers.phi_deg) > 0
    summary = json.loads(run("info", "inclined.h5", "--json").stdout)
    assert summary["theta_deg"] == pytest.approx([showers.theta_deg.min(), showers.theta_deg.max()])
    # the angles come from their own random stream: the energies are those of a normal-incidence run
    assert run("simulate", "-o", "normal.h5", "--energy", "2:4", "--n", "6").exit_code == 0
    normal = read_showers(tmp_path / "normal.h5")
    np.testing.assert_array_equal(showers.incident_energy_mev, normal.incident_energy_mev)
    np.testing.assert_array_equal(normal.theta_deg, 90.0)
    assert run("simulate", "-o", "listed.h5", "--energy", "2", "--n", "4", "--theta", "60,120",
               "--phi", "95").exit_code == 0
    listed = read_showers(tmp_path / "listed.h5")
    assert set(listed.theta_deg) <= {60.0, 120.0} and np.all(listed.phi_deg == 95.0)
    # a floor sample for inclined showers takes their directions with their energies, unless told otherwise
    assert run("simulate", "-o", "floor.h5", "--energies-from", "inclined.h5", "--n", "6", "--seed", "9").exit_code == 0
    floor = read_showers(tmp_path / "floor.h5")
    np.testing.assert_array_equal(floor.incident_energy_mev, showers.incident_energy_mev)
    np.testing.assert_array_equal(floor.theta_deg, showers.theta_deg)
    np.testing.assert_array_equal(floor.phi_deg, showers.phi_deg)
    assert run("simulate", "-o", "floor90.h5", "--energies-from", "inclined.h5", "--n", "6", "--theta", "90",
               "--phi", "90").exit_code == 0
    np.testing.assert_array_equal(read_showers(tmp_path / "floor90.h5").theta_deg, 90.0)


@pytest.mark.parametrize("option, value, word", [
    ("--theta", "0", "theta=0"), ("--theta", "180", "theta=180"), ("--theta", "5", "at most 80"),
    ("--theta", "abc", "abc"), ("--theta", "140:40", "140:40"), ("--phi", "nan", "nan"), ("--phi", "x:1", "x:1"),
])
def test_simulate_bad_angles(run, tmp_path: Path, option: str, value: str, word: str) -> None:
    _assert_one_line_error(run("simulate", "-o", "out.h5", option, value, "--n", "2"), word)
    _no_output(tmp_path, "out.h5")


def test_simulate_bad_particle_and_missing_output(run, tmp_path: Path) -> None:
    _assert_one_line_error(run("simulate", "-o", "out.h5", "--particle", "muon", "--n", "2"), "muon")
    _assert_one_line_error(run("simulate", "--n", "2"), "--output")
    _no_output(tmp_path, "out.h5")


def test_failed_convert_keeps_an_existing_output(run, files: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "keep.h5"
    target.write_bytes(files["points"].read_bytes())
    (tmp_path / "notes.h5").write_text("not a shower file\n")
    _assert_one_line_error(run("convert", "notes.h5", "keep.h5"), "notes.h5")
    assert target.read_bytes() == files["points"].read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- end to end, as a subprocess ----------------------------------------------------------------------------
@pytest.mark.skipif(not CALOADAPT.exists(), reason="console script not installed next to the interpreter")
def test_console_script_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(CALOADAPT), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env=env)

    done = cli("simulate", "-o", "ds2.h5", "-f", "calochallenge", "-g", "calochallenge-2",
               "--energy", "1:3", "--spectrum", "log-uniform", "--n", "3")
    assert done.returncode == 0, done.stderr
    info = cli("info", "ds2.h5", "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["showers"] == 3
    bad = cli("info", "absent.h5")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["caloadapt: error: absent.h5: no such file"]


def test_list_names_every_builtin_geometry_and_shipped_model():
    from caloadapt.geometry import BUILTIN_GEOMETRIES
    from caloadapt.pretrained import SHIPPED_CHECKPOINTS

    geometries = CliRunner().invoke(app, ["list", "geometries"])
    assert geometries.exit_code == 0, geometries.output
    rows = {line.split()[0]: line.split()[1:] for line in geometries.output.splitlines()[1:]}
    assert set(rows) == set(BUILTIN_GEOMETRIES) and rows["calochallenge-3"][:2] == ["45", "40,500"]
    models = CliRunner().invoke(app, ["list", "models"])
    assert models.exit_code == 0, models.output
    rows = {line.split()[0]: line for line in models.output.splitlines()[1:]}
    assert set(rows) == set(SHIPPED_CHECKPOINTS)
    assert "one step" in rows["ild-photons-1step"] and "30 heun steps" in rows["ild-photons"]
    assert rows["ild-photons"].split()[4] == "ild-photons-1step"
    wrong = CliRunner().invoke(app, ["list", "detectors"])
    assert wrong.exit_code == 2
