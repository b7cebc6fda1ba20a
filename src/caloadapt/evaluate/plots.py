"""Plots of an evaluation: reference vs generated, in a HEP style (mplhep, CMS-like), as PNG files.

Every function takes plain arrays, draws one figure, writes it atomically as PNG and returns the
path. Figures are created with the Agg canvas directly (no pyplot, no global backend switch, no
figure manager to close), inside a local style context (``mplhep.style.CMS`` with smaller fonts),
so importing this module changes no global matplotlib state.

- :func:`histogram_with_ratio`: one observable, normalised histograms with a generated/reference
  ratio panel;
- :func:`longitudinal_profile`, :func:`radial_profile`: mean energy per layer / per radial bin, with
  a ratio panel;
- :func:`energy_bin_panels`: a grid, rows = incident-energy decades, columns = a few observables and
  the longitudinal profile;
- :func:`average_shower_polar`: the average shower of a few layers as polar images (CaloChallenge
  ``avg`` mode);
- :func:`event_display`: 3D scatter (depth, x, y) of a few showers, coloured and sized by energy;
- :func:`score_summary`, :func:`separation_power_bars`: bar charts of the scores;
- :func:`loss_curves`: training and validation losses of a training run against the step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import mplhep
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from .._atomic import atomic_path
from .energy_bins import ENERGY_DECADES_MEV, energy_bin_label, energy_bin_masks
from .observables import ShowerObservables

__all__ = ["OBSERVABLE_AXES", "histogram_with_ratio", "longitudinal_profile", "radial_profile",
           "energy_bin_panels", "average_shower_polar", "event_display", "score_summary",
           "separation_power_bars", "loss_curves", "hep_style"]

#: observable -> (axis label with unit, log x, log y) of its histogram
OBSERVABLE_AXES: dict[str, tuple[str, bool, bool]] = {
    "energy_ratio": (r"$E_\mathrm{vis} / E_\mathrm{inc}$", False, False),
    "visible_energy_mev": (r"Visible energy $E_\mathrm{vis}$ [MeV]", True, False),
    "n_hits": ("Number of hits", True, False),
    "depth_cog_mm": ("Longitudinal centre of gravity [mm]", False, False),
    "radius_cog_mm": ("Radial centre of gravity [mm]", False, False),
    "cog_x_mm": ("Centre of gravity x [mm]", False, True),
    "cog_y_mm": ("Centre of gravity y [mm]", False, True),
    "cell_energy_mev": ("Cell energy [MeV]", True, True),
}

_OVERRIDES = {"font.size": 12, "axes.labelsize": 13, "axes.titlesize": 12, "xtick.labelsize": 11,
              "ytick.labelsize": 11, "legend.fontsize": 10, "legend.frameon": False,
              "xtick.major.size": 6, "ytick.major.size": 6, "xtick.minor.size": 3, "ytick.minor.size": 3,
              "lines.linewidth": 1.6, "savefig.dpi": 100, "figure.dpi": 100}
_REFERENCE_COLOUR = "black"
_GENERATED_COLOUR = "#3f90da"
_RATIO_RANGE = (0.5, 1.5)


def hep_style():
    """Context manager of the plot style: mplhep's CMS style with smaller fonts."""
    return matplotlib.style.context([mplhep.style.CMS, _OVERRIDES])


def _figure(figsize: tuple[float, float], **kwargs) -> Figure:
    figure = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    figure.clear()
    return path


def _finite(values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    return array[np.isfinite(array)]


def _edges(reference: np.ndarray, generated: np.ndarray, bins: int, log_x: bool) -> tuple[np.ndarray, bool]:
    both = np.concatenate([reference, generated])
    if log_x:
        positive = both[both > 0]
        if positive.size:
            low, high = np.quantile(positive, [0.0005, 0.9995])
            if high <= low:
                low, high = low / 2, high * 2
            return np.geomspace(low, high, bins + 1), True
    if both.size == 0:
        return np.linspace(0.0, 1.0, bins + 1), False
    low, high = np.quantile(both, [0.0005, 0.9995])
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1), False


