"""The evaluation pipeline: shower files in, metrics.json, plots and report out.

Small simulated CaloChallenge Dataset 2 samples (6480 voxels), a CPU-sized classifier and few
bootstrap resamples keep the whole module well under a minute on one thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from caloadapt.data import read_showers, write_showers
from caloadapt.errors import CaloadaptError, InputError
from caloadapt.evaluate import EvaluationOptions, run_evaluation, write_report
from caloadapt.evaluate.observables import PUBLISHED_SCORED, SCORE_ROWS
from caloadapt.evaluate.pipeline import FPD_KPD_MIN_SHOWERS, fpd_kpd_decision, fpd_kpd_settings
from caloadapt.evaluate.stream import concatenate_observables
from caloadapt.simulate import simulate

N_SHOWERS = 150
GEOMETRY = "calochallenge-2"


def _energies(seed: int, n: int = N_SHOWERS) -> np.ndarray:
    """Log-uniform incident energies in 1-100 GeV, in MeV."""
    return np.exp(np.random.default_rng(seed).uniform(np.log(1e3), np.log(1e5), n))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two independent samples, a copy of the second with energies x 1.05, and a smaller sample."""
    d = tmp_path_factory.mktemp("evaluate_pipeline")
    reference = simulate(GEOMETRY, "electron", _energies(1), seed=11)
    generated = simulate(GEOMETRY, "electron", _energies(2), seed=12)
    paths = {name: d / f"{name}.h5" for name in ("reference", "generated", "distorted", "small")}
    write_showers(paths["reference"], reference, format="calochallenge")
    write_showers(paths["generated"], generated, format="calochallenge")
    generated.points[:, 3] *= 1.05
    write_showers(paths["distorted"], generated, format="calochallenge")
    write_showers(paths["small"], read_showers(paths["generated"], GEOMETRY, stop=100), format="calochallenge")
    return paths


def _options(**kwargs) -> EvaluationOptions:
    defaults = {"n_bootstrap": 10, "progress": False, "fpd_num_batches": 4, "fpd_num_points": 3,
                "kpd_num_batches": 4, "n_event_display": 2}
    defaults.update(kwargs)
    return EvaluationOptions(**defaults)


@pytest.fixture(scope="module")
def independent(files, tmp_path_factory) -> tuple[dict, Path]:
    """The full evaluation (classifier, FPD/KPD, plots, report) of two independent samples."""
    out = tmp_path_factory.mktemp("independent") / "results"
    metrics = run_evaluation(files["generated"], files["reference"], GEOMETRY, out, _options(fpd_kpd=True),
                             command="caloadapt evaluate --generated gen.h5 --reference ref.h5")
    return metrics, out


