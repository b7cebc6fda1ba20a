"""Occupancy calibration: how many points to generate so that a shower has the right number of hits.

The flow predicts hits per layer (it is trained on cell-level data: one point per hit cell), but
the point network places points independently, so two of them can land in one cell and merge
when the shower is digitised; a few more fall below the readout threshold once the layer energy
is shared among them. Generated showers then have fewer hits than the flow asked for (about 20 %
fewer for ILD photons), worst where the shower is dense. CaloClouds II corrects the total number
of points with two fitted maps (arXiv:2309.05704, Sec. 4.4; FLC-QU-hep/CaloClouds-2,
``utils/gen_utils.py: get_scale_factor``); here the correction is per layer, because the
collision rate differs by an order of magnitude between the shower maximum and the tails
(``docs/fidelity.md``).

Per layer ``l`` the calibration holds a map ``points = exp(-a_l) (s_l hits)^(1 / (1 + b_l))``; the
fit (:func:`fit_occupancy`) sets the points per hit of each layer, ``exp(-a_l)``, with
``b_l = 0`` and ``s_l = 1``: one factor per layer, matched on the mean hits. The exponent and the
hit scale stay in the format for maps that depend on the number of hits.

Everything is fitted on a run's training showers only, never on an evaluation reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..geometry import Geometry
from ..showers import Showers
from .sampling import Sampler

__all__ = ["OccupancyCalibration", "fit_occupancy", "layer_counts", "stochastic_round"]


def stochastic_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round non-negative reals to integers up or down with the probabilities that keep the mean."""
    values = np.maximum(np.asarray(values, np.float64), 0.0)
    low = np.floor(values)
    return (low + (rng.random(values.shape) < values - low)).astype(np.int64)


def layer_counts(showers: Showers, geometry: Geometry) -> np.ndarray:
    """``(N, n_layers)`` number of points (or hits) of each shower in each readout layer."""
    layer = geometry.layer_index(showers.points[:, 2])
    inside = layer >= 0
    flat = showers.shower_index[inside] * geometry.n_layers + layer[inside]
    n = len(showers)
    return np.bincount(flat, minlength=n * geometry.n_layers).reshape(n, geometry.n_layers)


