"""The speed benchmark in its quick mode: cases, statistics, hardware record, JSON and table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caloadapt.benchmark import REFERENCE_POINTS, SCHEMA, format_table, run_benchmark
from conftest import needs_cxx

HAS_ONNX = all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints) -> tuple[Path, Path]:
    return tiny_checkpoints


def _stats_ok(stats: dict) -> bool:
    return stats["min"] <= stats["median"] <= stats["max"] and stats["iqr"] >= 0 and stats["n"] >= 1


def test_quick_benchmark_writes_json_with_all_cases(checkpoints, tmp_path):
    teacher, distilled = checkpoints
    out = tmp_path / "bench" / "benchmark.json"
    lines: list[str] = []
    report = run_benchmark(teacher, out, quick=True, device="cpu", distilled=distilled, threads=(1,),
                           n_steps=3, repeats=2, log=lines.append)
    assert out.is_file() and json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".txt").read_text().strip() == format_table(report)
    assert report["schema"] == SCHEMA and report["quick"] is True
    for key in ("platform", "cpu_model", "logical_cores", "usable_cores", "gpus", "load_average"):
        assert key in report["hardware"]
    for key in ("python", "torch", "numpy", "caloadapt", "onnxruntime"):
        assert key in report["versions"]
    assert report["settings"]["batch_sizes"] == [1, 8] and report["settings"]["energy_gev"] == 50.0

    rows = report["results"]
    cases = {r["case"] for r in rows}
    expected = {"simulator", "reference_net", "reference_net_fused", "heun", "euler", "one_step",
                "exported_one_step"} | (
        {"onnx_one_step"} if HAS_ONNX else set())
    assert expected <= cases
    for row in rows:
        assert "skipped" not in row, row
        assert row["batch_size"] in (1, 8) and row["threads"] == 1 and row["device"] == "cpu"
        assert _stats_ok(row["ms_per_shower"]) and _stats_ok(row["showers_per_s"])
        assert row["repeats"] >= 1 and (row["case"].startswith("reference_net") or row["mean_hits"] > 0)
        if row["case"] != "simulator":
            assert row["mean_points"] > 0
    nfe = {r["case"]: r["nfe"] for r in rows}
    assert nfe["heun"] == 5 and nfe["euler"] == 3 and nfe["one_step"] == nfe["exported_one_step"] == 1
    assert nfe["reference_net"] == nfe["reference_net_fused"] == 1
    assert {r["mean_points"] for r in rows if r["case"].startswith("reference_net")} == {REFERENCE_POINTS}

    scan = report["energy_scan"]
    assert scan["geometry"] == "calochallenge-3" and scan["particle"] == "electron"
    assert {r["energy_gev"] for r in scan["results"]} == {1.0, 10.0}
    assert {r["case"] for r in scan["results"]} >= {"simulator", "heun", "one_step"}

    summary = report["summary"]
    assert summary["target_ms"] == 2.0 and summary["one_step_best"]["ms_per_shower"] > 0
    assert summary["one_step_over_simulator"] > 0
    # the ratio to the reference network is of the two medians of this run, batch by batch
    ms = {(r["case"], r["batch_size"]): r["ms_per_shower"]["median"] for r in rows}
    for batch in (1, 8):
        for case, key in (("reference_net", "one_step_speedup_over_reference"),
                          ("reference_net_fused", "one_step_speedup_over_reference_fused")):
            assert summary[key][str(batch)] == pytest.approx(ms[case, batch] / ms["one_step", batch])
    assert summary["one_step_targets"]["batch 1: <= 5 ms/shower"] == (ms["one_step", 1] <= 5.0)
    assert summary["one_step_targets"]["batch 100: <= 2 ms/shower"] is False  # batch 100 not measured
    table = format_table(report)
    assert "one-step, 1 CPU thread" in table and "simulator" in table and "calochallenge-3" in table
    assert "reference network" in table and "reference_net" in table
    assert lines  # progress went to the log


def test_without_a_distilled_model_the_one_step_case_is_skipped(checkpoints, tmp_path):
    report = run_benchmark(checkpoints[0], tmp_path / "b.json", quick=True, device="cpu", threads=(1,), n_steps=2,
                           repeats=1, batch_sizes=(2,), scan_energies_gev=(1.0,), scan_batch=1, simulator=False)
    cases = {r["case"] for r in report["results"]}
    assert "one_step" not in cases and {"heun", "euler"} <= cases
    if HAS_ONNX:
        assert "onnx_heun" in cases
    assert any("one-step case skipped" in note for note in report["notes"])
    assert report["summary"]["one_step_best"] is None
    assert "not measured" in format_table(report)


def test_budget_skips_batches_estimated_too_slow(checkpoints, tmp_path):
    report = run_benchmark(checkpoints[0], tmp_path / "b.json", quick=True, device="cpu", threads=(1,), n_steps=2,
                           repeats=1, batch_sizes=(1, 100000), scan_energies_gev=(1.0,), scan_batch=1,
                           budget_s=0.5, onnx=False)
    big = [r for r in report["results"] if r["batch_size"] == 100000]
    assert big and all("skipped" in r for r in big)
    assert "skipped" in format_table(report)


@needs_cxx
def test_compile_adds_the_one_step_case_with_its_flow_compiled(checkpoints, tmp_path):
    """--compile times the one-step model a second time with its flow compiled (not in the energy scan),
    with its own targets; the plain one-step case is still timed beside it."""
    teacher, distilled = checkpoints
    report = run_benchmark(teacher, tmp_path / "b.json", quick=True, device="cpu", distilled=distilled,
                           threads=(1,), n_steps=2, repeats=1, batch_sizes=(1,), scan_energies_gev=(1.0,),
                           scan_batch=1, simulator=False, onnx=False, compile=True)
    rows = {r["case"]: r for r in report["results"]}
    assert {"one_step", "one_step_compiled"} <= set(rows) and rows["one_step_compiled"]["nfe"] == 1
    assert rows["one_step_compiled"]["mean_hits"] > 0
    assert "one_step_compiled" not in {r["case"] for r in report["energy_scan"]["results"]}
    summary = report["summary"]
    ms = rows["one_step_compiled"]["ms_per_shower"]["median"]
    assert summary["one_step_compiled_ms_per_shower_1_thread"] == {"1": ms}
    assert summary["one_step_compiled_targets"]["batch 1: <= 5 ms/shower"] == (ms <= 5.0)
    assert "flow compiled" in format_table(report)


def test_fast_runs_are_repeated_until_the_minimum_time_is_timed():
    """A measurement times ``repeats`` runs, and more (up to ``max_repeats``) while less than
    ``min_timed_s`` is timed, each run one batch, so the median of a fast case is that of many runs."""
    from caloadapt._timing import time_runs

    calls = []

    def run() -> dict:
        calls.append(1)
        return {"mean_hits": 1.0}
    plain = time_runs(run, 1, repeats=3, warmup=1, budget_s=60.0, estimate_s=None)
    assert plain["repeats"] == 3 and len(calls) == 4  # one warm-up
    calls.clear()
    more = time_runs(run, 1, repeats=3, warmup=0, budget_s=60.0, estimate_s=None, min_timed_s=60.0, max_repeats=7)
    assert more["repeats"] == 7 == len(calls) and more["ms_per_shower"]["n"] == 7