def test_outputs_of_a_full_evaluation(independent):
    metrics, out = independent
    stored = json.loads((out / "metrics.json").read_text())  # valid JSON (NaN written as null)
    assert stored["command"].startswith("caloadapt evaluate")
    assert set(stored["versions"]) >= {"caloadapt", "numpy", "torch"}
    assert stored["geometry"]["name"] == GEOMETRY and stored["geometry"]["cross_geometry"] is False
    for role in ("reference", "generated"):
        record = stored["inputs"][role]
        assert record["n_showers_used"] == N_SHOWERS and record["size_bytes"] > 0
        assert record["geometry"] == GEOMETRY
    table = stored["calotransfer"]
    assert set(table["scores"]) == set(SCORE_ROWS)
    assert 0 < table["geometric_mean"] < 1 and table["geometric_mean_std"] > 0
    assert all(table["scores"][row]["wasserstein"] is not None for row in PUBLISHED_SCORED)
    assert stored["summary"]["geometric_mean"] == pytest.approx(table["geometric_mean"])
    assert set(stored["calotransfer_by_energy"]) == {"1-10 GeV", "10-100 GeV"}
    for key in ("low_level", "high_level"):
        assert 0 <= stored["classifier"][key]["auc"] <= 1
        assert stored["classifier"][key]["n_per_class"] == N_SHOWERS
    assert stored["classifier"]["high_level"]["input_dimension"] == 362
    assert stored["classifier"]["high_level"]["optimiser_steps_per_epoch"] == 1  # 2 x 90 training showers
    assert any("barely trained" in note and "--floor" in note for note in stored["notes"])
    physics = stored["fpd_kpd"]
    assert physics["fpd_x1e3"] >= 0 and physics["kpd_x1e3"] is not None
    assert physics["settings"]["official"] is False
    assert stored["summary"]["auc_low_level"] == stored["classifier"]["low_level"]["auc"]
    summary = stored["calochallenge"]["separation_power_summary"]
    assert {"sep E total", "sep E layer", "sep cell", "sep EC eta", "sep sparsity"} <= set(summary)
    assert all(0 <= v <= 1 for v in summary.values())
    assert len(stored["calochallenge"]["separation_power"]) > 45 * 7
    assert set(stored["timing_s"]) >= {"read_reference", "read_generated", "scores", "plots", "total"}
    assert stored["timing_s"]["total"] > 0
    assert stored["summary"]["geometric_mean"] == metrics["summary"]["geometric_mean"]

    plots = stored["outputs"]["plots"]
    expected = {"hist_energy_ratio", "hist_n_hits", "hist_cell_energy_mev", "hist_depth_cog_mm",
                "profile_longitudinal", "profile_radial", "energy_bins", "average_shower", "event_display",
                "scores", "separation_power"}
    assert expected <= set(plots)
    report_md = (out / "report.md").read_text()
    report_html = (out / "report.html").read_text()
    assert "geometric mean" in report_md and "<table>" in report_html
    for relative in plots.values():
        png = out / relative
        assert png.is_file() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({relative})" in report_md and f'src="{relative}"' in report_html
    assert "<script" not in report_html and "<link" not in report_html  # self-contained
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))


def test_distorted_energy_scale_is_detected(files, independent, tmp_path):
    floor = independent[0]["calotransfer"]["scores"]
    metrics = run_evaluation(files["distorted"], files["reference"], GEOMETRY, tmp_path / "distorted",
                             _options(classifier="none", fpd_kpd=False, plots=False, energy_bins=False))
    scores = metrics["calotransfer"]["scores"]
    assert scores["energy_ratio"]["wasserstein"] > 3 * floor["energy_ratio"]["wasserstein"]
    assert scores["energy_ratio"]["wasserstein"] > 0.5
    # the shape does not move: depth centre of gravity stays at the level of independent samples
    assert scores["depth_cog"]["wasserstein"] == pytest.approx(floor["depth_cog"]["wasserstein"], abs=0.05)
    assert metrics["classifier"]["low_level"] == {"skipped": "classifier='none'"}
    assert metrics["fpd_kpd"] is None and metrics["outputs"]["plots"] == {}
    assert (tmp_path / "distorted" / "report.md").stat().st_size > 0


