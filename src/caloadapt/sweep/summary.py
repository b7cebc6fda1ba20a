"""Sweep results as a table and a plot: geometric-mean W1 versus data size per method."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .._atomic import atomic_path
from .recipe import SCRATCH_CONVERGED

__all__ = ["summarise"]


def _group(results: list[dict]) -> dict[tuple[str, str, int], list[dict]]:
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["pretrained"], r["method"], int(r["size"]))].append(r)
    return groups


def _median(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarise(results: list[dict], out_dir: str | Path) -> list[dict]:
    """Median and spread over seeds per (pre-training, method, size), the floor and the gain over scratch.

    The relative improvement over scratch at a size is ``1 - median(G_method) / median(G_scratch)``
    with G the geometric mean of the normalised W1 (lower is better), scratch taken from the same
    pre-trained label (same architecture and frame); ``improvement_over_scratch_converged`` is the
    same against the ``scratch-converged`` baseline where the sweep has it. With a floor
    (``SweepSpec.floor``) every row has ``median_floor`` (median G_floor over its runs) and
    ``ratio_to_floor`` (median of the runs' G / G_floor). ``trainable_all`` / ``total_all`` /
    ``percent_all`` count the point network and the flow together; ``steps`` is the median number
    of steps actually trained (early stopping shortens ``scratch-converged``). Writes
    ``summary.json``, ``summary.csv``, ``summary.md`` and ``geometric_mean_vs_size.png``.
    """
    out_dir = Path(out_dir)
    groups = _group(results)
    medians = {key: float(np.median([float(r["geometric_mean"]) for r in runs])) for key, runs in groups.items()}
    rows = []
    for (label, method, size), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        values = np.asarray([float(r["geometric_mean"]) for r in runs])
        median = float(np.median(values))

        def gain(baseline: str):
            other = medians.get((label, baseline, size))
            return 1 - median / other if other is not None and method != baseline else None

        steps = [r["steps"] for r in runs if r.get("steps") is not None]
        rows.append({
            "pretrained": label, "method": method, "size": size, "runs": len(runs),
            "median": median, "q16": float(np.quantile(values, 0.16)), "q84": float(np.quantile(values, 0.84)),
            "min": float(values.min()), "max": float(values.max()),
            "median_floor": _median([r.get("geometric_mean_floor") for r in runs]),
            "ratio_to_floor": _median([r.get("ratio_to_floor") for r in runs]),
            "steps": int(np.median(steps)) if steps else None,
            "steps_min": min(steps) if steps else None, "steps_max": max(steps) if steps else None,
            "trainable_all": runs[0].get("trainable_all"), "total_all": runs[0].get("total_all"),
            "percent_all": runs[0].get("percent_all"), "trainable_net": runs[0].get("trainable_net"),
            "improvement_over_scratch": gain("scratch"),
            "improvement_over_scratch_converged": gain(SCRATCH_CONVERGED),
        })
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    with atomic_path(out_dir / "summary.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["pretrained"])
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(_markdown(rows))
    _plot(rows, out_dir / "geometric_mean_vs_size.png")
    return rows


def _markdown(rows: list[dict]) -> str:
    def pct(value):
        return "" if value is None else f"{100 * value:+.1f} %"

    def num(value, digits=4):
        return "" if value is None else f"{value:.{digits}f}"

    converged = any(r["method"] == SCRATCH_CONVERGED for r in rows)
    lines = ["| pre-trained | method | D | runs | steps | trainable (net + flow) | median G (W1) | 16-84 % | "
             "G_floor | G / G_floor | vs scratch |" + (" vs scratch-converged |" if converged else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if converged else "")]
    for r in rows:
        steps = "" if r["steps"] is None else (str(r["steps"]) if r["steps_min"] == r["steps_max"]
                                               else f"{r['steps']} ({r['steps_min']}-{r['steps_max']})")
        params = "" if not r.get("total_all") else f"{r['trainable_all']:,} ({r['percent_all']:.2f} %)"
        lines.append(f"| {r['pretrained']} | {r['method']} | {r['size']} | {r['runs']} | {steps} | {params} | "
                     f"{r['median']:.4f} | {r['q16']:.4f} - {r['q84']:.4f} | {num(r['median_floor'])} | "
                     f"{num(r['ratio_to_floor'], 2)} | {pct(r['improvement_over_scratch'])} |"
                     + (f" {pct(r['improvement_over_scratch_converged'])} |" if converged else ""))
    return "\n".join(lines) + ("\n\nG: geometric mean of the normalised Wasserstein-1 distances (lower is better); "
                               "G_floor: G of a second sample of the reference source (what a perfect simulator "
                               "scores at this sample size); vs scratch: 1 - G / G_scratch at the same D; "
                               "trainable: point network and flow together; steps: trained (median, range).\n")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    series: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        series[(r["pretrained"], r["method"])].append(r)
    multiple = len({r["pretrained"] for r in rows}) > 1
    colours = plt.cm.tab10 if len(series) <= 10 else plt.cm.tab20
    for i, ((label, method), points) in enumerate(series.items()):
        colour = colours(i % colours.N)
        if all(p["size"] == 0 for p in points):  # zero-shot: no target showers, a level to compare with
            ax.axhline(points[0]["median"], linestyle="--", linewidth=1, color=colour,
                       label=f"{label}: {method}" if multiple else method)
            continue
        points.sort(key=lambda r: r["size"])
        x = [p["size"] for p in points]
        y = np.array([p["median"] for p in points])
        err = np.array([[p["median"] - p["q16"] for p in points], [p["q84"] - p["median"] for p in points]])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colour,
                    label=f"{label}: {method}" if multiple else method)
    floors = sorted({round(r["median_floor"], 6) for r in rows if r.get("median_floor") is not None})
    for k, level in enumerate(floors):
        ax.axhline(level, color="0.4", linestyle=":", linewidth=1.2, label="floor (second reference sample)"
                   if k == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("target training showers D")
    ax.set_ylabel("geometric mean of normalised W1")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
