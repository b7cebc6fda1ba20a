"""The main job end to end: ``caloadapt demo --quick`` with the shipped pre-trained model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from caloadapt.cli import app
from caloadapt.models.checkpoint import load_checkpoint, load_model
from caloadapt.pretrained import default_checkpoint


@pytest.mark.slow
def test_demo_quick_writes_report_and_metrics(tmp_path):
    default_checkpoint()  # the shipped model must be installed with the package
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {row["method"]: row for row in metrics["methods"]}
    peft = "lora:rank=8,alpha=8,flow=lora"
    assert set(rows) == {"scratch", "full", peft}
    assert {row["kind"] for row in rows.values()} == {"one-step"}  # students only, unless --teachers
    point_network = load_model("ild-photons")[0].denoiser
    biases = sum(p.numel() for name, p in point_network.named_parameters() if name.endswith("bias"))
    assert biases == 2632  # the widths of the shipped network: its bias count does not depend on the condition
    assert rows["full"]["trainable_net"] == sum(p.numel() for p in point_network.parameters())
    # whole-model counts: full fine-tuning trains everything, LoRA in the network and the flow < 5 %
    assert rows["full"]["trainable_all"] == rows["full"]["total_all"]
    inputs_and_outputs = sum(layer.linear.in_features + layer.linear.out_features for layer in point_network.net.layers)
    assert rows[peft]["trainable_net"] == 8 * inputs_and_outputs and rows[peft]["percent_all"] < 5
    floors = {row["geometric_mean_floor"] for row in rows.values()}  # one floor, beside every method
    assert len(floors) == 1 and floors.pop() > 0
    for row in rows.values():
        assert row["geometric_mean"] > 0 and row["train_s"] > 0 and row["steps"] == 12
        assert row["ratio_to_floor"] == pytest.approx(row["geometric_mean"] / row["geometric_mean_floor"])
        assert row["ms_per_shower"] > 0 and row["sampler"] == "one step"
        # every method's files: the adapted model, its student (from the shipped student; scratch from its
        # own network), and the generated showers named by method
        student = load_checkpoint(out / "runs" / row["directory"].removesuffix("-1step") / "model-1step.pt")
        assert student["consistency"]["teacher"].endswith("model.pt")
        assert ("student_init" in student) == (row["method"] != "scratch")
        assert (out / "generated" / f"{row['directory']}.h5").is_file()
    assert rows["full"]["directory"] == "full-1step"
    assert rows["scratch"]["improvement_over_scratch"] is None
    assert rows["full"]["improvement_over_scratch"] == pytest.approx(
        1 - rows["full"]["geometric_mean"] / rows["scratch"]["geometric_mean"])
    report = (out / "report.md").read_text()
    assert f"| {peft}, one step |" in report and "geometric mean" in report and "G_floor" in report
    assert metrics["floor_data"].endswith("floor.h5")
    assert (out / "report.html").stat().st_size > 0
    for row in rows.values():
        evaluation = json.loads((out / "evaluation" / row["directory"] / "metrics.json").read_text())
        assert evaluation["summary"]["ratio_to_floor"] == pytest.approx(row["ratio_to_floor"])
        assert evaluation["floor"]["input"]["path"] == metrics["floor_data"]
    assert "generator" in result.output and "vs scratch" in result.output and "G_floor" in result.output


@pytest.mark.slow
def test_demo_with_teachers_scores_the_adapted_models_and_their_students(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--teachers", "-o", str(out), "--device", "cpu",
                                      "--methods", "scratch,full"])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    rows = json.loads((out / "metrics.json").read_text())["methods"]
    assert [(r["method"], r["kind"]) for r in rows] == [("scratch", "teacher"), ("scratch", "one-step"),
                                                        ("full", "teacher"), ("full", "one-step")]
    assert rows[2]["sampler"] == "8 heun steps" and rows[2]["directory"] == "full"
    # each kind is compared with the scratch baseline of its own kind
    assert rows[3]["improvement_over_scratch"] == pytest.approx(1 - rows[3]["geometric_mean"] / rows[1]["geometric_mean"])
    assert rows[2]["improvement_over_scratch"] == pytest.approx(1 - rows[2]["geometric_mean"] / rows[0]["geometric_mean"])
    assert load_checkpoint(out / "runs" / "full" / "model.pt")["occupancy"]  # calibrated for its own sampler


def test_demo_refuses_bad_methods_before_any_work(tmp_path):
    for methods, words in (("full,bitfit", "scratch"), ("scratch,nonsense", "nonsense"),
                           ("scratch,scratch-converged:k=2", "scratch-converged"), ("scratch,zero-shot", "sweep")):
        result = CliRunner().invoke(app, ["demo", "--quick", "-o", str(tmp_path / "d"), "--methods", methods])
        assert result.exit_code == 2, (methods, result.output)
        assert "caloadapt: error:" in result.output and words in result.output
    assert not (tmp_path / "d").exists()


def test_demo_without_peft_says_so_before_any_work(tmp_path, uninstalled):
    uninstalled("peft")
    result = CliRunner().invoke(app, ["demo", "--quick", "-o", str(tmp_path / "d")])  # the default methods
    assert result.exit_code == 2 and "caloadapt[peft]" in result.output and "'lora'" in result.output
    assert not (tmp_path / "d").exists()
