"""The CaloChallenge high-level features, histograms and separation powers (Datasets 2 and 3).

A faithful re-implementation of the definitions of the official evaluation, CaloChallenge/homepage
``code/HighLevelFeatures.py``, ``code/XMLHandler.py``, ``code/evaluate.py`` and
``code/evaluate_plotting_helper.py`` at commit 9b41df7 (docs/scoring.md §2.1-§2.5), for
geometries whose layers are all identical cylindrical (r, alpha) meshes:

- voxels flattened as (layer, alpha, r), the radial index fastest;
- alpha bin centres at the midpoints of ``linspace(-pi, pi, n_alpha + 1)``, i.e.
  ``-pi + (j + 1/2) 2 pi / n_alpha``; radial bin centres at the midpoints of the edges;
  ``eta = r_mid cos(alpha)``, ``phi = r_mid sin(alpha)`` in mm;
- every voxel below 0.5e-3/0.033 MeV (15.15 keV, 0.5 keV in silicon over the sampling fraction) is
  set to 0 before anything else, in both samples;
- centres of energy ``sum(x E) / (sum(E) + 1e-16)``; widths ``sqrt(clip(<x^2> - <x>^2, 0))``;
  sparsity = fraction of voxels of a layer with E = 0 after the threshold;
- the arithmetic follows the official code, including its dtypes (voxel sums in the dtype of the
  input, products with the float64 coordinates in float64), so the numbers agree with it to the
  last bits.

Not covered: Dataset 1 (layers with different binnings, discrete energies) and the plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from ..errors import InputError
from .distances import density_of_counts, separation_power
from .energy_bins import ENERGY_DECADES_MEV, energy_bin_label, energy_bin_masks
from .observables import CellLayout

__all__ = [
    "THRESHOLD_MEV",
    "LAYER_THICKNESS_MM",
    "CaloChallengeBinning",
    "DATASET_2",
    "DATASET_3",
    "DATASET_BINNINGS",
    "apply_threshold",
    "cell_layout",
    "HighLevelFeatures",
    "high_level_features",
    "high_level_vector",
    "high_level_feature_names",
    "low_level_vector",
    "HistogramComparison",
    "voxel_energy_counts",
    "separation_powers",
    "calochallenge_histograms",
    "separation_powers_by_energy",
    "separation_power_summary",
    "average_shower_by_energy",
]

#: readout threshold per voxel in MeV for Datasets 2 and 3: 0.5 keV in silicon / sampling fraction
#: 0.033 (``args.min_energy`` of evaluate.py, written as the same expression)
THRESHOLD_MEV: float = 0.5e-3 / 0.033

#: depth of one readout layer: two W (1.4 mm) + Si (0.3 mm) pairs of the Par04 SiW calorimeter
#: (docs/scoring.md §2.2)
LAYER_THICKNESS_MM: float = 3.4

_GUARD = 1e-16  # denominators of the centres of energy and widths (HighLevelFeatures.py)
_LOG_GUARD = 1e-8  # inside log10 of energies in the classifier/FPD vector (evaluate.py)


@dataclass(frozen=True, eq=False)
class CaloChallengeBinning:
    """A cylindrical readout with ``n_layers`` identical layers of ``n_alpha`` x ``n_r`` voxels.

    Attributes:
        r_edges_mm: radial bin edges in mm, increasing, starting at the axis.
        n_alpha: number of equal angular bins covering 2 pi.
        n_layers: number of readout layers.
    """

    r_edges_mm: tuple[float, ...]
    n_alpha: int
    n_layers: int

    def __post_init__(self) -> None:
        edges = tuple(float(r) for r in self.r_edges_mm)
        if len(edges) < 2 or any(b <= a for a, b in zip(edges[:-1], edges[1:], strict=True)) \
                or edges[0] < 0:
            raise InputError("radial edges must be at least two increasing non-negative values")
        if self.n_alpha < 1 or self.n_layers < 1:
            raise InputError("a CaloChallenge binning needs at least one angular bin and one layer")
        object.__setattr__(self, "r_edges_mm", edges)

    @property
    def n_r(self) -> int:
        return len(self.r_edges_mm) - 1

    @property
    def voxels_per_layer(self) -> int:
        return self.n_alpha * self.n_r

    @property
    def n_voxels(self) -> int:
        return self.n_layers * self.voxels_per_layer

    @property
    def alpha_centres(self) -> np.ndarray:
        """``(n_alpha,)`` angular bin centres in rad, ``-pi + (j + 1/2) 2 pi / n_alpha``."""
        edges = np.linspace(-math.pi, math.pi, self.n_alpha + 1)
        return np.array([edges[i] + float(edges[i + 1] - edges[i]) / 2 for i in range(self.n_alpha)])

    @property
    def r_mid_mm(self) -> np.ndarray:
        """``(n_r,)`` radial bin centres in mm (midpoints of the edges)."""
        e = self.r_edges_mm
        return np.array([e[i] + float(e[i + 1] - e[i]) / 2 for i in range(self.n_r)])

    @property
    def eta_mm(self) -> np.ndarray:
        """``(voxels_per_layer,)`` x = r_mid cos(alpha) of the voxels of one layer, (alpha, r) order."""
        r = np.tile(self.r_mid_mm, self.n_alpha)
        return r * np.cos(np.repeat(self.alpha_centres, self.n_r))

    @property
    def phi_mm(self) -> np.ndarray:
        """``(voxels_per_layer,)`` y = r_mid sin(alpha) of the voxels of one layer, (alpha, r) order."""
        r = np.tile(self.r_mid_mm, self.n_alpha)
        return r * np.sin(np.repeat(self.alpha_centres, self.n_r))

    @property
    def r_centre_mm(self) -> np.ndarray:
        """``(voxels_per_layer,)`` radial coordinate of the voxels of one layer for CE_r and width_r.

        ``(r_i + r_{i+1}) * 0.5``, as ``radial_center_mult`` of HighLevelFeatures.py (the same
        midpoints as :attr:`r_mid_mm`, written as the official code writes them).
        """
        e = self.r_edges_mm
        return np.array(self.n_alpha * [(e[i] + e[i + 1]) * 0.5 for i in range(self.n_r)])


#: Dataset 2: 45 layers x 16 angular x 9 radial bins of 4.65 mm (binning_dataset_2.xml)
DATASET_2 = CaloChallengeBinning(
    (0, 4.65, 9.3, 13.95, 18.6, 23.25, 27.9, 32.55, 37.2, 41.85), n_alpha=16, n_layers=45)
#: Dataset 3: 45 layers x 50 angular x 18 radial bins of 2.325 mm (binning_dataset_3.xml)
DATASET_3 = CaloChallengeBinning(
    (0, 2.325, 4.65, 6.975, 9.3, 11.625, 13.95, 16.275, 18.6, 20.925, 23.25, 25.575, 27.9, 30.225,
     32.55, 34.875, 37.2, 39.525, 41.85), n_alpha=50, n_layers=45)
#: official dataset name -> binning
DATASET_BINNINGS: dict[str, CaloChallengeBinning] = {"2": DATASET_2, "3": DATASET_3}


def apply_threshold(voxels_mev: np.ndarray, threshold_mev: float = THRESHOLD_MEV) -> np.ndarray:
    """Set every voxel below ``threshold_mev`` (negative values included) to 0, keeping the dtype."""
    voxels = np.asarray(voxels_mev)
    return np.where(voxels < threshold_mev, np.zeros_like(voxels), voxels)


def cell_layout(binning: CaloChallengeBinning, *, layer_thickness_mm: float = LAYER_THICKNESS_MM,
                threshold_mev: float = THRESHOLD_MEV) -> CellLayout:
    """The :class:`~caloadapt.evaluate.observables.CellLayout` of a CaloChallenge binning.

    Cell centres: x = eta, y = phi of the official features; depth of layer k at
    ``(k + 1/2) * layer_thickness_mm`` from the front face.
    """
    n = binning.voxels_per_layer
    layer = np.repeat(np.arange(binning.n_layers), n)
    centres = np.column_stack([np.tile(binning.eta_mm, binning.n_layers),
                               np.tile(binning.phi_mm, binning.n_layers),
                               (layer + 0.5) * layer_thickness_mm])
    return CellLayout(centres, layer, binning.n_layers, threshold_mev)


def _voxel_shape(voxels, binning: CaloChallengeBinning) -> tuple[int, int]:
    shape = getattr(voxels, "shape", None)
    if shape is None:
        shape = np.asarray(voxels).shape
    if len(shape) != 2 or shape[0] == 0:
        raise InputError(f"voxels must have shape (N, n_voxels) with N > 0, got {tuple(shape)}")
    if shape[1] != binning.n_voxels:
        raise InputError(f"showers have {shape[1]} voxels, the binning has {binning.n_voxels} "
                         f"({binning.n_layers} layers x {binning.n_alpha} alpha x {binning.n_r} r)")
    return int(shape[0]), int(shape[1])


def _read(voxels, start: int, stop: int) -> np.ndarray:
    chunk = np.asarray(voxels[start:stop])
    if not np.issubdtype(chunk.dtype, np.floating):
        chunk = chunk.astype(np.float64)
    return chunk


@dataclass(frozen=True, eq=False)
class HighLevelFeatures:
    """The official high-level features of N showers (after the threshold); all energies in MeV.

    Attributes:
        e_tot: ``(N,)`` total energy.
        e_layer: ``(N, n_layers)`` energy per layer.
        ce_eta, ce_phi: ``(N, n_layers)`` centres of energy in x (eta) and y (phi), mm.
        width_eta, width_phi: ``(N, n_layers)`` energy-weighted standard deviations of x and y, mm.
        ce_r, width_r: ``(N, n_layers)`` centre of energy and width in r, mm.
        sparsity: ``(N, n_layers)`` fraction of empty voxels per layer.
        voxel_max_mev: largest voxel energy of the sample, a numpy scalar of the voxel dtype (sets
            the voxel-histogram range when the sample is the reference).
    """

    e_tot: np.ndarray
    e_layer: np.ndarray
    ce_eta: np.ndarray
    ce_phi: np.ndarray
    width_eta: np.ndarray
    width_phi: np.ndarray
    ce_r: np.ndarray
    width_r: np.ndarray
    sparsity: np.ndarray
    voxel_max_mev: np.floating

    @property
    def n_showers(self) -> int:
        return int(self.e_tot.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.e_layer.shape[1])

    def select(self, mask: np.ndarray) -> HighLevelFeatures:
        """The features of the showers where ``mask`` is true (``voxel_max_mev`` is kept)."""
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        if mask.shape != (self.n_showers,):
            raise InputError(f"mask has {mask.size} entries for {self.n_showers} showers")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return HighLevelFeatures(**{k: (v[mask] if isinstance(v, np.ndarray) else v)
                                    for k, v in values.items()})


def _centre_and_width(coordinate: np.ndarray, energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energy-weighted mean and standard deviation over the last axis (official expressions)."""
    total = energy.sum(axis=-1) + _GUARD
    centre = (coordinate * energy).sum(axis=-1) / total
    second = (coordinate * coordinate * energy).sum(axis=-1) / total
    return centre, np.sqrt((second - centre ** 2).clip(min=0.0))