def test_floor_is_reported_beside_every_score(files, independent, tmp_path):
    """A clearly wrong sample (energies x 1.05) with an independent sample of the source as the floor."""
    out = tmp_path / "with_floor"
    metrics = run_evaluation(files["distorted"], files["reference"], GEOMETRY, out,
                             _options(plots=False, fpd_kpd=True, fpd_num_batches=2, fpd_num_points=2,
                                      kpd_num_batches=2), floor=files["generated"])
    floor = metrics["floor"]
    assert floor["input"]["path"] == str(files["generated"]) and metrics["inputs"]["floor"]["n_showers_used"] == 150
    # the floor is the same evaluation with the floor file in place of the generated one
    alone = independent[0]["calotransfer"]
    assert floor["calotransfer"]["geometric_mean"] == pytest.approx(alone["geometric_mean"], rel=1e-12)
    for row, score in alone["scores"].items():
        assert floor["calotransfer"]["scores"][row]["wasserstein"] == pytest.approx(score["wasserstein"], rel=1e-12)
    g, g_floor = metrics["calotransfer"]["geometric_mean"], floor["calotransfer"]["geometric_mean"]
    assert g > g_floor  # the wrong sample is farther from the reference than a fresh sample of its source
    summary = metrics["summary"]
    assert summary["geometric_mean_floor"] == g_floor
    assert summary["ratio_to_floor"] == pytest.approx(g / g_floor) == metrics["ratio_to_floor"]["geometric_mean"]
    ratios = metrics["ratio_to_floor"]["wasserstein"]
    assert ratios["energy_ratio"] == pytest.approx(metrics["calotransfer"]["scores"]["energy_ratio"]["wasserstein"]
                                                   / floor["calotransfer"]["scores"]["energy_ratio"]["wasserstein"])
    assert ratios["energy_ratio"] > 3
    assert set(metrics["ratio_to_floor"]["geometric_mean_by_energy"]) == {"1-10 GeV", "10-100 GeV"}
    assert set(metrics["ratio_to_floor"]["separation_power_summary"]) == \
        set(metrics["calochallenge"]["separation_power_summary"])
    for level in ("low_level", "high_level"):  # same classifier, same size, for both
        assert 0 <= floor["classifier"][level]["auc"] <= 1
        assert floor["classifier"][level]["n_per_class"] == metrics["classifier"][level]["n_per_class"] == 150
        assert floor["classifier"][level]["optimiser_steps_per_epoch"] == 1  # 2 * 90 showers, batch 1000
    assert any("barely trained" in note for note in metrics["notes"])
    # forced FPD/KPD (few batches here): computed for both, the ratio and a note on the floor's level
    fpd, fpd_floor = metrics["fpd_kpd"]["fpd_x1e3"], floor["fpd_kpd"]["fpd_x1e3"]
    assert fpd_floor > 0 and metrics["ratio_to_floor"]["fpd_x1e3"] == pytest.approx(fpd / fpd_floor)
    assert any(note.startswith("FPD x 1e3: model") for note in metrics["notes"])
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["floor"]["summary"]["geometric_mean"] == pytest.approx(g_floor)
    report = (out / "report.md").read_text()
    assert "## Floor" in report and "| metric | model | floor | model / floor |" in report
    assert "low-level (floor)" in report and f"{g / g_floor:.3g}" in report


def test_fpd_kpd_skip_rule(files, tmp_path):
    assert fpd_kpd_decision(None, FPD_KPD_MIN_SHOWERS) == (True, None)
    assert fpd_kpd_decision(None, FPD_KPD_MIN_SHOWERS - 1)[0] is False
    assert fpd_kpd_decision(True, 20) == (True, None) and fpd_kpd_decision(False, 10**6)[0] is False
    metrics = run_evaluation(files["generated"], files["reference"], GEOMETRY, tmp_path / "auto",
                             _options(classifier="none", plots=False, energy_bins=False), floor=files["small"])
    assert metrics["options"]["fpd_kpd"] is None
    for section in (metrics, metrics["floor"]):
        assert "below 10000 showers per sample (here" in section["fpd_kpd"]["skipped"]
        assert "fpd_x1e3" not in section["fpd_kpd"]
    assert "timing_s" in metrics and "fpd_kpd" not in metrics["timing_s"]
    assert any(note.startswith("FPD/KPD skipped by default") for note in metrics["notes"])
    assert any("the floor holds 100 showers" in note for note in metrics["notes"])
    assert "FPD/KPD skipped by default" in (tmp_path / "auto" / "report.md").read_text()


def test_evaluate_cli_with_floor(files, tmp_path):
    from typer.testing import CliRunner

    from caloadapt.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["evaluate", "--generated", str(files["distorted"]), "--reference",
                                      str(files["reference"]), "--floor", str(files["generated"]), "-o", str(out),
                                      "--classifier", "none", "--no-plots", "--n-bootstrap", "2", "--no-fpd-kpd"])
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "metrics.json").read_text())
    assert f"G / G_floor = {stored['summary']['ratio_to_floor']:.3f}" in result.output
    # --no-fpd-kpd is passed through (the official FPD batches would take minutes on a CPU)
    assert stored["options"]["fpd_kpd"] is False and stored["fpd_kpd"] is None and stored["floor"]["fpd_kpd"] is None
    missing = CliRunner().invoke(app, ["evaluate", "--generated", str(files["distorted"]), "--reference",
                                       str(files["reference"]), "--floor", str(tmp_path / "none.h5"), "-o",
                                       str(tmp_path / "bad")])
    assert missing.exit_code == 2 and "caloadapt: error:" in missing.output and not (tmp_path / "bad").exists()