@dataclass(frozen=True)
class OccupancyCalibration:
    """Per-layer map from the hits the flow asks for to the points to generate, for one geometry.

    Attributes:
        geometry: name of the geometry it was fitted in (calibrations do not transfer between readouts).
        log_efficiency: ``a_l``, per layer; ``exp(-a_l)`` is the points per hit (with ``b_l = 0``).
        exponent: ``b_l`` of ``hits = exp(a_l) points^(1 + b_l)``, per layer (0 from :func:`fit_occupancy`).
        hit_scale: ``s_l``, factor on the hits asked for, per layer (1 from :func:`fit_occupancy`).
        fit: how it was fitted (sampler, steps, showers) and the check on the training showers:
            ``training_hits`` and ``generated_hits`` (mean per layer, after calibration).
    """

    geometry: str
    log_efficiency: tuple[float, ...]
    exponent: tuple[float, ...]
    hit_scale: tuple[float, ...]
    fit: dict

    def __post_init__(self) -> None:
        n = len(self.log_efficiency)
        if n == 0 or len(self.exponent) != n or len(self.hit_scale) != n:
            raise ValueError("an occupancy calibration needs the same number (> 0) of values per layer")
        if not all(np.isfinite(v).all() for v in (self.log_efficiency, self.exponent, self.hit_scale)):
            raise ValueError("an occupancy calibration must hold finite numbers")

    @property
    def n_layers(self) -> int:
        return len(self.log_efficiency)

    @classmethod
    def uniform(cls, geometry: str, n_layers: int, points_per_hit: float) -> OccupancyCalibration:
        """A fixed number of points per hit in every layer (what the fit itself generates with)."""
        return cls(geometry, (-float(np.log(points_per_hit)),) * n_layers, (0.0,) * n_layers, (1.0,) * n_layers,
                   {"kind": "uniform", "points_per_hit": float(points_per_hit)})

    def points_for_hits(self, hits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``(N, n_layers)`` integer points to generate for ``(N, n_layers)`` wanted hits (the flow's)."""
        hits = np.asarray(hits, np.float64)
        if hits.shape[-1] != self.n_layers:
            raise ValueError(f"calibration for {self.n_layers} layers applied to {hits.shape[-1]}")
        wanted = hits * np.asarray(self.hit_scale)
        a, b = np.asarray(self.log_efficiency), np.asarray(self.exponent)
        points = np.exp((np.log(np.maximum(wanted, 1e-12)) - a) / (1.0 + b))
        # fewer points than wanted hits where the flow asks for more hits than the training showers have
        # (points per hit below 1: the correction itself), but a point in every layer the flow fills, so
        # that no shower is left empty; none for no hits
        points = np.where(wanted > 0, np.maximum(points, np.minimum(wanted, 1.0)), 0.0)
        return stochastic_round(points, rng)

    def to_dict(self) -> dict:
        """Plain lists, floats and strings (what a checkpoint stores)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> OccupancyCalibration:
        try:
            return cls(str(data["geometry"]), tuple(map(float, data["log_efficiency"])),
                       tuple(map(float, data["exponent"])), tuple(map(float, data["hit_scale"])),
                       dict(data.get("fit", {})))
        except (KeyError, TypeError) as err:
            raise ValueError(f"unreadable occupancy calibration: {err}") from None

    @classmethod
    def from_mean_hits(cls, geometry: str, points_per_hit: tuple[float, float],
                       mean_hits: tuple[np.ndarray, np.ndarray], target_hits: np.ndarray,
                       fit: dict) -> OccupancyCalibration:
        """Each layer's points per hit from two generation passes of the same showers.

        ``mean_hits`` are the mean digitised hits per layer of passes that placed ``k1`` and
        ``k2`` points per hit the flow asked for; the points per hit that give ``target_hits``
        (the training showers' mean) are interpolated in log-log between them. Beyond the second
        pass it extrapolates at most to 1.5 k2, and a layer that gains (almost) nothing from more
        points keeps k2: giving the same layer energy to more points pushes cells below the
        readout threshold, so hits saturate and can even fall.
        """
        (k1, k2), (h1, h2) = points_per_hit, (np.asarray(m, np.float64) + 0.01 for m in mean_hits)
        target = np.asarray(target_hits, np.float64) + 0.01
        gain = np.log(h2 / h1) / np.log(k2 / k1)  # d ln(hits) / d ln(points per hit)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            k = k1 * np.exp(np.log(target / h1) / gain)
        k = np.where(gain > 0.05, k, np.where(target > h1, k2, k1 * target / h1))
        k = np.clip(k, 0.1 * k1, 1.5 * k2)
        return cls(geometry, tuple((-np.log(k)).tolist()), (0.0,) * len(k), (1.0,) * len(k), fit)


#: points per hit of the fit's generation passes: the flow's own counts, then about twice as many
FIT_POINTS_PER_HIT = (1.0, 2.0)


def fit_occupancy(model, geometry: Geometry, showers: Showers, *, sampler: Sampler = Sampler(),
                  seed: int = 0, batch_size: int = 64, check: bool = True,
                  progress: bool = False) -> OccupancyCalibration:
    """Fit the occupancy calibration of ``model`` in ``geometry`` on its training ``showers``.

    1. The model generates showers at the training energies twice, with one and with two
       points per hit the flow asks for; both passes share one seed per batch (the same flow
       samples), so they differ only by the points placed.
    2. Per layer, the points per hit that give the training showers' mean hits are interpolated
       between the two passes (:meth:`OccupancyCalibration.from_mean_hits`); this also absorbs
       the flow's own bias per layer where it under-predicts.
    3. With ``check``, a third pass with another seed records the mean hits per layer of
       calibrated generation beside the training showers' (``fit['generated_hits']``,
       ``fit['training_hits']``).

    Arguments:
        model: a :class:`~caloadapt.models.ShowerModel` (its current weights are used).
        showers: training showers of ``geometry`` (never the evaluation reference).
        sampler: the sampler the model is generated with (its checkpoint's): collisions depend on
            how tight the generated core is, so the fit uses the same one.
        progress: a progress bar over the generation passes (showers generated).
    """
    energy = showers.incident_energy_mev
    if len(energy) == 0:
        raise ValueError("no training showers to fit the occupancy calibration on")
    training_hits = layer_counts(geometry.digitise(showers), geometry)

    def angles(rows: slice) -> dict:  # the training showers' directions, for a model told them
        if not model.config.angle_conditioning:
            return {}
        return {"theta_deg": showers.theta_deg[rows], "phi_deg": showers.phi_deg[rows]}

    n_layers = geometry.n_layers
    device = model.point_mean.device
    n_passes = len(FIT_POINTS_PER_HIT) + check
    bar = tqdm(total=n_passes * len(energy), disable=not progress, desc=f"occupancy fit {geometry.name}",
               unit="shower", leave=False)

    def generate_counts(calibration: OccupancyCalibration, pass_seed: int) -> tuple[np.ndarray, np.ndarray]:
        points, hits = [], []
        for start in range(0, len(energy), batch_size):
            # one generator per batch: passes with one seed draw the same flow samples in every batch,
            # whatever number of points an earlier batch consumed noise for
            generator = torch.Generator(device).manual_seed(pass_seed * 1_000_003 + start)
            raw = model.generate(geometry, energy[start:start + batch_size], sampler,
                                 generator=generator, occupancy=calibration, **angles(slice(start, start + batch_size)))
            points.append(layer_counts(raw, geometry))
            hits.append(layer_counts(geometry.digitise(raw), geometry))
            bar.update(len(raw))
        return np.concatenate(points), np.concatenate(hits)

    was_training = model.training
    model.eval()
    try:
        hits = [generate_counts(OccupancyCalibration.uniform(geometry.name, n_layers, k), seed + 1)[1]
                for k in FIT_POINTS_PER_HIT]
        fit = {"sampler": sampler.kind, "n_steps": int(sampler.steps), "sigma_max": float(sampler.sigma_max),
               "n_showers": int(len(energy)),
               "points_per_hit": list(FIT_POINTS_PER_HIT), "training_hits": training_hits.mean(axis=0).tolist()}
        calibration = OccupancyCalibration.from_mean_hits(geometry.name, FIT_POINTS_PER_HIT,
                                                          tuple(h.mean(axis=0) for h in hits),
                                                          training_hits.mean(axis=0), fit)
        if check:
            _, hits = generate_counts(calibration, seed + 2)
            fit["generated_hits"] = hits.mean(axis=0).tolist()
    finally:
        bar.close()
        model.train(was_training)
    return calibration