def high_level_features(voxels_mev, binning: CaloChallengeBinning, *,
                        threshold_mev: float = THRESHOLD_MEV, chunk_size: int = 1000) -> HighLevelFeatures:
    """Compute the official high-level features of CaloChallenge showers.

    Args:
        voxels_mev: ``(N, n_voxels)`` voxel energies in MeV in (layer, alpha, r) order; an ndarray or
            any array-like with row slicing (e.g. an h5py dataset), read ``chunk_size`` rows at a time.
        binning: the geometry (:data:`DATASET_2`, :data:`DATASET_3` or another identical-layer mesh).
        threshold_mev: readout threshold applied first (default 15.15 keV; 0 disables it).
        chunk_size: showers per chunk.

    Raises:
        InputError: wrong number of voxels, no showers.
    """
    n, _ = _voxel_shape(voxels_mev, binning)
    if chunk_size < 1:
        raise InputError(f"chunk_size must be positive, got {chunk_size}")
    eta, phi, r = binning.eta_mm, binning.phi_mm, binning.r_centre_mm
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (
        "e_tot", "e_layer", "ce_eta", "ce_phi", "width_eta", "width_phi", "ce_r", "width_r", "sparsity")}
    voxel_max = None
    for start in range(0, n, chunk_size):
        data = apply_threshold(_read(voxels_mev, start, start + chunk_size), threshold_mev)
        layers = data.reshape(len(data), binning.n_layers, binning.voxels_per_layer)
        parts["e_tot"].append(data.sum(axis=-1))
        parts["e_layer"].append(layers.sum(axis=-1))
        parts["sparsity"].append(1.0 - (layers > 0).mean(axis=-1))
        for name, coordinate in (("eta", eta), ("phi", phi), ("r", r)):
            centre, width = _centre_and_width(coordinate, layers)
            parts[f"ce_{name}"].append(centre)
            parts[f"width_{name}"].append(width)
        chunk_max = data.max()
        voxel_max = chunk_max if voxel_max is None else max(voxel_max, chunk_max)
    arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    return HighLevelFeatures(**arrays, voxel_max_mev=voxel_max)