def test_floor_at_the_reference_energies(files, tmp_path):
    """``simulate --energies-from`` makes a floor at the reference's energies; a floor with its own energies
    beside a sample generated at the reference energies is noted."""
    from typer.testing import CliRunner

    from caloadapt.cli import app

    same = tmp_path / "same_energies.h5"
    result = CliRunner().invoke(app, ["simulate", "-g", GEOMETRY, "--energies-from", str(files["reference"]),
                                      "--n", "150", "--seed", "99", "-f", "calochallenge", "-o", str(same)])
    assert result.exit_code == 0, result.output
    reference, floor = read_showers(files["reference"]), read_showers(same)
    np.testing.assert_array_equal(floor.incident_energy_mev, reference.incident_energy_mev)
    assert not np.array_equal(floor.points[:100], reference.points[:100])  # new showers, same energies
    quick = _options(classifier="none", plots=False, energy_bins=False, n_bootstrap=0)
    noted = run_evaluation(same, files["reference"], GEOMETRY, tmp_path / "a", quick, floor=files["generated"])
    assert any("the floor has its own" in note for note in noted["notes"])
    clean = run_evaluation(files["generated"], files["reference"], GEOMETRY, tmp_path / "b", quick, floor=same)
    assert not any("the floor has its own" in note for note in clean["notes"])


def test_identical_files_give_zero_distance(files, tmp_path):
    metrics = run_evaluation(files["reference"], files["reference"], GEOMETRY, tmp_path / "same",
                             _options(plots=False, fpd_kpd=False, energy_bins=False, max_showers=100))
    scores = metrics["calotransfer"]["scores"]
    for row in SCORE_ROWS:
        assert scores[row]["wasserstein"] <= 1e-9  # 0, or the 1e-10 of a geometric mean over layers
    assert all(v == 0.0 for v in metrics["calochallenge"]["separation_power_summary"].values())
    for key in ("low_level", "high_level"):
        assert 0.25 <= metrics["classifier"][key]["auc"] <= 0.75


def test_streaming_matches_one_chunk(files, tmp_path):
    def run(chunk_size: int, name: str) -> dict:
        return run_evaluation(files["generated"], files["reference"], GEOMETRY, tmp_path / name,
                              _options(chunk_size=chunk_size, max_showers=80, plots=False, n_bootstrap=5,
                                       max_pooled_cells=30_000))

    small, big = run(17, "small_chunks"), run(1000, "one_chunk")
    for role in ("reference", "generated"):  # the pooled cells are capped at whole showers
        record = small["inputs"][role]
        assert 0 < record["n_showers_with_pooled_cells"] < 80 and 0 < record["n_pooled_cells"] <= 30_000
    assert any("pooled cell-energy spectrum" in note for note in small["notes"])
    for key in ("created", "timing_s", "options"):
        small.pop(key), big.pop(key)
    _assert_close(small, big)


