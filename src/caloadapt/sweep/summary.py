"""Sweep results as a table and a plot: geometric-mean W1 versus data size per method."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .._atomic import atomic_path

__all__ = ["summarise"]


def _group(results: list[dict]) -> dict[tuple[str, str, int], np.ndarray]:
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in results:
        groups[(r["pretrained"], r["method"], int(r["size"]))].append(float(r["geometric_mean"]))
    return {k: np.asarray(v) for k, v in groups.items()}


def summarise(results: list[dict], out_dir: str | Path) -> list[dict]:
    """Median and spread over seeds per (pre-training, method, size), and the gain over scratch.

    The relative improvement over scratch at a size is ``1 - median(G_method) / median(G_scratch)``
    with G the geometric mean of the normalised W1 (lower is better), scratch taken from the same
    pre-trained label (same architecture and frame). Writes ``summary.json``, ``summary.csv``,
    ``summary.md`` and ``geometric_mean_vs_size.png``.
    """
    out_dir = Path(out_dir)
    groups = _group(results)
    rows = []
    for (label, method, size), values in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        scratch = groups.get((label, "scratch", size))
        row = {"pretrained": label, "method": method, "size": size, "runs": len(values),
               "median": float(np.median(values)), "q16": float(np.quantile(values, 0.16)),
               "q84": float(np.quantile(values, 0.84)), "min": float(values.min()), "max": float(values.max()),
               "improvement_over_scratch": (1 - float(np.median(values)) / float(np.median(scratch)))
               if scratch is not None and method != "scratch" else None}
        rows.append(row)
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
    lines = ["| pre-trained | method | D | runs | median G (W1) | 16-84 % | vs scratch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = "" if r["improvement_over_scratch"] is None else f"{100 * r['improvement_over_scratch']:+.1f} %"
        lines.append(f"| {r['pretrained']} | {r['method']} | {r['size']} | {r['runs']} | {r['median']:.4f} | "
                     f"{r['q16']:.4f} - {r['q84']:.4f} | {gain} |")
    return "\n".join(lines) + "\n\nG: geometric mean of the normalised Wasserstein-1 distances (lower is better); " \
                              "vs scratch: 1 - G / G_scratch at the same D.\n"


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
    ax.set_xscale("log")
    ax.set_xlabel("target training showers D")
    ax.set_ylabel("geometric mean of normalised W1")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