def _incident_column(incident_energy_mev: np.ndarray, n: int) -> np.ndarray:
    energy = np.asarray(incident_energy_mev)
    if not np.issubdtype(energy.dtype, np.floating):
        energy = energy.astype(np.float64)
    energy = energy.reshape(-1, 1)
    if energy.shape[0] != n:
        raise InputError(f"{energy.shape[0]} incident energies for {n} showers")
    if not np.all(np.isfinite(energy)) or np.any(energy <= 0):
        raise InputError("incident energies must be finite and positive")
    return energy


def high_level_vector(features: HighLevelFeatures, incident_energy_mev: np.ndarray) -> np.ndarray:
    """The ``2 + 8 n_layers`` high-level input of the classifier and of FPD/KPD (362 for DS2/3).

    In the order and scaling of ``prepare_high_data_for_classifier`` (docs/scoring.md §2.5):
    log10 E_inc; log10(E_layer + 1e-8); CE_eta/100; CE_phi/100; width_eta/100; width_phi/100;
    log10(E_tot + 1e-8); sparsity; CE_r/100; width_r/100 (one value per layer for the per-layer
    groups). See :func:`high_level_feature_names`.
    """
    e_inc = _incident_column(incident_energy_mev, features.n_showers)
    return np.concatenate([
        np.log10(e_inc), np.log10(features.e_layer + _LOG_GUARD),
        features.ce_eta / 1e2, features.ce_phi / 1e2, features.width_eta / 1e2, features.width_phi / 1e2,
        np.log10(features.e_tot + _LOG_GUARD).reshape(-1, 1), features.sparsity,
        features.ce_r / 1e2, features.width_r / 1e2], axis=1)