def _ratio(ax, edges: np.ndarray, ref: np.ndarray, ref_err: np.ndarray, gen: np.ndarray, gen_err: np.ndarray,
           ylabel: str = "Gen. / Ref.") -> None:
    """Generated / reference with propagated errors; points outside the range drawn at its edge."""
    centres = 0.5 * (edges[1:] + edges[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ref > 0, gen / ref, np.nan)
        error = np.where(ref > 0, np.sqrt((gen_err / ref) ** 2 + (gen * ref_err / ref ** 2) ** 2), np.nan)
    low, high = _RATIO_RANGE
    shown = np.clip(ratio, low, high)
    ax.errorbar(centres, shown, yerr=np.where(ratio == shown, error, 0.0),
                xerr=[centres - edges[:-1], edges[1:] - centres], fmt="o", ms=3, color=_GENERATED_COLOUR,
                elinewidth=1.0)
    ax.axhline(1.0, color=_REFERENCE_COLOUR, lw=1.0, ls="--")
    ax.set_ylim(low - 0.02, high + 0.02)
    ax.set_ylabel(ylabel)


def _ratio_figure(figsize=(6.4, 6.0)):
    figure = _figure(figsize)
    grid = figure.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.06)
    top = figure.add_subplot(grid[0])
    bottom = figure.add_subplot(grid[1], sharex=top)
    top.tick_params(which="both", labelbottom=False)
    figure.subplots_adjust(left=0.16, right=0.96, top=0.94, bottom=0.12)
    return figure, top, bottom


def _annotate(ax, text: str | None) -> None:
    if text:
        ax.text(0.97, 0.84, text, transform=ax.transAxes, va="top", ha="right", fontsize=10)


def histogram_with_ratio(reference, generated, path: str | os.PathLike[str], *, xlabel: str,
                         bins: int = 40, log_x: bool = False, log_y: bool = False,
                         labels: Sequence[str] = ("Reference", "Generated"),
                         annotation: str | None = None, title: str | None = None) -> Path:
    """Normalised histograms of one observable (reference vs generated) with a ratio panel.

    Bins span the 0.05-99.95 % quantiles of both samples together (log-spaced with ``log_x``);
    each histogram is divided by its number of entries and the bin width, with Poisson errors.
    """
    ref, gen = _finite(reference), _finite(generated)
    edges, log_x = _edges(ref, gen, bins, log_x)
    widths = np.diff(edges)
    densities = []
    for values in (ref, gen):
        counts = np.histogram(values, edges)[0].astype(np.float64)
        norm = max(values.size, 1) * widths
        densities.append((counts / norm, np.sqrt(counts) / norm))
    (d_ref, e_ref), (d_gen, e_gen) = densities
    with hep_style():
        figure, top, bottom = _ratio_figure()
        mplhep.histplot(d_ref, edges, yerr=e_ref, ax=top, histtype="step", color=_REFERENCE_COLOUR,
                        label=f"{labels[0]} (N={ref.size})")
        mplhep.histplot(d_gen, edges, yerr=e_gen, ax=top, histtype="step", color=_GENERATED_COLOUR,
                        label=f"{labels[1]} (N={gen.size})")
        if log_y:
            top.set_yscale("log")
        if log_x:
            top.set_xscale("log")
            if edges[-1] > 10 * edges[0]:  # labels at 2, 3, 4, 6 x 10^k would overlap
                bottom.xaxis.set_minor_formatter(NullFormatter())
        top.set_ylabel("Fraction / bin width")
        top.legend(loc="upper right")
        _annotate(top, annotation)
        if title:
            top.set_title(title)
        _ratio(bottom, edges, d_ref, e_ref, d_gen, e_gen)
        bottom.set_xlabel(xlabel)
        bottom.set_xlim(edges[0], edges[-1])
        top.tick_params(which="both", labelbottom=False)
        return _save(figure, path)


