"""The evaluation pipeline: two shower files in, ``metrics.json``, plots and a report out.

:func:`run_evaluation` compares a generated shower file with a reference (Geant4) file in a target
geometry. Both files are streamed chunk by chunk (:func:`~caloadapt.data.io.iter_showers`); each
chunk is voxelised into the target readout with its threshold (dense float32, one chunk at a time)
and reduced at once to what the metrics need, so a 100k x 40 500-voxel file never sits in memory
as one dense array:

- the per-shower observables of :func:`~caloadapt.evaluate.observables.shower_observables`
  (including the pooled energies of the hit cells, stored as float32, which is lossless since the
  voxels are float32);
- for uniform cylindrical readouts (the CaloChallenge datasets 2 and 3, or any binning of that
  kind) the official high-level features;
- the low-level classifier input ``[log10 E_inc, voxel / E_inc]`` of the first
  ``min(N_ref, N_gen)`` showers, only when the classifier is requested and both samples together
  fit :attr:`EvaluationOptions.max_low_level_floats` (default 2e8 floats, 800 MB); otherwise the
  low-level classifier is skipped with a note and the high-level one still runs;
- running sums of the voxels per incident-energy decade (the average showers of ``avg-E``), the
  energy per radial bin of every shower (radial profile) and a few example showers (event display).

The streaming itself is :mod:`caloadapt.evaluate.stream`.

Cross-geometry evaluation: a file is read in its own geometry (recorded in the file, implied by its
layout, or -- for a CaloChallenge-layout file whose voxel count equals the target's -- the target)
and its points, which live in the shower frame shared by all geometries, are voxelised into the
target readout. Both geometries are recorded in ``metrics.json``. A cell-level file of another
binning is re-binned by its cell centres (all energy of a source cell goes to the target cell that
contains the centre), which is approximate when the cells do not nest. The fraction of energy
outside the target readout is recorded and noted when large.

Sample sizes (documented choices):

- ``max_showers`` keeps the first N showers of each file.
- The classifier needs equal sizes (official ``ttv_split``): both samples are truncated to the
  first ``min(N_ref, N_gen)`` showers for the classifier only, and the truncation is noted.
  Everything else uses all showers.
- FPD and KPD use the official settings (FPD ``min_samples=10000``, ``max_samples=50000``, KPD
  ``batch_size=10000``) when both samples have at least 50 000 showers. For smaller samples the
  batch sizes shrink: ``max_samples = min(50000, N_min)``,
  ``min_samples = min(10000, max(2, max_samples // 5))`` (the official ratio 1/5 where possible),
  KPD ``batch_size = min(10000, N_min)``; ``metrics.json`` records the settings and whether they
  are the official ones. Such numbers are not comparable with the published tables.
- FPD and KPD run by default only when both samples hold at least ``FPD_KPD_MIN_SHOWERS`` (10 000,
  the official smallest FPD batch) showers: below it the FPD is dominated by its finite-sample bias
  (reported: FPD x 1e3 = 371 for two samples of one distribution at 2000 showers) and it is the
  slowest metric. ``EvaluationOptions(fpd_kpd=True)`` (``--fpd-kpd``) computes them anyway; the reason of
  a skip is recorded in ``metrics.json`` and the report.

The floor (``floor=FILE``, ``--floor``): a second sample of the reference source, independent of the
reference, evaluated against the reference exactly like the generated sample (one function,
:func:`_compare`, called twice; the reference is read once). It is the score of a perfect simulator
at these sample sizes; ``metrics.json`` holds it under ``floor`` and the model / floor ratios under
``ratio_to_floor``; the report shows both side by side (docs/evaluation.md).

Energy bins: the decades 1-10, 10-100 and 100-1000 GeV of the official ``avg-E`` mode, with the
last bin closed (``E_inc <= 1 TeV``, see :mod:`caloadapt.evaluate.energy_bins`); bins with fewer than
2 showers in either sample are left out of the score tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .._atomic import atomic_path
from .._memory import check_memory
from .._provenance import library_versions, to_jsonable
from ..data.io import count_showers
from ..errors import InputError
from ..geometry import Geometry, get_geometry
from .calochallenge import (
    CaloChallengeBinning,
    high_level_vector,
    log_edges,
    separation_power_summary,
    separation_powers,
)
from .classifier import CLASSIFIER_PRESETS, ClassifierResult, ClassifierSettings, classifier_test
from .energy_bins import ENERGY_DECADES_MEV, energy_bin_label, energy_bin_masks
from .observables import (
    PER_SHOWER_OBSERVABLES,
    SCORE_ROWS,
    ShowerObservables,
    calotransfer_scores,
    calotransfer_scores_by_energy,
    calotransfer_scores_by_theta,
    layout_of,
)
from .physics_distance import frechet_physics_distance, kernel_physics_distance
from .stream import DENSE_CHUNK_CELLS, SampleSummary, calochallenge_binning_of, source_geometry, stream_sample

__all__ = [
    "EvaluationOptions",
    "run_evaluation",
    "fpd_kpd_settings",
    "fpd_kpd_decision",
    "ratios_to_floor",
    "FPD_KPD_MIN_SHOWERS",
    "write_metrics",
    "to_jsonable",
    "METRICS_FORMAT_VERSION",
]

#: version of the layout of ``metrics.json``
METRICS_FORMAT_VERSION = 1

#: the official FPD/KPD sizes of the CaloChallenge call (docs/scoring.md §2.6)
_OFFICIAL_FPD = {"min_samples": 10_000, "max_samples": 50_000}
_OFFICIAL_KPD_BATCH = 10_000

#: by default FPD/KPD run only when both samples hold at least this many showers: the official
#: smallest FPD batch (docs/scoring.md §2.6); below it the 1/N extrapolation of the FPD starts from
#: batches smaller than the official ones and the value is dominated by its finite-sample bias
FPD_KPD_MIN_SHOWERS = 10_000

#: what an evaluation says when scikit-learn (the ``eval`` extra) is missing
NO_SKLEARN_NOTE = ("the classifier metrics (AUC, JSD) need scikit-learn, which is not installed "
                   "(pip install 'caloadapt[eval]'): they are skipped")
#: a classifier with fewer optimiser steps per epoch is noted as barely trained
CLASSIFIER_MIN_STEPS_PER_EPOCH = 10

#: a file with more than this fraction of its energy outside the target readout gets a note
_OUTSIDE_NOTE_FRACTION = 0.05


@dataclass
class EvaluationOptions:
    """Options of :func:`run_evaluation`.

    Attributes:
        max_showers: use at most the first N showers of each file (None: all).
        n_bootstrap: shower-level bootstrap resamples of the score tables (0: none).
        classifier: ``"cpu"`` (CPU-sized DNN), ``"official"`` (evaluate.py settings), ``"none"``, or a
            :class:`~caloadapt.evaluate.classifier.ClassifierSettings`.
        fpd_kpd: FPD and KPD on the high-level features (uniform cylindrical readouts only), with
            sample-size-adapted batch sizes below 50 000 showers (see the module docstring). None
            (default): only when both samples hold at least :data:`FPD_KPD_MIN_SHOWERS` showers, else
            skipped with the reason recorded; True: always; False: never.
        energy_bins: also evaluate per incident-energy decade.
        plots: write the plots (and embed them in the report).
        n_event_display: showers of each sample shown in the 3D event display.
        seed: seed of the bootstrap and the classifier (FPD/KPD keep the official seed 42).
        chunk_size: showers read and voxelised at once (memory ~ ``chunk_size * n_cells * 12`` B).
        progress: show tqdm progress bars (on stderr).
        max_low_level_floats: memory budget of the low-level classifier inputs of both samples
            together, in floats (float32); above it the low-level classifier is skipped.
        max_pooled_cells: at most this many hit cells per sample enter the pooled cell-energy spectrum
            (score row ``cell_energy`` and the ``Voxel distribution`` separation power): the cells of the
            first showers up to the budget, whole showers only (None: all). Scoring costs about 85 B
            and 1 us per pooled cell; 2e7 covers ~10k CaloChallenge DS3 or ~22k DS2 showers.
        fpd_num_batches, fpd_num_points: FPD batches per batch size and number of batch sizes
            (official 20 and 10).
        kpd_num_batches: KPD batches (official 10).
        device: torch device of the classifier.
    """

    max_showers: int | None = None
    n_bootstrap: int = 50
    classifier: str | ClassifierSettings = "cpu"
    fpd_kpd: bool | None = None
    energy_bins: bool = True
    plots: bool = True
    n_event_display: int = 3
    seed: int = 0
    chunk_size: int = 500
    progress: bool = True
    max_low_level_floats: int = 200_000_000
    max_pooled_cells: int | None = 20_000_000
    fpd_num_batches: int = 20
    fpd_num_points: int = 10
    kpd_num_batches: int = 10
    device: str = "cpu"

    def validate(self) -> None:
        """Raise :class:`InputError` for an impossible option."""
        if self.max_showers is not None and self.max_showers < 2:
            raise InputError(f"max_showers must be at least 2, got {self.max_showers}")
        if self.n_bootstrap < 0:
            raise InputError(f"n_bootstrap must be >= 0, got {self.n_bootstrap}")
        if isinstance(self.classifier, str) and self.classifier != "none" \
                and self.classifier not in CLASSIFIER_PRESETS:
            raise InputError(f"unknown classifier {self.classifier!r}; expected one of "
                             f"{', '.join(sorted(CLASSIFIER_PRESETS))} or 'none'")
        if self.chunk_size < 1:
            raise InputError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.n_event_display < 0:
            raise InputError(f"n_event_display must be >= 0, got {self.n_event_display}")
        if self.max_pooled_cells is not None and self.max_pooled_cells < 1:
            raise InputError("max_pooled_cells must be positive or None")
        if self.max_low_level_floats < 0:
            raise InputError("max_low_level_floats must be >= 0")
        if self.fpd_num_batches < 1 or self.fpd_num_points < 2 or self.kpd_num_batches < 1:
            raise InputError("FPD needs >= 1 batch and >= 2 batch sizes, KPD >= 1 batch")

    @property
    def classifier_enabled(self) -> bool:
        return not (isinstance(self.classifier, str) and self.classifier == "none")


# -- provenance -----------------------------------------------------------------------------------
def _geometry_record(geometry: Geometry) -> dict:
    readout = geometry.readout
    record = {"name": geometry.name, "n_cells": int(geometry.n_cells), "n_layers": int(geometry.n_layers),
              "readout": getattr(readout, "kind", type(readout).__name__),
              "threshold_mev": float(geometry.energy.threshold_mev),
              "layer_edges_mm": np.asarray(geometry.layer_edges_mm).tolist()}
    try:
        record["readout_spec"] = readout.to_spec()
    except Exception:  # pragma: no cover - a readout without a spec
        pass
    return record


# -- metric helpers ---------------------------------------------------------------------------------
def fpd_kpd_settings(n_reference: int, n_generated: int) -> dict:
    """FPD/KPD batch sizes: official for >= 50 000 showers per sample, else shrunk (module docstring)."""
    n_min = min(n_reference, n_generated)
    if n_min >= _OFFICIAL_FPD["max_samples"]:
        return {"min_samples": _OFFICIAL_FPD["min_samples"], "max_samples": _OFFICIAL_FPD["max_samples"],
                "kpd_batch_size": _OFFICIAL_KPD_BATCH, "official": True}
    max_samples = n_min
    min_samples = min(_OFFICIAL_FPD["min_samples"], max(2, max_samples // 5))
    return {"min_samples": int(min_samples), "max_samples": int(max_samples),
            "kpd_batch_size": int(min(_OFFICIAL_KPD_BATCH, n_min)), "official": False}


def _classifier_record(result: ClassifierResult, inputs: str, dimension: int, n_per_class: int) -> dict:
    return {"auc": result.auc, "jsd": result.jsd, "accuracy": result.accuracy,
            "auc_uncalibrated": result.auc_uncalibrated, "best_epoch": result.best_epoch,
            "test_accuracy": result.test_accuracy, "n_train": result.n_train, "n_test": result.n_test,
            "n_validation": result.n_validation, "n_per_class": n_per_class, "inputs": inputs,
            "optimiser_steps_per_epoch": math.ceil(2 * result.n_train / result.settings.batch_size),
            "input_dimension": dimension, "settings": dataclasses.asdict(result.settings)}


def _run_classifier(reference: np.ndarray, generated: np.ndarray, options: EvaluationOptions, desc: str,
                    inputs: str, notes: list[str]) -> dict:
    settings = options.classifier
    n_epochs = (CLASSIFIER_PRESETS[settings] if isinstance(settings, str) else settings).n_epochs
    with tqdm(total=n_epochs, unit="epoch", desc=desc, disable=not options.progress, leave=False) as bar:
        def progress(epoch: int, loss: float, accuracy: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", test_acc=f"{accuracy:.3f}")

        try:
            with _warnings_to_notes(notes, f"{desc}"):
                result = classifier_test(reference, generated, settings=settings, seed=options.seed,
                                         device=options.device, progress=progress)
        except InputError as err:
            return {"skipped": str(err)}
    return _classifier_record(result, inputs, int(reference.shape[1]), len(reference))


def _observable_summary(reference: ShowerObservables, generated: ShowerObservables) -> dict:
    out = {}
    for name in PER_SHOWER_OBSERVABLES:
        r, g = reference.per_shower[name], generated.per_shower[name]
        out[name] = {"reference_mean": float(np.mean(r)), "reference_std": float(np.std(r, ddof=1)),
                     "generated_mean": float(np.mean(g)), "generated_std": float(np.std(g, ddof=1))}
    for name, r, g in (("cell_energy_mev", reference.cell_energy_mev, generated.cell_energy_mev),):
        out[name] = {"reference_mean": float(np.mean(r)) if r.size else math.nan,
                     "reference_std": float(np.std(r, ddof=1)) if r.size > 1 else math.nan,
                     "generated_mean": float(np.mean(g)) if g.size else math.nan,
                     "generated_std": float(np.std(g, ddof=1)) if g.size > 1 else math.nan,
                     "reference_count": int(r.size), "generated_count": int(g.size)}
    return out


def _mean_and_error(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(values)
    mean = values.mean(axis=0)
    error = values.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full(values.shape[1:], np.nan)
    return mean, error


def _separation(reference: SampleSummary, generated: SampleSummary, threshold: float,
                ref_mask: np.ndarray | None = None, gen_mask: np.ndarray | None = None) -> dict:
    """Official histograms and separation powers, voxel spectrum from the pooled hit cells.

    The pooled hit cells are exactly the voxels at or above the threshold, i.e. those that fall in the
    official voxel-energy range, so one pass over the files suffices.
    """
    ref_f, gen_f = reference.features, generated.features
    ref_o, gen_o = reference.observables, generated.observables
    if ref_mask is not None:
        ref_f, ref_o = ref_f.select(ref_mask), ref_o.select(ref_mask)
        gen_f, gen_o = gen_f.select(gen_mask), gen_o.select(gen_mask)
    ref_cells = ref_o.cell_energy_mev
    if ref_mask is None:  # the official range: the largest reference voxel (all showers)
        vmax = ref_f.voxel_max_mev
    else:
        vmax = ref_cells.max() if ref_cells.size else None
    edges = log_edges(threshold, vmax, 50) if vmax is not None else None
    counts = None
    if edges is not None:
        counts = (np.histogram(ref_cells, edges)[0], np.histogram(gen_o.cell_energy_mev, edges)[0])
    comparisons = separation_powers(ref_f, ref_o.incident_energy_mev, gen_f, gen_o.incident_energy_mev,
                                    threshold_mev=threshold, voxel_counts=counts, voxel_edges=edges)
    if counts is None:
        from .calochallenge import HistogramComparison
        comparisons["Voxel distribution"] = HistogramComparison("Voxel distribution", "sep cell", None, None,
                                                                None, None, float("nan"))
    return comparisons


@contextlib.contextmanager
def _warnings_to_notes(notes: list[str], stage: str):
    """Collect the warnings of a stage as notes (deduplicated) instead of printing them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        text = f"{stage}: {warning.category.__name__}: {str(warning.message).splitlines()[0]}"
        if text not in notes:
            notes.append(text)