def high_level_feature_names(n_layers: int) -> list[str]:
    """Names of the columns of :func:`high_level_vector`."""
    names = ["log10_E_inc"] + [f"log10_E_layer_{k}" for k in range(n_layers)]
    for group in ("CE_eta", "CE_phi", "width_eta", "width_phi"):
        names += [f"{group}_{k}/100" for k in range(n_layers)]
    names.append("log10_E_tot")
    names += [f"sparsity_{k}" for k in range(n_layers)]
    for group in ("CE_r", "width_r"):
        names += [f"{group}_{k}/100" for k in range(n_layers)]
    return names


def low_level_vector(voxels_mev: np.ndarray, incident_energy_mev: np.ndarray, *,
                     threshold_mev: float = THRESHOLD_MEV, binning: CaloChallengeBinning | None = None,
                     layer_normalised: bool = False, dtype: np.dtype | type | None = None) -> np.ndarray:
    """The low-level input of the voxel classifier (``cls-low``, or ``cls-low-normed``).

    ``cls-low``: ``[log10 E_inc, voxel_i / E_inc ...]``, 1 + n_voxels columns, after the threshold.
    ``cls-low-normed`` (``layer_normalised=True``, needs ``binning``):
    ``[log10 E_inc, voxel_i / (E_layer(i) + 1e-16) ..., log10(E_layer + 1e-8) ...]``. The official
    normed mode divides the *un-thresholded* voxels by the thresholded layer energies; here the
    threshold is applied to both (a deliberate fix).

    Args:
        voxels_mev: ``(N, n_voxels)`` voxel energies in MeV.
        incident_energy_mev: ``(N,)`` or ``(N, 1)`` in MeV.
        threshold_mev: readout threshold applied first.
        binning: required for ``layer_normalised`` (and then checks the number of voxels).
        layer_normalised: build the ``cls-low-normed`` input instead.
        dtype: cast the result (default: numpy's promotion, float64 as in the official code).
    """
    voxels = np.asarray(voxels_mev)
    if voxels.ndim != 2 or voxels.shape[0] == 0:
        raise InputError(f"voxels must have shape (N, n_voxels) with N > 0, got {voxels.shape}")
    e_inc = _incident_column(incident_energy_mev, voxels.shape[0])
    voxels = apply_threshold(voxels, threshold_mev)
    if not layer_normalised:
        result = np.concatenate([np.log10(e_inc), voxels / e_inc], axis=1)
    else:
        if binning is None:
            raise InputError("the layer-normalised low-level input needs the binning")
        _voxel_shape(voxels, binning)
        layers = voxels.reshape(len(voxels), binning.n_layers, binning.voxels_per_layer)
        e_layer = layers.sum(axis=-1)
        normed = (layers / (e_layer[:, :, None] + _GUARD)).reshape(len(voxels), -1)
        result = np.concatenate([np.log10(e_inc), normed, np.log10(e_layer + _LOG_GUARD)], axis=1)
    return result if dtype is None else result.astype(dtype)