def _profile_plot(reference: np.ndarray, generated: np.ndarray, edges: np.ndarray, path, *, xlabel: str,
                  ylabel: str, labels: Sequence[str], log_y: bool = True) -> Path:
    ref, gen = np.asarray(reference, np.float64), np.asarray(generated, np.float64)
    stats = []
    for values in (ref, gen):
        mean = values.mean(axis=0)
        error = values.std(axis=0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
        stats.append((mean, error))
    (m_ref, e_ref), (m_gen, e_gen) = stats
    with hep_style():
        figure, top, bottom = _ratio_figure()
        mplhep.histplot(m_ref, edges, yerr=e_ref, ax=top, histtype="step", color=_REFERENCE_COLOUR,
                        label=f"{labels[0]} (N={len(ref)})")
        mplhep.histplot(m_gen, edges, yerr=e_gen, ax=top, histtype="step", color=_GENERATED_COLOUR,
                        label=f"{labels[1]} (N={len(gen)})")
        if log_y and np.any(np.concatenate([m_ref, m_gen]) > 0):
            top.set_yscale("log")
        top.set_ylabel(ylabel)
        top.legend(loc="upper right")
        _ratio(bottom, edges, m_ref, e_ref, m_gen, e_gen)
        bottom.set_xlabel(xlabel)
        bottom.set_xlim(edges[0], edges[-1])
        return _save(figure, path)


def longitudinal_profile(reference_layer_energy_mev, generated_layer_energy_mev, layer_edges_mm,
                         path: str | os.PathLike[str], *,
                         labels: Sequence[str] = ("Reference", "Generated")) -> Path:
    """Mean energy per readout layer vs depth (``(N, n_layers)`` inputs), with a ratio panel."""
    return _profile_plot(reference_layer_energy_mev, generated_layer_energy_mev, np.asarray(layer_edges_mm),
                         path, xlabel="Depth [mm]", ylabel="Mean energy per layer [MeV]", labels=labels)


def radial_profile(reference_radial_energy_mev, generated_radial_energy_mev, radial_edges_mm,
                   path: str | os.PathLike[str], *,
                   labels: Sequence[str] = ("Reference", "Generated")) -> Path:
    """Mean energy per shower in radial bins around the shower axis (``(N, n_r)`` inputs), with ratio."""
    return _profile_plot(reference_radial_energy_mev, generated_radial_energy_mev, np.asarray(radial_edges_mm),
                         path, xlabel="Radius [mm]", ylabel="Mean energy per radial bin [MeV]", labels=labels)


def energy_bin_panels(reference: ShowerObservables, generated: ShowerObservables, layer_depth_mm,
                      path: str | os.PathLike[str], *,
                      columns: Sequence[str] = ("energy_ratio", "n_hits", "depth_cog_mm", "radius_cog_mm"),
                      edges_mev: Sequence[float] = ENERGY_DECADES_MEV, bins: int = 30,
                      labels: Sequence[str] = ("Reference", "Generated")) -> Path:
    """Grid of normalised histograms: one row per incident-energy decade, one column per observable,
    and a last column with the mean longitudinal profile of that decade.

    Raises:
        ValueError: no energy bin holds showers of both samples.
    """
    ref_bins = energy_bin_masks(reference.incident_energy_mev, edges_mev)
    gen_bins = energy_bin_masks(generated.incident_energy_mev, edges_mev)
    rows = [(energy_bin_label(lo, hi), rm, gm) for (lo, hi, rm), (_, _, gm) in zip(ref_bins, gen_bins, strict=True)
            if rm.any() and gm.any()]
    if not rows:
        raise ValueError("no incident-energy bin holds showers of both samples")
    n_cols = len(columns) + 1
    depth = np.asarray(layer_depth_mm, dtype=np.float64)
    with hep_style():
        figure = _figure((3.2 * n_cols, 2.5 * len(rows) + 0.7), layout="constrained")
        axes = np.atleast_2d(figure.subplots(len(rows), n_cols, squeeze=False))
        for i, (label, ref_mask, gen_mask) in enumerate(rows):
            for j, name in enumerate(columns):
                ax = axes[i, j]
                ref = _finite(reference.per_shower[name][ref_mask])
                gen = _finite(generated.per_shower[name][gen_mask])
                xlabel, log_x, _ = OBSERVABLE_AXES.get(name, (name, False, False))
                edges, log_x = _edges(ref, gen, bins, log_x)
                for values, colour, lab in ((ref, _REFERENCE_COLOUR, labels[0]), (gen, _GENERATED_COLOUR, labels[1])):
                    counts = np.histogram(values, edges)[0] / max(values.size, 1)
                    ax.stairs(counts, edges, color=colour, label=lab, lw=1.3)
                if log_x:
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(NullFormatter())
                if i == len(rows) - 1:
                    ax.set_xlabel(xlabel, fontsize=10)
                if j == 0:
                    ax.set_ylabel(f"{label}\nfraction", fontsize=10)
                ax.tick_params(labelsize=8)
            ax = axes[i, -1]
            for obs, mask, colour, lab in ((reference, ref_mask, _REFERENCE_COLOUR, labels[0]),
                                           (generated, gen_mask, _GENERATED_COLOUR, labels[1])):
                ax.plot(depth, obs.layer_energy_mev[mask].mean(axis=0), color=colour, lw=1.3,
                        label=f"{lab} ({int(mask.sum())})")
            if np.any(reference.layer_energy_mev[ref_mask] > 0):
                ax.set_yscale("log")
            ax.legend(fontsize=7, loc="lower center")
            ax.set_ylabel("mean E / layer [MeV]", fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel("Depth [mm]", fontsize=10)
            ax.tick_params(labelsize=8)
        axes[0, 0].legend(fontsize=8, loc="upper right")
        return _save(figure, path)


def average_shower_polar(reference_mean_mev, generated_mean_mev, binning, path: str | os.PathLike[str], *,
                         layers: Sequence[int] | None = None, threshold_mev: float = 0.0,
                         labels: Sequence[str] = ("Reference", "Generated")) -> Path:
    """The average shower of a few layers as polar (alpha, r) images, reference above generated.

    Args:
        reference_mean_mev, generated_mean_mev: ``(n_voxels,)`` mean voxel energies in (layer, alpha, r)
            order.
        binning: a :class:`~caloadapt.evaluate.calochallenge.CaloChallengeBinning`.
        layers: layers shown (default: 5 evenly spaced).
        threshold_mev: lower end of the logarithmic colour scale (at least 1e-5 of the maximum).
    """
    shape = (binning.n_layers, binning.n_alpha, binning.n_r)
    ref = np.asarray(reference_mean_mev, np.float64).reshape(shape)
    gen = np.asarray(generated_mean_mev, np.float64).reshape(shape)
    if layers is None:
        layers = np.unique(np.linspace(0, binning.n_layers - 1, min(5, binning.n_layers)).round().astype(int))
    layers = [int(k) for k in layers]
    selected = np.concatenate([ref[layers].ravel(), gen[layers].ravel()])
    selected = selected[np.isfinite(selected)]
    vmax = float(selected.max()) if selected.size and selected.max() > 0 else 1.0
    vmin = max(float(threshold_mev), vmax * 1e-5)
    norm = LogNorm(vmin=vmin, vmax=vmax)
    theta = np.linspace(-np.pi, np.pi, binning.n_alpha + 1)
    radius = np.asarray(binning.r_edges_mm)
    with hep_style():
        figure = _figure((2.6 * len(layers) + 1.2, 5.6), layout="constrained")
        axes = figure.subplots(2, len(layers), subplot_kw={"projection": "polar"}, squeeze=False)
        mesh = None
        for i, (data, label) in enumerate(((ref, labels[0]), (gen, labels[1]))):
            for j, layer in enumerate(layers):
                ax = axes[i, j]
                image = np.ma.masked_less(data[layer].T, vmin)
                mesh = ax.pcolormesh(theta, radius, image, norm=norm, cmap="viridis", shading="flat")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                ax.set_title(f"{label}, layer {layer}", fontsize=9)
        figure.colorbar(mesh, ax=axes, label="Mean voxel energy [MeV]", shrink=0.85)
        return _save(figure, path)


def event_display(reference_voxels_mev, reference_incident_mev, generated_voxels_mev, generated_incident_mev,
                  cell_centres_mm, path: str | os.PathLike[str], *,
                  labels: Sequence[str] = ("Reference", "Generated"),
                  directions: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """3D display of a few showers: hit cells at (depth, x, y), coloured and sized by energy.

    Args:
        reference_voxels_mev, generated_voxels_mev: ``(k, n_cells)`` voxelised showers.
        reference_incident_mev, generated_incident_mev: ``(k,)`` incident energies.
        cell_centres_mm: ``(n_cells, 3)`` cell centres (x, y, depth).
        directions: ``(k, 3)`` unit directions (x, y, depth) of the reference's and the generated
            showers: the particle's axis is drawn through the impact point, and an inclined
            shower's angle to the layer normal is given in its title.

    Raises:
        ValueError: no shower to show.
    """
    ref = np.asarray(reference_voxels_mev)
    gen = np.asarray(generated_voxels_mev)
    n_cols = max(len(ref), len(gen))
    if n_cols == 0:
        raise ValueError("no shower to display")
    centres = np.asarray(cell_centres_mm, np.float64)
    hits = np.concatenate([ref[ref > 0], gen[gen > 0]]) if (ref.size or gen.size) else np.zeros(0)
    if hits.size == 0:
        raise ValueError("the displayed showers have no hit cells")
    log_e = np.log10(hits)
    vmin, vmax = float(log_e.min()), float(log_e.max())
    shown = np.concatenate([np.flatnonzero(row > 0) for row in (*ref, *gen)])
    extent = float(np.quantile(np.abs(centres[shown, :2]), 0.995)) if shown.size else 1.0
    extent = max(extent, 1.0)
    with hep_style():
        figure = _figure((3.6 * n_cols + 1.0, 7.0))
        scatter = None
        depth_max = float(centres[:, 2].max())
        for i, (voxels, energies, label) in enumerate(((ref, reference_incident_mev, labels[0]),
                                                       (gen, generated_incident_mev, labels[1]))):
            for j in range(n_cols):
                ax = figure.add_subplot(2, n_cols, i * n_cols + j + 1, projection="3d")
                if j < len(voxels):
                    e = np.asarray(voxels[j], np.float64)
                    cells = np.flatnonzero(e > 0)
                    size = 1.0 + 40.0 * np.sqrt(e[cells] / e[cells].max()) if cells.size else 1.0
                    scatter = ax.scatter(centres[cells, 2], centres[cells, 0], centres[cells, 1],
                                         c=np.log10(e[cells]) if cells.size else [], s=size, cmap="inferno_r",
                                         vmin=vmin, vmax=vmax, alpha=0.8, linewidths=0)
                    title = f"{label}: {float(energies[j]) / 1e3:.1f} GeV, {cells.size} hits"
                    if directions is not None and j < len(directions[i]):
                        d = np.asarray(directions[i][j], np.float64)
                        reach = depth_max / d[2]  # along the axis to the back of the readout
                        ax.plot([0.0, reach * d[2]], [0.0, reach * d[0]], [0.0, reach * d[1]], color="tab:blue",
                                linewidth=1.0, linestyle="--")
                        inclination = float(np.degrees(np.arccos(np.clip(d[2], -1.0, 1.0))))
                        if inclination > 0.05:
                            title += f", {inclination:.0f} deg"
                    ax.set_title(title, fontsize=9)
                ax.set_xlabel("Depth [mm]", fontsize=8, labelpad=-2)
                ax.set_ylabel("x [mm]", fontsize=8, labelpad=-2)
                ax.set_zlabel("y [mm]", fontsize=8, labelpad=-2)
                ax.set_xlim(centres[:, 2].min(), centres[:, 2].max())
                ax.set_ylim(-extent, extent)
                ax.set_zlim(-extent, extent)
                ax.tick_params(labelsize=6, pad=0)
                ax.view_init(elev=18, azim=-60)
        figure.subplots_adjust(left=0.0, right=0.9, top=0.95, bottom=0.03, wspace=0.05, hspace=0.12)
        if scatter is not None:
            cax = figure.add_axes((0.92, 0.2, 0.015, 0.6))
            figure.colorbar(scatter, cax=cax, label=r"$\log_{10}$(cell energy / MeV)")
        return _save(figure, path)


def _grouped_bars(ax, names: Sequence[str], series: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(names))
    positive = []
    for k, (label, (values, errors)) in enumerate(series.items()):
        values = np.asarray(values, np.float64)
        positive.append(values[np.isfinite(values) & (values > 0)])
        ax.bar(x + (k - (n - 1) / 2) * width, np.nan_to_num(values, nan=0.0), width, label=label,
               yerr=None if errors is None else np.nan_to_num(np.asarray(errors, np.float64), nan=0.0),
               capsize=2, error_kw={"elinewidth": 0.8})
    positive = np.concatenate(positive) if positive else np.zeros(0)
    if positive.size and positive.max() / positive.min() > 20:
        ax.set_yscale("log")
        ax.set_ylim(bottom=positive.min() / 3)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=9)
    ax.legend(fontsize=8)


def score_summary(table: Mapping, by_energy: Mapping[str, Mapping], path: str | os.PathLike[str]) -> Path:
    """Bar chart of the normalised W1 per score row (bootstrap std as error), all showers and per
    energy decade; the legend gives each geometric mean. ``table``: ``ScoreTable.as_dict()``."""
    rows = list(table["scores"])

    def series(t: Mapping) -> tuple[np.ndarray, np.ndarray]:
        values = np.array([_nan(t["scores"][r]["wasserstein"]) for r in rows])
        errors = np.array([_nan(t["scores"][r]["wasserstein_std"]) for r in rows])
        return values, errors

    data = {f"all (GM {_fmt(table['geometric_mean'])})": series(table)}
    for label, t in by_energy.items():
        data[f"{label} (GM {_fmt(t['geometric_mean'])})"] = series(t)
    with hep_style():
        figure = _figure((8.0, 5.0), layout="constrained")
        ax = figure.add_subplot()
        _grouped_bars(ax, rows, data)
        ax.set_ylabel(r"$W_1 / \sigma_\mathrm{ref}$")
        return _save(figure, path)


def separation_power_bars(summary: Mapping[str, float], by_energy: Mapping[str, Mapping[str, float]],
                          path: str | os.PathLike[str]) -> Path:
    """Bar chart of the CaloChallenge separation power per feature family, all and per energy decade."""
    families = list(summary)
    data = {"all": (np.array([_nan(summary[f]) for f in families]), None)}
    for label, values in by_energy.items():
        data[label] = (np.array([_nan(values.get(f)) for f in families]), None)
    with hep_style():
        figure = _figure((8.0, 5.0), layout="constrained")
        ax = figure.add_subplot()
        _grouped_bars(ax, families, data)
        ax.set_ylabel("Separation power")
        return _save(figure, path)


def loss_curves(history: Mapping[str, Sequence[float]], path: str | os.PathLike[str]) -> Path:
    """Training and validation losses against the optimiser step, one panel per loss term.

    ``history``: the columns of a run's ``metrics.csv`` (``step``, ``train_<term>``, ``val_<term>``
    and, for a joint training, ``val_<term>_<detector>``); the terms are those with a ``train_`` column.
    """
    step = np.asarray(history["step"], np.float64)
    terms = [name[len("train_"):] for name in history if name.startswith("train_")]
    with hep_style():
        figure = _figure((5.0 * max(len(terms), 1), 4.2), layout="constrained")
        for i, term in enumerate(terms):
            ax = figure.add_subplot(1, len(terms), i + 1)
            for name in (f"train_{term}", *[n for n in history if n == f"val_{term}" or
                                            n.startswith(f"val_{term}_")]):
                values = np.asarray(history[name], np.float64)
                shown = np.isfinite(values)
                ax.plot(step[shown], values[shown], marker="o", ms=2.5, label=name.replace("_", " ", 1))
            ax.set_xlabel("Optimiser step")
            ax.set_ylabel(f"{term} loss")
            ax.legend()
        return _save(figure, path)


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def _fmt(value) -> str:
    value = _nan(value)
    return "n/a" if not np.isfinite(value) else f"{value:.3g}"