def _assert_close(a, b, path: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _assert_close(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_unequal_sizes_and_memory_budget(files, tmp_path):
    metrics = run_evaluation(files["small"], files["reference"], GEOMETRY, tmp_path / "unequal",
                             _options(plots=False, fpd_kpd=False, energy_bins=False, max_low_level_floats=10))
    assert metrics["inputs"]["generated"]["n_showers_used"] == 100
    assert metrics["calotransfer"]["n_reference"] == N_SHOWERS  # the scores use all showers
    assert metrics["classifier"]["high_level"]["n_per_class"] == 100
    assert "skipped" in metrics["classifier"]["low_level"]
    notes = " ".join(metrics["notes"])
    assert "first 100 showers" in notes and "memory budget" in notes


def test_cross_geometry_points_file(tmp_path, files):
    showers = simulate("calochallenge-3", "electron", _energies(3, 40), seed=13)
    write_showers(tmp_path / "ds3.h5", showers)  # point-cloud file of another readout
    metrics = run_evaluation(tmp_path / "ds3.h5", files["reference"], GEOMETRY, tmp_path / "cross",
                             _options(classifier="none", fpd_kpd=False, plots=False))
    geometry = metrics["geometry"]
    assert geometry["cross_geometry"] is True
    assert geometry["generated_file_geometry"] == "calochallenge-3"
    assert geometry["reference_file_geometry"] == GEOMETRY
    assert metrics["inputs"]["generated"]["format"] == "points"
    assert metrics["calotransfer"]["geometric_mean"] < 1.0  # same detector physics, another binning
    assert any("voxelised into" in note for note in metrics["notes"])


def test_bad_inputs_give_clear_errors(files, tmp_path):
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f.create_dataset("incident_energies", shape=(0, 1), dtype="f4")
        f.create_dataset("showers", shape=(0, 6480), dtype="f4")
    with pytest.raises(InputError, match="no showers"):
        run_evaluation(empty, files["reference"], GEOMETRY, tmp_path / "out", _options())
    with pytest.raises(InputError, match="no such file"):
        run_evaluation(tmp_path / "missing.h5", files["reference"], GEOMETRY, tmp_path / "out", _options())
    odd = tmp_path / "odd.h5"
    with h5py.File(odd, "w") as f:
        f.create_dataset("incident_energies", data=np.full((3, 1), 1e4, "f4"))
        f.create_dataset("showers", data=np.ones((3, 100), "f4"))
    with pytest.raises(InputError, match="100 voxels"):
        run_evaluation(files["generated"], odd, GEOMETRY, tmp_path / "out", _options())
    with pytest.raises(CaloadaptError, match="unknown geometry"):
        run_evaluation(files["generated"], files["reference"], "no-such-geometry", tmp_path / "out", _options())
    with pytest.raises(InputError, match="classifier"):
        run_evaluation(files["generated"], files["reference"], GEOMETRY, tmp_path / "out",
                       _options(classifier="huge"))
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


def test_report_from_stored_metrics(independent, tmp_path):
    metrics = json.loads((independent[1] / "metrics.json").read_text())
    metrics["calotransfer"]["scores"]["cog_x"]["kl"] = None  # a null (NaN) value
    plot = {"scores": independent[1] / metrics["outputs"]["plots"]["scores"]}
    md, html = write_report(metrics, plot, tmp_path)
    text = md.read_text()
    assert "n/a" in text and "| geometric mean |" in text
    assert "![" in text and html.read_text().startswith("<!DOCTYPE html>")


def test_helpers():
    assert fpd_kpd_settings(100_000, 60_000) == {"min_samples": 10_000, "max_samples": 50_000,
                                                 "kpd_batch_size": 10_000, "official": True}
    small = fpd_kpd_settings(150, 400)
    assert small == {"min_samples": 30, "max_samples": 150, "kpd_batch_size": 150, "official": False}
    from caloadapt.evaluate.observables import CellLayout, shower_observables

    rng = np.random.default_rng(0)
    layout = CellLayout(rng.normal(size=(12, 3)), np.repeat(np.arange(3), 4), 3, 0.1)
    voxels = rng.exponential(0.3, (9, 12))
    energy = rng.uniform(1e3, 1e4, 9)
    whole = shower_observables(voxels, energy, layout)
    joined = concatenate_observables([shower_observables(voxels[:4], energy[:4], layout),
                                      shower_observables(voxels[4:], energy[4:], layout)])
    np.testing.assert_array_equal(joined.cell_shower_index, whole.cell_shower_index)
    np.testing.assert_allclose(joined.cell_energy_mev, whole.cell_energy_mev)
    for key in whole.per_shower:
        np.testing.assert_allclose(joined.per_shower[key], whole.per_shower[key], rtol=1e-12)
    assert not math.isnan(joined.per_shower["depth_cog_mm"].sum())


def test_theta_bins():
    from caloadapt.evaluate.energy_bins import theta_bin_label, theta_bin_masks

    theta = np.array([40.0, 59.9, 60.0, 90.0, 139.0, 140.0])
    bins = theta_bin_masks(theta)
    assert [(low, high) for low, high, _ in bins] == [(40, 60), (60, 80), (80, 100), (100, 120), (120, 140)]
    assert [int(mask.sum()) for _, _, mask in bins] == [2, 1, 1, 0, 2]  # the last bin is closed
    assert theta_bin_label(40, 60) == "theta 40-60 deg"
    assert [(low, high) for low, high, _ in theta_bin_masks(np.full(3, 90.0))] == [(80, 100)]
    with pytest.raises(InputError):
        theta_bin_masks(theta, 0.0)


def test_inclined_samples_are_scored_per_theta_bin_beside_the_floor(tmp_path):
    """Inclined reference, generated and floor samples: every theta bin of 20 degrees is scored for the
    model and the floor, with the ratio; a sample tilted the wrong way is far from the reference in its
    bins; normal-incidence samples have no theta table."""
    geometry, energies = "ild-ecal", np.full(12, 20e3)
    theta = np.repeat([50.0, 70.0, 130.0], 4)
    paths = {}
    for name, seed, angles in (("reference", 1, theta), ("floor", 2, theta), ("mirrored", 3, 180.0 - theta[::-1])):
        paths[name] = tmp_path / f"{name}.h5"
        write_showers(paths[name], simulate(geometry, "photon", energies, theta_deg=angles, seed=seed))
    options = _options(plots=False, classifier="none", fpd_kpd=False)
    # the mirror image of theta = 50, 70, 130 is 130, 110, 50: the 60-80 bin of the reference has no partner
    metrics = run_evaluation(paths["mirrored"], paths["reference"], geometry, tmp_path / "out", options,
                             floor=paths["floor"])
    labels = {"theta 40-60 deg", "theta 60-80 deg", "theta 120-140 deg"}
    assert set(metrics["floor"]["calotransfer_by_theta"]) == labels
    assert set(metrics["calotransfer_by_theta"]) == {"theta 40-60 deg", "theta 120-140 deg"}
    ratios = metrics["ratio_to_floor"]["geometric_mean_by_theta"]
    assert set(ratios) == {"theta 40-60 deg", "theta 120-140 deg"} and all(r > 0 for r in ratios.values())
    assert set(metrics["summary"]["geometric_mean_by_theta"]) == {"theta 40-60 deg", "theta 120-140 deg"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## By incidence angle" in report and "theta 40-60 deg" in report
    normal = tmp_path / "normal.h5"
    write_showers(normal, simulate(geometry, "photon", energies, seed=4))
    plain = run_evaluation(normal, normal, geometry, tmp_path / "plain", options)
    assert plain["calotransfer_by_theta"] == {} and "By incidence angle" not in (tmp_path / "plain" / "report.md"
                                                                                 ).read_text()


def test_the_event_display_is_told_each_showers_direction(tmp_path):
    from caloadapt.evaluate.stream import stream_sample
    from caloadapt.geometry import get_geometry
    from caloadapt.incidence import local_direction

    geometry = get_geometry("ild-ecal")
    path = tmp_path / "inclined.h5"
    theta, phi = np.array([50.0, 90.0, 120.0]), np.array([90.0, 90.0, 100.0])
    write_showers(path, simulate(geometry, "photon", np.full(3, 20e3), theta_deg=theta, phi_deg=phi, seed=1))
    sample = stream_sample(path, geometry, n_examples=2)
    np.testing.assert_allclose(sample.examples_direction, local_direction(theta[:2], phi[:2], 8))
    np.testing.assert_array_equal(sample.observables.theta_deg, theta)
    metrics = run_evaluation(path, path, geometry, tmp_path / "out",
                             _options(classifier="none", fpd_kpd=False, n_event_display=2))
    assert (tmp_path / "out" / "plots" / "event_display.png").is_file()


def test_without_scikit_learn_the_classifier_is_skipped_with_a_note_first(files, tmp_path, uninstalled, capsys):
    uninstalled("sklearn")
    metrics = run_evaluation(files["generated"], files["reference"], GEOMETRY, tmp_path / "base",
                             _options(classifier="cpu", plots=False, fpd_kpd=False, energy_bins=False, n_bootstrap=0,
                                      progress=True))
    assert metrics["classifier"]["settings"] == "none" and "scikit-learn" in capsys.readouterr().out.splitlines()[0]
    assert any("caloadapt[eval]" in note for note in metrics["notes"])