@dataclass(frozen=True, eq=False)
class HistogramComparison:
    """One histogram of the official evaluation and its separation power.

    Attributes:
        label: the official label, as written to ``histogram_chi2_<ds>.txt`` (e.g. ``'E layer 3'``).
        family: the feature family, a key of :func:`separation_power_summary`'s result.
        layer: layer index for per-layer features, else None.
        edges: bin edges (None when the official binning is undefined, e.g. an empty reference layer).
        reference_density, generated_density: density histograms (``density=True``).
        separation_power: 1/2 sum (h - g)^2 / (h + g) on the unit-sum histograms (NaN if undefined).
    """

    label: str
    family: str
    layer: int | None
    edges: np.ndarray | None
    reference_density: np.ndarray | None
    generated_density: np.ndarray | None
    separation_power: float


#: per-layer family -> (feature attribute, official label prefix, bin edges for DS2/3)
_LAYER_FAMILIES: dict[str, tuple[str, str, np.ndarray]] = {
    "sep EC eta": ("ce_eta", "EC Eta", np.linspace(-30.0, 30.0, 101)),
    "sep EC phi": ("ce_phi", "EC Phi", np.linspace(-30.0, 30.0, 101)),
    "sep EC eta std": ("width_eta", "Width Eta", np.linspace(0.0, 30.0, 101)),
    "sep EC phi std": ("width_phi", "Width Phi", np.linspace(0.0, 30.0, 101)),
    "sep EC r": ("ce_r", "EC r", np.linspace(0.0, 42.0, 101)),
    "sep EC r std": ("width_r", "Width r", np.linspace(0.0, 20.0, 101)),
    "sep sparsity": ("sparsity", "Sparsity", np.linspace(0.0, 1.0, 21)),
}
_ETOT_EDGES = np.linspace(0.5, 1.5, 101)


def log_edges(low: float, high: float | np.floating, n_edges: int) -> np.ndarray | None:
    """``np.logspace(log10(low), log10(high), n_edges)``; None when the range is empty.

    ``high`` keeps the dtype of the data it is the maximum of, as in the official code (a float32
    maximum gives a float32 logarithm, hence the same rounded last edge).
    """
    if not (high > low > 0):
        return None
    return np.logspace(np.log10(low), np.log10(high), n_edges)


def _compare(label: str, family: str, layer: int | None, reference: np.ndarray, generated: np.ndarray,
             edges: np.ndarray | None) -> HistogramComparison:
    if edges is None:
        return HistogramComparison(label, family, layer, None, None, None, float("nan"))
    ref_counts, _ = np.histogram(reference, edges)
    gen_counts, _ = np.histogram(generated, edges)
    return _from_counts(label, family, layer, ref_counts, gen_counts, edges)


def _from_counts(label: str, family: str, layer: int | None, ref_counts: np.ndarray,
                 gen_counts: np.ndarray, edges: np.ndarray) -> HistogramComparison:
    h, g = density_of_counts(ref_counts, edges), density_of_counts(gen_counts, edges)
    return HistogramComparison(label, family, layer, edges, h, g, separation_power(h, g, edges))


