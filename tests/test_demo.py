"""The main job end to end: ``caloadapt demo --quick`` with the shipped pre-trained model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from caloadapt.cli import app
from caloadapt.pretrained import default_checkpoint


@pytest.mark.slow
def test_demo_quick_writes_report_and_metrics(tmp_path):
    default_checkpoint()  # the shipped model must be installed with the package
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {row["method"]: row for row in metrics["methods"]}
    assert set(rows) == {"scratch", "full", "bitfit"}
    assert rows["bitfit"]["trainable_net"] == 2632 and rows["full"]["trainable_net"] == 504920
    for row in rows.values():
        assert row["geometric_mean"] > 0 and row["train_s"] > 0
    assert rows["scratch"]["improvement_over_scratch"] is None
    assert rows["full"]["improvement_over_scratch"] == pytest.approx(
        1 - rows["full"]["geometric_mean"] / rows["scratch"]["geometric_mean"])
    report = (out / "report.md").read_text()
    assert "| bitfit |" in report and "geometric mean" in report
    assert (out / "report.html").stat().st_size > 0
    for method in rows:
        assert (out / "evaluation" / method / "report.md").stat().st_size > 0
        assert json.loads((out / "evaluation" / method / "metrics.json").read_text())["summary"]
    assert "method" in result.output and "vs scratch" in result.output