def write_metrics(metrics: dict, path: str | os.PathLike[str]) -> Path:
    """Write ``metrics`` as indented JSON atomically (NaN written as null)."""
    path = Path(path)
    text = json.dumps(to_jsonable(metrics), indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return path


def _summary(metrics: dict) -> dict:
    """The headline numbers, collected in one place."""
    table = metrics["calotransfer"]
    summary = {"geometric_mean": table["geometric_mean"], "geometric_mean_std": table["geometric_mean_std"],
               "kl_geometric_mean": table["kl_geometric_mean"]}
    for key in ("low_level", "high_level"):
        record = metrics["classifier"].get(key) or {}
        summary[f"auc_{key}"] = record.get("auc")
        summary[f"jsd_{key}"] = record.get("jsd")
    physics = metrics.get("fpd_kpd") or {}
    for key in ("fpd_x1e3", "fpd_error_x1e3", "kpd_x1e3", "kpd_error_x1e3"):
        summary[key] = physics.get(key)
    for kind in ("energy", "theta"):
        summary[f"geometric_mean_by_{kind}"] = {
            label: t["geometric_mean"] for label, t in (metrics.get(f"calotransfer_by_{kind}") or {}).items()}
    cc = metrics.get("calochallenge") or {}
    if cc.get("separation_power_summary"):
        summary["separation_power_summary"] = cc["separation_power_summary"]
    return summary


# -- one comparison (the generated sample or the floor against the reference) ------------------
def _compare(ref: SampleSummary, gen: SampleSummary, role: str, *, options: EvaluationOptions,
             binning: CaloChallengeBinning | None, threshold: float, n_cls: int, notes: list[str],
             timing: dict[str, float]) -> dict:
    """Every score of one sample (``role``: the generated one or the floor) against the reference.

    The same computation serves the generated sample and the floor, so that their numbers are
    comparable by construction. Note stages and timing keys of the floor are prefixed ``floor``.
    """
    tag = "" if role == "generated" else f"{role} "
    key = "" if role == "generated" else f"{role}_"

    # -- CaloTransfer scores ------------------------------------------------------------------------
    t = time.perf_counter()
    with _warnings_to_notes(notes, f"{tag}scores"):
        table = calotransfer_scores(ref.observables, gen.observables, n_bootstrap=options.n_bootstrap,
                                    seed=options.seed)
    timing[f"{key}scores"] = time.perf_counter() - t
    by_energy = {}
    if options.energy_bins:
        t = time.perf_counter()
        with _warnings_to_notes(notes, f"{tag}scores by energy"):
            by_energy = {label: tab.as_dict() for label, tab in calotransfer_scores_by_energy(
                ref.observables, gen.observables, n_bootstrap=options.n_bootstrap, seed=options.seed).items()}
        timing[f"{key}scores_by_energy"] = time.perf_counter() - t
    with _warnings_to_notes(notes, f"{tag}scores by theta"):
        by_theta = {label: tab.as_dict() for label, tab in calotransfer_scores_by_theta(
            ref.observables, gen.observables, n_bootstrap=options.n_bootstrap, seed=options.seed).items()}

    # -- CaloChallenge separation powers ------------------------------------------------------------
    calochallenge = None
    if binning is not None:
        t = time.perf_counter()
        with _warnings_to_notes(notes, f"{tag}separation powers"):
            comparisons = _separation(ref, gen, threshold)
        calochallenge = {
            "binning": {"r_edges_mm": list(binning.r_edges_mm), "n_alpha": binning.n_alpha,
                        "n_layers": binning.n_layers},
            "separation_power": {label: c.separation_power for label, c in comparisons.items()},
            "separation_power_summary": separation_power_summary(comparisons),
            "separation_power_summary_by_energy": {},
        }
        if options.energy_bins:
            ref_bins = energy_bin_masks(ref.observables.incident_energy_mev, ENERGY_DECADES_MEV)
            gen_bins = energy_bin_masks(gen.observables.incident_energy_mev, ENERGY_DECADES_MEV)
            for (low, high, ref_mask), (_, _, gen_mask) in zip(ref_bins, gen_bins, strict=True):
                if ref_mask.any() and gen_mask.any():
                    with _warnings_to_notes(notes, f"{tag}separation powers by energy"):
                        powers = separation_power_summary(_separation(ref, gen, threshold, ref_mask, gen_mask))
                    calochallenge["separation_power_summary_by_energy"][energy_bin_label(low, high)] = powers
        timing[f"{key}separation_powers"] = time.perf_counter() - t

    # -- classifiers ----------------------------------------------------------------------------------
    classifier: dict = {"settings": options.classifier if isinstance(options.classifier, str)
                        else dataclasses.asdict(options.classifier)}
    if options.classifier_enabled:
        t = time.perf_counter()
        if ref.low_level is not None and gen.low_level is not None:
            classifier["low_level"] = _run_classifier(ref.low_level[:n_cls], gen.low_level[:n_cls], options,
                                                      f"{tag}classifier low",
                                                      "cls-low: [log10 E_inc, voxel / E_inc]", notes)
        else:
            classifier["low_level"] = {"skipped": "inputs over the memory budget (see notes)"}
        timing[f"{key}classifier_low_level"] = time.perf_counter() - t
        if ref.features is not None:
            t = time.perf_counter()
            ref_hl = high_level_vector(ref.features, ref.observables.incident_energy_mev)[:n_cls]
            gen_hl = high_level_vector(gen.features, gen.observables.incident_energy_mev)[:n_cls]
            classifier["high_level"] = _run_classifier(ref_hl, gen_hl, options, f"{tag}classifier high",
                                                       "cls-high: official high-level vector", notes)
            timing[f"{key}classifier_high_level"] = time.perf_counter() - t
        else:
            classifier["high_level"] = {"skipped": "needs the CaloChallenge high-level features"}
    else:
        classifier["low_level"] = classifier["high_level"] = {"skipped": "classifier='none'"}

    # -- FPD / KPD ------------------------------------------------------------------------------------
    fpd_kpd = None
    if ref.features is not None and options.fpd_kpd is not False:
        run, reason = fpd_kpd_decision(options.fpd_kpd, min(ref.n_used, gen.n_used))
        fpd_kpd = {"skipped": reason} if not run else _fpd_kpd(ref, gen, options, notes, tag)
        if not run and f"FPD/KPD {reason}" not in notes:
            notes.append(f"FPD/KPD {reason}")
        if run:
            timing[f"{key}fpd_kpd"] = fpd_kpd.pop("_seconds")
    return {"calotransfer": table.as_dict(), "calotransfer_by_energy": by_energy, "calotransfer_by_theta": by_theta,
            "calochallenge": calochallenge, "classifier": classifier, "fpd_kpd": fpd_kpd,
            "observables": _observable_summary(ref.observables, gen.observables)}


def fpd_kpd_decision(requested: bool | None, n_min: int) -> tuple[bool, str | None]:
    """Whether FPD/KPD run: ``requested`` True/False decides; None (the default) runs them only when
    both samples hold at least :data:`FPD_KPD_MIN_SHOWERS` showers, else says why they were skipped."""
    if requested is not None:
        return bool(requested), None if requested else "fpd_kpd=False"
    if n_min >= FPD_KPD_MIN_SHOWERS:
        return True, None
    return False, (f"skipped by default below {FPD_KPD_MIN_SHOWERS} showers per sample (here {n_min}): at "
                   "such sizes the FPD is dominated by its finite-sample bias (far from 0 even for two samples "
                   "of one distribution) and it is the slowest metric; --fpd-kpd computes it anyway")


def _fpd_kpd(ref: SampleSummary, gen: SampleSummary, options: EvaluationOptions, notes: list[str],
             tag: str) -> dict:
    t = time.perf_counter()
    settings = fpd_kpd_settings(ref.n_used, gen.n_used)
    if not settings["official"]:
        note = (f"FPD/KPD with sample-size-adapted batch sizes (FPD {settings['min_samples']}-"
                f"{settings['max_samples']}, KPD {settings['kpd_batch_size']}; official 10000-50000 "
                "and 10000 need >= 50000 showers per sample): not comparable with published values")
        if note not in notes:
            notes.append(note)
    ref_hl = high_level_vector(ref.features, ref.observables.incident_energy_mev)
    gen_hl = high_level_vector(gen.features, gen.observables.incident_energy_mev)
    fpd_kpd = {"settings": dict(settings, fpd_num_batches=options.fpd_num_batches,
                                fpd_num_points=options.fpd_num_points,
                                kpd_num_batches=options.kpd_num_batches, seed=42),
               "features": "official high-level vector (362 for DS2/3), normalised by the reference"}
    try:
        if settings["min_samples"] >= settings["max_samples"]:
            raise InputError(f"FPD needs more than {settings['max_samples']} showers per sample")
        with _warnings_to_notes(notes, f"{tag}FPD"):
            fpd = frechet_physics_distance(ref_hl, gen_hl, min_samples=settings["min_samples"],
                                           max_samples=settings["max_samples"],
                                           num_batches=options.fpd_num_batches,
                                           num_points=options.fpd_num_points)
        fpd_kpd.update(fpd_x1e3=fpd.value * 1e3, fpd_error_x1e3=fpd.error * 1e3)
    except InputError as err:
        fpd_kpd["fpd_skipped"] = str(err)
    try:
        with _warnings_to_notes(notes, f"{tag}KPD"):
            kpd = kernel_physics_distance(ref_hl, gen_hl, num_batches=options.kpd_num_batches,
                                          batch_size=settings["kpd_batch_size"])
        fpd_kpd.update(kpd_x1e3=kpd.value * 1e3, kpd_error_x1e3=kpd.error * 1e3)
    except InputError as err:
        fpd_kpd["kpd_skipped"] = str(err)
    fpd_kpd["_seconds"] = time.perf_counter() - t
    return fpd_kpd


def _ratio(model, floor):
    """model / floor for distance-like scores (0 is ideal); None where undefined (missing, floor <= 0)."""
    if model is None or floor is None:
        return None
    model, floor = float(model), float(floor)
    if not (math.isfinite(model) and math.isfinite(floor)) or floor <= 0:
        return None
    return model / floor


def ratios_to_floor(model: dict, floor: dict) -> dict:
    """``model / floor`` of every distance-like score (W1, KL, their geometric means, per energy decade,
    classifier JSD, FPD, KPD, separation powers). The AUC has its ideal at 0.5, not 0, and gets no
    ratio; it is shown side by side with the floor only. None where the floor is 0, negative or
    missing."""
    out: dict = {}
    m_table, f_table = model["calotransfer"], floor["calotransfer"]
    out["geometric_mean"] = _ratio(m_table["geometric_mean"], f_table["geometric_mean"])
    out["kl_geometric_mean"] = _ratio(m_table["kl_geometric_mean"], f_table["kl_geometric_mean"])
    for measure in ("wasserstein", "kl"):
        out[measure] = {row: _ratio(score.get(measure), (f_table["scores"].get(row) or {}).get(measure))
                        for row, score in m_table["scores"].items()}
    for kind in ("energy", "theta"):
        floor_tables = floor.get(f"calotransfer_by_{kind}") or {}
        out[f"geometric_mean_by_{kind}"] = {
            label: _ratio(t["geometric_mean"], (floor_tables.get(label) or {}).get("geometric_mean"))
            for label, t in (model.get(f"calotransfer_by_{kind}") or {}).items()}
    for level in ("low_level", "high_level"):
        out[f"jsd_{level}"] = _ratio((model["classifier"].get(level) or {}).get("jsd"),
                                     (floor["classifier"].get(level) or {}).get("jsd"))
    for name in ("fpd_x1e3", "kpd_x1e3"):
        out[name] = _ratio((model.get("fpd_kpd") or {}).get(name), (floor.get("fpd_kpd") or {}).get(name))
    m_cc, f_cc = model.get("calochallenge") or {}, floor.get("calochallenge") or {}
    out["separation_power_summary"] = {
        family: _ratio(value, (f_cc.get("separation_power_summary") or {}).get(family))
        for family, value in (m_cc.get("separation_power_summary") or {}).items()}
    return out


def _same_energies(a: SampleSummary, b: SampleSummary) -> bool:
    """True when two samples hold the same incident energies (as sets, float32 precision)."""
    x, y = a.observables.incident_energy_mev, b.observables.incident_energy_mev
    return len(x) == len(y) and bool(np.allclose(np.sort(x), np.sort(y), rtol=1e-6, atol=0.0))


def _classifier_notes(section: dict, with_floor: bool) -> list[str]:
    """A classifier with fewer than ``CLASSIFIER_MIN_STEPS_PER_EPOCH`` optimiser steps per epoch is noted."""
    notes = []
    for level in ("low_level", "high_level"):
        record = section["classifier"].get(level) or {}
        steps = record.get("optimiser_steps_per_epoch")
        if "auc" in record and steps is not None and steps < CLASSIFIER_MIN_STEPS_PER_EPOCH:
            notes.append(f"classifier ({level.replace('_', '-')}): {record.get('n_per_class')} showers per class "
                         f"give {steps} optimiser step(s) per epoch (fewer than {CLASSIFIER_MIN_STEPS_PER_EPOCH}): "
                         "the classifier is barely trained, so an AUC near 0.5 may mean an untrained classifier, "
                         "not a good model" + ("" if with_floor else "; compare with a floor (--floor)"))
    return notes


def _floor_notes(model: dict, floor: dict, n_floor: int) -> list[str]:
    """What the floor says about the metrics that need large samples (classifier, FPD/KPD)."""
    notes = []
    for level in ("low_level", "high_level"):
        record, floor_record = model["classifier"].get(level) or {}, floor["classifier"].get(level) or {}
        if "auc" not in record or "auc" not in floor_record:
            continue
        name = f"classifier ({level.replace('_', '-')})"
        if abs(record["auc"] - 0.5) <= 2 * abs(floor_record["auc"] - 0.5):
            notes.append(f"{name}: AUC {record['auc']:.3f} is within twice the floor's distance from 0.5 "
                         f"(floor AUC {floor_record['auc']:.3f}): at this sample size the classifier does not "
                         "separate the model from a second sample of the reference source; its AUC says little")
    physics, floor_physics = model.get("fpd_kpd") or {}, floor.get("fpd_kpd") or {}
    if floor_physics.get("fpd_x1e3") is not None and physics.get("fpd_x1e3") is not None:
        notes.append(f"FPD x 1e3: model {physics['fpd_x1e3']:.4g}, floor {floor_physics['fpd_x1e3']:.4g} "
                     f"({n_floor} floor showers): two samples of one distribution are this far apart; only "
                     "the excess over the floor (ratio_to_floor) says something about the model")
    return notes


# -- the pipeline -----------------------------------------------------------------------------------
#: memory of the evaluation per cell of the readout: the geometry's cell tables, the sums of the voxels
#: per energy bin, the event-display showers of each sample (measured: about 200 B)
BYTES_PER_CELL = 200
#: memory per cell of each shower of the dense voxel chunk, with its working copies
BYTES_PER_CHUNK_CELL = 40


def evaluation_bytes(target: Geometry, chunk_size: int) -> int:
    """About the memory :func:`run_evaluation` needs in ``target`` besides the classifier's inputs (which
    have their own budget, ``max_low_level_floats``)."""
    showers_per_chunk = min(chunk_size, max(1, DENSE_CHUNK_CELLS // target.n_cells))
    return target.n_cells * (BYTES_PER_CELL + BYTES_PER_CHUNK_CELL * showers_per_chunk)


def run_evaluation(generated: str | os.PathLike[str], reference: str | os.PathLike[str],
                   geometry: Geometry | str, out_dir: str | os.PathLike[str],
                   options: EvaluationOptions | None = None, command: str = "",
                   floor: str | os.PathLike[str] | None = None) -> dict:
    """Evaluate a generated shower file against a reference file; write metrics, plots and report.

    With ``floor`` (a second sample of the reference source, independent of the reference) every
    score is computed a second time with the floor in place of the generated sample -- the same
    code, the reference read once -- and ``metrics.json`` gains ``floor`` (the floor's scores and
    its input record) and ``ratio_to_floor`` (model / floor per distance-like score,
    :func:`ratios_to_floor`). The floor is what a perfect simulator would score at these sample
    sizes: a model at ``G / G_floor`` near 1 is as close to the reference as a fresh sample of it.

    Args:
        generated: generated shower file (any layout of :mod:`caloadapt.data.io`).
        reference: reference (Geant4) shower file.
        geometry: target geometry (a :class:`Geometry`, built-in name or description path); both
            samples are voxelised into it with its threshold.
        out_dir: output directory (created); receives ``metrics.json``, ``report.md``,
            ``report.html`` and ``plots/*.png``.
        options: see :class:`EvaluationOptions`.
        command: the command line that started the evaluation (recorded).
        floor: optional floor file (another sample of the reference source, same geometry rules as
            ``generated``).

    Returns:
        the metrics dict written to ``metrics.json`` (NaN as float NaN here, null in the file).

    Raises:
        InputError: missing or empty files, files that fit the target geometry in no way, a target
            geometry without cells, bad options. GeometryError: unknown geometry.
    """
    options = options or EvaluationOptions()
    options.validate()
    start_all = time.perf_counter()
    timing: dict[str, float] = {}
    notes: list[str] = []
    if options.classifier_enabled and importlib.util.find_spec("sklearn") is None:
        # said before any work, not found after the first classifier has trained
        notes.append(NO_SKLEARN_NOTE)
        if options.progress:
            tqdm.write(f"note: {NO_SKLEARN_NOTE}")
        options = dataclasses.replace(options, classifier="none")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a directory")
    generated, reference = Path(generated), Path(reference)
    roles = [("reference", reference), ("generated", generated)]
    if floor is not None:
        roles.append(("floor", Path(floor)))

    target = get_geometry(geometry)
    check_memory(evaluation_bytes(target, options.chunk_size), f"evaluating in {target.name} ({target.n_cells:,} "
                 "cells)", "compare the showers in a readout with fewer cells (--geometry)")
    layout = layout_of(target)
    binning = calochallenge_binning_of(target)
    threshold = layout.threshold_mev
    if binning is None:
        notes.append(f"geometry {target.name!r} is not a uniform cylindrical readout: the CaloChallenge "
                     "high-level features, separation powers, high-level classifier and FPD/KPD are skipped")

    # -- sizes and the memory budget of the low-level classifier ----------------------------------
    t = time.perf_counter()
    sizes = {}
    for role, path in roles:
        source_geometry(path, target)  # fail early, before any long computation
        n = count_showers(path)
        sizes[role] = n if options.max_showers is None else min(n, options.max_showers)
    n_cls = min(sizes.values())  # with a floor: the same classifier size for the model and the floor
    n_low_level = 0
    if floor is not None and sizes["floor"] != sizes["generated"]:
        notes.append(f"the floor holds {sizes['floor']} showers, the generated sample {sizes['generated']}: "
                     "finite-sample distances depend on the sizes, so the floor is exact only for equal sizes")
    if options.classifier_enabled:
        if len(set(sizes.values())) > 1:
            notes.append(f"the classifier needs equal sample sizes: it uses the first {n_cls} showers of "
                         "each file (" + ", ".join(f"{n} {role}" for role, n in sizes.items()) + ")")
        floats = 2 * n_cls * (1 + target.n_cells)
        if floats <= options.max_low_level_floats:
            n_low_level = n_cls
        else:
            notes.append(f"low-level classifier skipped: its inputs ({floats:.3g} floats) exceed the "
                         f"memory budget max_low_level_floats={options.max_low_level_floats:.3g}; lower "
                         "max_showers or raise the budget")
    timing["inspect"] = time.perf_counter() - t

    # -- streaming ----------------------------------------------------------------------------------
    samples = {}
    for role, path in roles:
        t = time.perf_counter()
        with _warnings_to_notes(notes, f"read {role}"):
            samples[role] = stream_sample(path, target, chunk_size=options.chunk_size,
                                          max_showers=options.max_showers, n_low_level=n_low_level,
                                          binning=binning, n_examples=options.n_event_display,
                                          max_cells=options.max_pooled_cells, progress=options.progress,
                                          label=role)
        timing[f"read_{role}"] = time.perf_counter() - t
    ref, gen = samples["reference"], samples["generated"]
    for role, sample in samples.items():
        if not sample.energy_total_mev > 0:
            raise InputError(f"{sample.path}: every {role} shower read ({sample.n_used}) has zero hits; there is "
                             "nothing to compare")
        if sample.geometry != target.name:
            notes.append(f"{role} showers of geometry {sample.geometry!r} were voxelised into {target.name!r}")
        if sample.n_showers_with_cells < sample.n_used:
            notes.append(f"the pooled cell-energy spectrum of the {role} sample (score row cell_energy, "
                         f"separation power 'Voxel distribution') uses the cells of its first "
                         f"{sample.n_showers_with_cells} of {sample.n_used} showers "
                         f"(max_pooled_cells={options.max_pooled_cells})")
        if sample.outside_fraction > _OUTSIDE_NOTE_FRACTION:
            notes.append(f"{sample.outside_fraction:.1%} of the {role} energy lies outside the readout of "
                         f"{target.name!r}")
    for role, sample in samples.items():
        if sample.particle != ref.particle:
            notes.append(f"the files hold different particles: reference {ref.particle}, {role} {sample.particle}")

    # -- every score: the generated sample, then the floor, with the same code ---------------------------
    compare = functools.partial(_compare, options=options, binning=binning, threshold=threshold, n_cls=n_cls,
                                notes=notes, timing=timing)
    model = compare(ref, gen, "generated")
    notes.extend(n for n in _classifier_notes(model, with_floor=floor is not None) if n not in notes)
    floor_section = None
    if floor is not None:
        if _same_energies(ref, gen) and not _same_energies(ref, samples["floor"]):
            notes.append("the generated showers have the incident energies of the reference, the floor has its "
                         "own: the floor then includes the fluctuations of the energy sampling, which the model "
                         "does not have, and is higher than the floor of a perfect simulator at the reference "
                         "energies (simulate the floor at them: caloadapt simulate --energies-from REFERENCE)")
        floor_section = compare(ref, samples["floor"], "floor")
        floor_section = {"input": samples["floor"].record(), **floor_section,
                         "summary": _summary(floor_section)}
        notes.extend(n for n in _floor_notes(model, floor_section, samples["floor"].n_used) if n not in notes)
    # -- profiles and average showers -----------------------------------------------------------------
    profiles = {"layer_depth_mm": target.layer_centres_mm, "layer_edges_mm": target.layer_edges_mm,
                "radial_edges_mm": ref.radial_edges_mm}
    for role, sample in samples.items():
        mean, error = _mean_and_error(sample.observables.layer_energy_mev)
        profiles[f"longitudinal_{role}_mev"] = mean
        profiles[f"longitudinal_{role}_error_mev"] = error
        mean, error = _mean_and_error(sample.radial_energy_mev)
        profiles[f"radial_{role}_mev"] = mean
        profiles[f"radial_{role}_error_mev"] = error
    layer_matrix = layout.layer_matrix()
    average_by_energy = {}
    if options.energy_bins:
        for i, (low, high) in enumerate(zip(ENERGY_DECADES_MEV[:-1], ENERGY_DECADES_MEV[1:], strict=True)):
            entry = {f"n_{role}": int(sample.voxel_counts[i]) for role, sample in samples.items()}
            for role, sample in samples.items():
                mean = sample.average_shower(i)
                entry[f"layer_energy_{role}_mev"] = mean @ layer_matrix
                entry[f"total_energy_{role}_mev"] = float(np.sum(mean))
            average_by_energy[energy_bin_label(low, high)] = entry

    metrics = {
        "format_version": METRICS_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
        "versions": library_versions(),
        "inputs": {role: sample.record() for role, sample in samples.items()},
        "geometry": dict(_geometry_record(target),
                         reference_file_geometry=ref.geometry, generated_file_geometry=gen.geometry,
                         cross_geometry=bool(ref.geometry != target.name or gen.geometry != target.name)),
        "options": dataclasses.asdict(options),
        "notes": notes,
        "summary": {},
        "score_rows": SCORE_ROWS,
        **model,
        "floor": floor_section,
        "ratio_to_floor": ratios_to_floor(model, floor_section) if floor_section else None,
        "profiles": profiles,
        "average_shower_by_energy": average_by_energy,
        "timing_s": timing,
        "outputs": {"metrics": "metrics.json", "report_md": "report.md", "report_html": "report.html",
                    "plots": {}},
    }
    metrics["summary"] = _summary(metrics)
    if floor_section:
        metrics["summary"].update(geometric_mean_floor=floor_section["summary"]["geometric_mean"],
                                  geometric_mean_floor_std=floor_section["summary"]["geometric_mean_std"],
                                  ratio_to_floor=metrics["ratio_to_floor"]["geometric_mean"])
    metrics = to_jsonable(metrics)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(metrics, out_dir / "metrics.json")  # the numbers are safe before plotting

    # -- plots and report -----------------------------------------------------------------------------
    plot_paths: dict[str, Path] = {}
    if options.plots:
        t = time.perf_counter()
        with _warnings_to_notes(notes, "plots"):
            plot_paths = _make_plots(ref, gen, target, binning, metrics, out_dir / "plots", options, notes)
        timing["plots"] = time.perf_counter() - t
    metrics["outputs"]["plots"] = {name: p.relative_to(out_dir).as_posix() for name, p in plot_paths.items()}
    metrics["notes"] = list(notes)
    from .report import write_report

    t = time.perf_counter()
    timing["total"] = t - start_all  # up to the report; updated below
    metrics["timing_s"] = to_jsonable(timing)
    write_report(metrics, plot_paths, out_dir)
    timing["report"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - start_all
    metrics["timing_s"] = to_jsonable(timing)
    write_metrics(metrics, out_dir / "metrics.json")
    return metrics


#: histogram name -> score row annotated on it
_PLOT_SCORE_ROW = {"energy_ratio": "energy_ratio", "visible_energy_mev": "visible_energy", "n_hits": "n_hits",
                   "depth_cog_mm": "depth_cog", "radius_cog_mm": "radius_cog", "cog_x_mm": "cog_x",
                   "cog_y_mm": "cog_y", "cell_energy_mev": "cell_energy"}


def _make_plots(ref: SampleSummary, gen: SampleSummary, target: Geometry,
                binning: CaloChallengeBinning | None, metrics: dict, plot_dir: Path,
                options: EvaluationOptions, notes: list[str]) -> dict[str, Path]:
    """All plots; a failing plot is noted and skipped so that the metrics are never lost."""
    from . import plots

    jobs: list[tuple[str, Callable, tuple, dict]] = []
    labels = ("Reference", "Generated")
    for name, (xlabel, log_x, log_y) in plots.OBSERVABLE_AXES.items():
        if name == "cell_energy_mev":
            r, g = ref.observables.cell_energy_mev, gen.observables.cell_energy_mev
        else:
            r, g = ref.observables.per_shower[name], gen.observables.per_shower[name]
        score = metrics["calotransfer"]["scores"].get(_PLOT_SCORE_ROW.get(name, ""))
        annotation = None
        if score is not None and score.get("wasserstein") is not None:
            std = score.get("wasserstein_std")
            annotation = (rf"$W_1/\sigma_\mathrm{{ref}}$ = {score['wasserstein']:.3g}"
                          + (rf" $\pm$ {std:.2g}" if std is not None else ""))
        jobs.append((f"hist_{name}", plots.histogram_with_ratio, (r, g, plot_dir / f"hist_{name}.png"),
                     {"xlabel": xlabel, "log_x": log_x, "log_y": log_y, "labels": labels,
                      "annotation": annotation}))
    jobs.append(("profile_longitudinal", plots.longitudinal_profile,
                 (ref.observables.layer_energy_mev, gen.observables.layer_energy_mev, target.layer_edges_mm,
                  plot_dir / "profile_longitudinal.png"), {"labels": labels}))
    jobs.append(("profile_radial", plots.radial_profile,
                 (ref.radial_energy_mev, gen.radial_energy_mev, ref.radial_edges_mm,
                  plot_dir / "profile_radial.png"), {"labels": labels}))
    jobs.append(("scores", plots.score_summary,
                 (metrics["calotransfer"], metrics.get("calotransfer_by_energy") or {}, plot_dir / "scores.png"),
                 {}))
    if options.energy_bins:
        jobs.append(("energy_bins", plots.energy_bin_panels,
                     (ref.observables, gen.observables, target.layer_centres_mm,
                      plot_dir / "energy_bins.png"), {"labels": labels}))
    if binning is not None:
        jobs.append(("average_shower", plots.average_shower_polar,
                     (ref.average_shower(), gen.average_shower(), binning, plot_dir / "average_shower.png"),
                     {"labels": labels, "threshold_mev": float(target.energy.threshold_mev)}))
        cc = metrics.get("calochallenge") or {}
        if cc.get("separation_power_summary"):
            jobs.append(("separation_power", plots.separation_power_bars,
                         (cc["separation_power_summary"], cc.get("separation_power_summary_by_energy") or {},
                          plot_dir / "separation_power.png"), {}))
    if options.n_event_display > 0:
        jobs.append(("event_display", plots.event_display,
                     (ref.examples_mev, ref.examples_incident_mev, gen.examples_mev, gen.examples_incident_mev,
                      target.cell_centres_mm, plot_dir / "event_display.png"),
                     {"labels": labels, "directions": (ref.examples_direction, gen.examples_direction)}))
    paths = {}
    iterable: Iterable = tqdm(jobs, desc="plots", unit="plot", disable=not options.progress, leave=False)
    for name, function, args, kwargs in iterable:
        try:
            paths[name] = function(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a plot must never cost the metrics
            notes.append(f"plot {name} failed: {type(err).__name__}: {err}")
    return paths