def voxel_energy_counts(voxels_mev, edges: np.ndarray, *, threshold_mev: float = THRESHOLD_MEV,
                        mask: np.ndarray | None = None, chunk_size: int = 1000) -> np.ndarray:
    """Counts of all voxel energies (zeros included, so they fall below the range) in ``edges``.

    Read in chunks; ``mask`` (``(N,)`` bool) selects showers. Equivalent to
    ``np.histogram(apply_threshold(voxels)[mask].flatten(), edges)[0]``.
    """
    shape = getattr(voxels_mev, "shape", None) or np.asarray(voxels_mev).shape
    counts = np.zeros(len(edges) - 1, dtype=np.int64)
    for start in range(0, shape[0], chunk_size):
        data = apply_threshold(_read(voxels_mev, start, start + chunk_size), threshold_mev)
        if mask is not None:
            data = data[np.asarray(mask[start:start + chunk_size], dtype=bool)]
        counts += np.histogram(data.reshape(-1), edges)[0]
    return counts


def separation_powers(reference: HighLevelFeatures, reference_incident_mev: np.ndarray,
                      generated: HighLevelFeatures, generated_incident_mev: np.ndarray, *,
                      threshold_mev: float = THRESHOLD_MEV,
                      voxel_counts: tuple[np.ndarray, np.ndarray] | None = None,
                      voxel_edges: np.ndarray | None = None) -> dict[str, HistogramComparison]:
    """All official histograms of two samples and their separation powers.

    Binnings (docs/scoring.md §2.4, evaluate_plotting_helper.py), all with ``density=True``
    and entries outside the range dropped:

    - E_tot/E_inc: 100 bins on [0.5, 1.5];
    - E_layer: 40 log-spaced edges from the threshold to the reference maximum of the layer
      (an all-empty reference layer has no binning: NaN);
    - CE_eta, CE_phi: 100 bins on [-30, 30] mm; width_eta, width_phi: 100 bins on [0, 30] mm;
    - CE_r: 100 bins on [0, 42] mm; width_r: 100 bins on [0, 20] mm; sparsity: 20 bins on [0, 1];
    - voxel energy (only with ``voxel_counts``): 50 log-spaced edges from the threshold to the
      reference voxel maximum, see :func:`calochallenge_histograms`.

    The official ``hist`` mode at the cited commit writes E_tot/E_inc, E_layer, CE_eta/phi,
    widths and the voxel energy; the CE_r, width_r and sparsity histograms are those of its helper
    functions used for the published tables.

    Returns:
        official label -> :class:`HistogramComparison`, in the order of the official output file
        followed by the r and sparsity histograms.
    """
    if reference.n_layers != generated.n_layers:
        raise InputError(f"reference has {reference.n_layers} layers, generated {generated.n_layers}")
    ref_inc = _incident_column(reference_incident_mev, reference.n_showers)
    gen_inc = _incident_column(generated_incident_mev, generated.n_showers)
    out: dict[str, HistogramComparison] = {}

    def add(comparison: HistogramComparison) -> None:
        out[comparison.label] = comparison

    add(_compare("Etot / Einc", "sep E total", None, reference.e_tot / ref_inc.squeeze(),
                 generated.e_tot / gen_inc.squeeze(), _ETOT_EDGES))
    for k in range(reference.n_layers):
        edges = log_edges(threshold_mev, reference.e_layer[:, k].max(), 40)
        add(_compare(f"E layer {k}", "sep E layer", k, reference.e_layer[:, k], generated.e_layer[:, k],
                     edges))
    order = ("sep EC eta", "sep EC phi", "sep EC eta std", "sep EC phi std")
    for family in order:
        attribute, prefix, edges = _LAYER_FAMILIES[family]
        for k in range(reference.n_layers):
            add(_compare(f"{prefix} layer {k}", family, k, getattr(reference, attribute)[:, k],
                         getattr(generated, attribute)[:, k], edges))
    if voxel_counts is not None:
        if voxel_edges is None:
            raise InputError("voxel counts need their bin edges")
        add(_from_counts("Voxel distribution", "sep cell", None, voxel_counts[0], voxel_counts[1],
                         voxel_edges))
    for family in ("sep sparsity", "sep EC r", "sep EC r std"):
        attribute, prefix, edges = _LAYER_FAMILIES[family]
        for k in range(reference.n_layers):
            add(_compare(f"{prefix} layer {k}", family, k, getattr(reference, attribute)[:, k],
                         getattr(generated, attribute)[:, k], edges))
    return out


