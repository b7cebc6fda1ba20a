"""Evaluation of generated showers against a reference, on plain NumPy arrays.

- :mod:`.distances`: normalised Wasserstein-1, geometric mean, bootstrap, KL, histograms and the
  CaloChallenge separation power.
- :mod:`.observables`: per-shower observables of voxelised showers in any readout and the
  CaloTransfer score table (with the published quirks fixed), also per incident-energy decade.
- :mod:`.calochallenge`: the official CaloChallenge high-level features, histogram binnings,
  separation powers and classifier/FPD input vectors (Datasets 2 and 3).
- :mod:`.classifier`: the official DNN classifier test (AUC, JSD), CPU-sized or official settings.
- :mod:`.physics_distance`: FPD and KPD (jetnet algorithms).
- :mod:`.energy_bins`: the incident-energy decades of the official ``avg-E`` mode.
- :mod:`.stream`: one shower file read in chunks into what the scores need; :mod:`.pipeline`: the
  evaluation of a generated file against a reference (and a floor), with plots and a report.

Every function takes the reference (Geant4) sample first. Energies are in MeV, lengths in mm.
"""

from __future__ import annotations

from .calochallenge import (
    DATASET_2,
    DATASET_3,
    DATASET_BINNINGS,
    LAYER_THICKNESS_MM,
    THRESHOLD_MEV,
    CaloChallengeBinning,
    HighLevelFeatures,
    HistogramComparison,
    apply_threshold,
    average_shower_by_energy,
    calochallenge_histograms,
    cell_layout,
    high_level_feature_names,
    high_level_features,
    high_level_vector,
    low_level_vector,
    separation_power_summary,
    separation_powers,
    separation_powers_by_energy,
    voxel_energy_counts,
)
from .classifier import (
    CLASSIFIER_PRESETS,
    ClassifierResult,
    ClassifierSettings,
    ShowerClassifierNet,
    classifier_test,
)
from .distances import (
    BootstrapResult,
    GroupedWasserstein,
    bootstrap,
    density_histogram,
    equal_probability_edges,
    geometric_mean,
    geometric_mean_uncertainty,
    histogram_separation_power,
    kl_divergence,
    normalised_wasserstein,
    separation_power,
)
from .energy_bins import ENERGY_DECADES_MEV, energy_bin_label, energy_bin_masks
from .observables import (
    PER_SHOWER_OBSERVABLES,
    PUBLISHED_SCORED,
    SCORE_ROWS,
    CellLayout,
    ObservableScore,
    ScoreTable,
    ShowerObservables,
    calotransfer_scores,
    calotransfer_scores_by_energy,
    shower_observables,
)
from .physics_distance import (
    PhysicsDistance,
    frechet_distance,
    frechet_physics_distance,
    kernel_physics_distance,
    normalise_by_reference,
)

__all__ = [
    # distances
    "normalised_wasserstein", "geometric_mean", "geometric_mean_uncertainty", "GroupedWasserstein",
    "BootstrapResult", "bootstrap", "equal_probability_edges", "kl_divergence", "density_histogram",
    "separation_power", "histogram_separation_power",
    # energy bins
    "ENERGY_DECADES_MEV", "energy_bin_masks", "energy_bin_label",
    # observables
    "CellLayout", "ShowerObservables", "shower_observables", "ObservableScore", "ScoreTable",
    "calotransfer_scores", "calotransfer_scores_by_energy", "PER_SHOWER_OBSERVABLES", "SCORE_ROWS",
    "PUBLISHED_SCORED",
    # calochallenge
    "THRESHOLD_MEV", "LAYER_THICKNESS_MM", "CaloChallengeBinning", "DATASET_2", "DATASET_3",
    "DATASET_BINNINGS", "apply_threshold", "cell_layout", "HighLevelFeatures", "high_level_features",
    "high_level_vector", "high_level_feature_names", "low_level_vector", "HistogramComparison",
    "voxel_energy_counts", "separation_powers", "calochallenge_histograms", "separation_powers_by_energy",
    "separation_power_summary",
    "average_shower_by_energy",
    # classifier
    "ClassifierSettings", "ClassifierResult", "ShowerClassifierNet", "classifier_test",
    "CLASSIFIER_PRESETS",
    # physics distances
    "PhysicsDistance", "normalise_by_reference", "frechet_distance", "frechet_physics_distance",
    "kernel_physics_distance",
]

# -- the evaluation pipeline: files in, metrics.json, plots and report out --------------------------
from .pipeline import EvaluationOptions, run_evaluation  # noqa: E402
from .report import write_report  # noqa: E402
from .stream import (  # noqa: E402
    SampleSummary,
    concatenate_high_level_features,
    concatenate_observables,
    stream_sample,
)

__all__ += ["EvaluationOptions", "SampleSummary", "run_evaluation", "stream_sample",
            "concatenate_observables", "concatenate_high_level_features", "write_report"]
