"""The summary of a sweep: medians over seeds, the gain over scratch, the floor, the files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from caloadapt.sweep import summarise


def _result(method: str, size: int, seed: int, g: float, **extra) -> dict:
    return {"pretrained": "ild", "method": method, "size": size, "seed": seed, "geometric_mean": g,
            "steps": 100, "trainable_all": 10, "total_all": 100, "percent_all": 10.0, "trainable_net": 5, **extra}


def test_summary_medians_gains_and_floor(tmp_path):
    results = [_result("scratch", 100, s, g, geometric_mean_floor=0.05, ratio_to_floor=g / 0.05)
               for s, g in enumerate((0.4, 0.5, 0.6))]
    results += [_result("full", 100, s, g, geometric_mean_floor=0.05, ratio_to_floor=g / 0.05)
                for s, g in enumerate((0.2, 0.3, 0.25))]
    results += [_result("full", 1000, 0, 0.1)]
    rows = summarise(results, tmp_path)
    by = {(r["method"], r["size"]): r for r in rows}
    assert set(by) == {("scratch", 100), ("full", 100), ("full", 1000)}
    full = by["full", 100]
    assert full["runs"] == 3 and full["median"] == pytest.approx(0.25)
    assert full["q16"] == pytest.approx(np.quantile([0.2, 0.25, 0.3], 0.16))
    assert full["improvement_over_scratch"] == pytest.approx(1 - 0.25 / 0.5)
    assert by["scratch", 100]["improvement_over_scratch"] is None  # no gain over itself
    assert by["full", 1000]["improvement_over_scratch"] is None  # no scratch at that size
    assert full["median_floor"] == pytest.approx(0.05) and full["ratio_to_floor"] == pytest.approx(5.0)
    assert by["full", 1000]["median_floor"] is None
    assert json.loads((tmp_path / "summary.json").read_text()) == rows
    with open(tmp_path / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    md = (tmp_path / "summary.md").read_text()
    assert "| ild | full | 100 | 3 | 100 |" in md and "+50.0 %" in md
    assert (tmp_path / "geometric_mean_vs_size.png").stat().st_size > 0