def calochallenge_histograms(reference_voxels_mev, reference_incident_mev: np.ndarray,
                             generated_voxels_mev, generated_incident_mev: np.ndarray,
                             binning: CaloChallengeBinning, *, threshold_mev: float = THRESHOLD_MEV,
                             chunk_size: int = 1000,
                             reference_features: HighLevelFeatures | None = None,
                             generated_features: HighLevelFeatures | None = None,
                             ) -> dict[str, HistogramComparison]:
    """Features, histograms and separation powers of two voxel samples, voxel energy included.

    Computes the features (unless given), then histograms every voxel energy of both samples on
    50 log-spaced edges from ``threshold_mev`` to the reference voxel maximum, in chunks (two passes
    over the reference voxels when its features are not given). Equivalent to the official ``hist``
    mode plus the r and sparsity histograms.
    """
    _voxel_shape(reference_voxels_mev, binning)
    _voxel_shape(generated_voxels_mev, binning)
    if reference_features is None:
        reference_features = high_level_features(reference_voxels_mev, binning,
                                                 threshold_mev=threshold_mev, chunk_size=chunk_size)
    if generated_features is None:
        generated_features = high_level_features(generated_voxels_mev, binning,
                                                 threshold_mev=threshold_mev, chunk_size=chunk_size)
    edges = log_edges(threshold_mev, reference_features.voxel_max_mev, 50)
    counts = None
    if edges is not None:
        counts = (voxel_energy_counts(reference_voxels_mev, edges, threshold_mev=threshold_mev,
                                      chunk_size=chunk_size),
                  voxel_energy_counts(generated_voxels_mev, edges, threshold_mev=threshold_mev,
                                      chunk_size=chunk_size))
    result = separation_powers(reference_features, reference_incident_mev, generated_features,
                               generated_incident_mev, threshold_mev=threshold_mev,
                               voxel_counts=counts, voxel_edges=edges)
    if counts is None:
        result["Voxel distribution"] = HistogramComparison("Voxel distribution", "sep cell", None, None,
                                                           None, None, float("nan"))
    return result


def separation_powers_by_energy(reference_voxels_mev, reference_incident_mev: np.ndarray,
                                generated_voxels_mev, generated_incident_mev: np.ndarray,
                                binning: CaloChallengeBinning, *, threshold_mev: float = THRESHOLD_MEV,
                                edges_mev: Sequence[float] = ENERGY_DECADES_MEV, closed_last: bool = True,
                                chunk_size: int = 1000,
                                reference_features: HighLevelFeatures | None = None,
                                generated_features: HighLevelFeatures | None = None,
                                ) -> dict[str, dict[str, HistogramComparison]]:
    """:func:`calochallenge_histograms` separately in each incident-energy decade.

    The official evaluation bins only its average showers in energy (``avg-E``); here every
    histogram is also made per bin, with the data-dependent ranges (E_layer, voxel energy) taken
    from the reference showers of that bin. Bins without showers in either sample are left out.

    Returns:
        energy-bin label (e.g. ``'1-10 GeV'``) -> label -> :class:`HistogramComparison`.
    """
    n_ref, _ = _voxel_shape(reference_voxels_mev, binning)
    n_gen, _ = _voxel_shape(generated_voxels_mev, binning)
    if reference_features is None:
        reference_features = high_level_features(reference_voxels_mev, binning,
                                                 threshold_mev=threshold_mev, chunk_size=chunk_size)
    if generated_features is None:
        generated_features = high_level_features(generated_voxels_mev, binning,
                                                 threshold_mev=threshold_mev, chunk_size=chunk_size)
    ref_inc = _incident_column(reference_incident_mev, n_ref)
    gen_inc = _incident_column(generated_incident_mev, n_gen)
    ref_bins = energy_bin_masks(ref_inc, edges_mev, closed_last=closed_last)
    gen_bins = energy_bin_masks(gen_inc, edges_mev, closed_last=closed_last)
    result = {}
    for (low, high, ref_mask), (_, _, gen_mask) in zip(ref_bins, gen_bins, strict=True):
        if not ref_mask.any() or not gen_mask.any():
            continue
        voxel_max = None
        for start in range(0, n_ref, chunk_size):
            chunk_mask = ref_mask[start:start + chunk_size]
            if chunk_mask.any():
                data = apply_threshold(_read(reference_voxels_mev, start, start + chunk_size), threshold_mev)
                chunk_max = data[chunk_mask].max()
                voxel_max = chunk_max if voxel_max is None else max(voxel_max, chunk_max)
        edges = log_edges(threshold_mev, voxel_max, 50)
        counts = None
        if edges is not None:
            counts = (voxel_energy_counts(reference_voxels_mev, edges, threshold_mev=threshold_mev,
                                          mask=ref_mask, chunk_size=chunk_size),
                      voxel_energy_counts(generated_voxels_mev, edges, threshold_mev=threshold_mev,
                                          mask=gen_mask, chunk_size=chunk_size))
        comparisons = separation_powers(reference_features.select(ref_mask), ref_inc[ref_mask],
                                        generated_features.select(gen_mask), gen_inc[gen_mask],
                                        threshold_mev=threshold_mev, voxel_counts=counts,
                                        voxel_edges=edges)
        if counts is None:
            comparisons["Voxel distribution"] = HistogramComparison(
                "Voxel distribution", "sep cell", None, None, None, None, float("nan"))
        result[energy_bin_label(low, high)] = comparisons
    return result


def separation_power_summary(comparisons: dict[str, HistogramComparison]) -> dict[str, float]:
    """Separation power per feature family, as in the published tables (docs/scoring.md §2.7).

    Per-layer families are averaged over the layers (ignoring undefined layers); ``'sep E total'``
    and ``'sep cell'`` are single numbers. Keys follow the published column names:
    ``sep E total``, ``sep E layer``, ``sep cell``, ``sep EC eta``, ``sep EC phi``, ``sep EC r``,
    ``sep EC eta std``, ``sep EC phi std``, ``sep EC r std``, ``sep sparsity``.
    """
    grouped: dict[str, list[float]] = {}
    for comparison in comparisons.values():
        grouped.setdefault(comparison.family, []).append(comparison.separation_power)
    summary = {}
    for family, values in grouped.items():
        finite = np.asarray(values)[np.isfinite(values)]
        summary[family] = float(np.mean(finite)) if finite.size else float("nan")
    return summary


def average_shower_by_energy(voxels_mev, incident_energy_mev: np.ndarray, *,
                             threshold_mev: float = THRESHOLD_MEV,
                             edges_mev: Sequence[float] = ENERGY_DECADES_MEV,
                             closed_last: bool = False,
                             chunk_size: int = 1000) -> list[tuple[float, float, np.ndarray, int]]:
    """Average thresholded shower per incident-energy bin: the official ``avg-E`` mode.

    Defaults reproduce evaluate.py exactly: decades 10^3-10^6 MeV, ``E_lo <= E_inc < E_hi`` in every
    bin (``closed_last=False``).

    Returns:
        ``[(low_mev, high_mev, mean_voxels (n_voxels,) or NaNs when empty, n_showers), ...]``.
    """
    shape = getattr(voxels_mev, "shape", None) or np.asarray(voxels_mev).shape
    energy = np.asarray(incident_energy_mev, dtype=np.float64).reshape(-1)
    if len(shape) != 2 or energy.shape != (shape[0],):
        raise InputError(f"{energy.size} incident energies for voxels of shape {tuple(shape)}")
    bins = energy_bin_masks(energy, edges_mev, closed_last=closed_last)
    sums = np.zeros((len(bins), shape[1]))
    for start in range(0, shape[0], chunk_size):
        data = apply_threshold(_read(voxels_mev, start, start + chunk_size), threshold_mev)
        for i, (_, _, mask) in enumerate(bins):
            sums[i] += data[mask[start:start + chunk_size]].sum(axis=0)
    result = []
    for i, (low, high, mask) in enumerate(bins):
        count = int(mask.sum())
        mean = sums[i] / count if count else np.full(shape[1], np.nan)
        result.append((low, high, mean, count))
    return result
