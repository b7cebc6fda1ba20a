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

Per layer ``l`` the calibration holds

- a collision map fitted on the model's own digitised generation, ``hits = exp(a_l) points^(1 + b_l)``
  (``b_l <= 0``: the share of surviving points falls as the layer fills), inverted to give the
  points for a wanted number of hits;
- a residual hit scale ``s_l``: training hits / flow hits in layer ``l`` on the training showers,
  which removes what remains of the flow's bias (its decoding of small counts, for instance).

Everything is fitted on a run's training showers only, never on an evaluation reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ..geometry import Geometry
from ..showers import Showers

__all__ = ["OccupancyCalibration", "fit_occupancy", "layer_counts", "stochastic_round"]

#: bounds of the fitted exponent b_l: points never collide less than independently (b <= 0), and
#: a steeper fall than hits ~ points^0.3 means the fit is extrapolating, not measuring
_EXPONENT_RANGE = (-0.7, 0.0)
#: (shower, layer) pairs a layer needs for a fit of its own; sparser layers use the pooled fit
_MIN_PAIRS = 8


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
        log_efficiency: ``a_l``, ln of the hits per point at one point, per layer.
        exponent: ``b_l`` of ``hits = exp(a_l) points^(1 + b_l)``, per layer.
        hit_scale: ``s_l``, training hits / flow hits per layer.
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
        # never fewer points than wanted hits (each point makes at most one hit), none for no hits
        points = np.where(wanted > 0, np.maximum(points, wanted), 0.0)
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
    def from_passes(cls, geometry: str, passes: list[tuple[np.ndarray, np.ndarray]], hit_scale: np.ndarray,
                    fit: dict) -> OccupancyCalibration:
        """Fit each layer's collision map on two generation passes of the same showers.

        ``passes`` holds ``(points, hits)``, each ``(M, n_layers)``, from passes that differ only
        in the number of points per hit asked for. The exponent comes from the pairs: how much
        one (shower, layer) gains in hits when it is given more points,
        ``1 + b = sum w ln(h2 / h1) / sum w ln(n2 / n1)`` with the points as weights (a fit across
        showers would mix in that energetic showers are both larger and denser). The level
        ``a`` is the weighted mean of ``ln h - (1 + b) ln n`` over both passes. Layers with fewer
        than a handful of pairs take the values of all layers pooled.
        """
        (n1, h1), (n2, h2) = [(np.asarray(p, np.float64), np.asarray(h, np.float64)) for p, h in passes[:2]]
        pooled = _fit_pairs(n1.ravel(), h1.ravel(), n2.ravel(), h2.ravel())
        if pooled is None:
            raise ValueError("no generated point produced a hit: cannot fit the occupancy calibration")
        fits = [_fit_pairs(n1[:, l], h1[:, l], n2[:, l], h2[:, l]) or pooled for l in range(n1.shape[1])]
        return cls(geometry, tuple(a for a, _ in fits), tuple(b for _, b in fits),
                   tuple(map(float, hit_scale)), fit)


def _fit_pairs(n1: np.ndarray, h1: np.ndarray, n2: np.ndarray, h2: np.ndarray) -> tuple[float, float] | None:
    use = (n1 >= 1) & (h1 >= 1) & (h2 >= 1) & (n2 > n1)
    if use.sum() < _MIN_PAIRS:
        return None
    w = n1[use]
    slope = np.sum(w * np.log(h2[use] / h1[use])) / np.sum(w * np.log(n2[use] / n1[use]))
    b = float(np.clip(slope - 1.0, *_EXPONENT_RANGE))
    n, h = np.concatenate([n1[use], n2[use]]), np.concatenate([h1[use], h2[use]])
    a = float(np.average(np.log(h) - (1.0 + b) * np.log(n), weights=n))
    return a, b


#: points per hit of the fit's generation passes: the flow's own counts, then about twice as many
FIT_POINTS_PER_HIT = (1.0, 2.0)
#: generation passes that set the level of each layer's map (secant steps)
FIT_LEVEL_PASSES = 2
#: flow samples (the flow alone is cheap) that measure its mean hits per layer
FIT_FLOW_SAMPLES = 4096


def fit_occupancy(model, geometry: Geometry, showers: Showers, *, sampler: str = "heun", n_steps: int = 13,
                  seed: int = 0, batch_size: int = 64, check: bool = True) -> OccupancyCalibration:
    """Fit the occupancy calibration of ``model`` in ``geometry`` on its training ``showers``.

    1. Flow bias: the flow alone samples hits per layer at the training energies (repeated to
       about 4000 samples); the training showers' mean hits per layer over the flow's is the
       first factor of the hit scale.
    2. Collisions: the model generates showers at the training energies with the flow's hits
       and with about twice as many points; how the digitised hits of each (shower, layer) grow
       with the points placed gives each layer's power law. All generation passes share one seed (the same flow samples and
       noise), so they differ only by the calibration under test.
    3. Two more passes with the same seed set each layer's level: secant steps on the hit scale
       until the calibrated hits match the hits asked for (the power law's own level leaves
       biases of 10-20 %, and a layer whose cells saturate gains less than asked for).
    4. With ``check``, a last pass with another seed records the mean hits per layer of
       calibrated generation beside the training showers' (``fit['generated_hits']``,
       ``fit['training_hits']``).

    Arguments:
        model: a :class:`~caloadapt.models.ShowerModel` (its current weights are used).
        showers: training showers of ``geometry`` (never the evaluation reference).
        sampler, n_steps: the sampler the calibration is fitted with (collisions depend on it a little).
    """
    energy = showers.incident_energy_mev
    if len(energy) == 0:
        raise ValueError("no training showers to fit the occupancy calibration on")
    training_hits = layer_counts(geometry.digitise(showers), geometry)
    n_layers = geometry.n_layers
    device = model.point_mean.device

    def generate_counts(calibration: OccupancyCalibration, pass_seed: int) -> tuple[np.ndarray, np.ndarray]:
        points, hits = [], []
        for start in range(0, len(energy), batch_size):
            # one generator per batch: passes with one seed draw the same flow samples in every batch,
            # whatever number of points an earlier batch consumed noise for
            generator = torch.Generator(device).manual_seed(pass_seed * 1_000_003 + start)
            raw = model.generate(geometry, energy[start:start + batch_size], n_steps=n_steps, sampler=sampler,
                                 generator=generator, occupancy=calibration)
            points.append(layer_counts(raw, geometry))
            hits.append(layer_counts(geometry.digitise(raw), geometry))
        return np.concatenate(points), np.concatenate(hits)

    def ratio_of_means(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        # a hundredth of a pseudo-hit on each side: layers the showers barely reach stay near 1
        return np.clip((numerator.mean(axis=0) + 0.01) / (denominator.mean(axis=0) + 0.01), 0.1, 10.0)

    was_training = model.training
    model.eval()
    try:
        repeats = -(-FIT_FLOW_SAMPLES // len(energy))
        generator = torch.Generator(device).manual_seed(seed)
        flow_hits = np.concatenate([model.sample_layer_hits(geometry, energy, generator) for _ in range(repeats)])
        flow_scale = ratio_of_means(training_hits, flow_hits)
        passes = [generate_counts(OccupancyCalibration.uniform(geometry.name, n_layers, k), seed + 1)
                  for k in FIT_POINTS_PER_HIT]
        fit = {"sampler": sampler, "n_steps": int(n_steps), "n_showers": int(len(energy)),
               "points_per_hit": list(FIT_POINTS_PER_HIT), "training_hits": training_hits.mean(axis=0).tolist()}
        first = OccupancyCalibration.from_passes(geometry.name, passes, flow_scale, fit)
        asked = passes[0][0] * flow_scale  # same seed: the flow's hits of these passes, scaled as asked
        log_scale = [np.log(flow_scale)]
        log_ratio = []
        for _ in range(FIT_LEVEL_PASSES):  # secant steps on each layer's ln(hit scale) towards ratio 1
            trial = replace(first, hit_scale=tuple(np.exp(log_scale[-1]).tolist()))
            log_ratio.append(np.log(ratio_of_means(generate_counts(trial, seed + 1)[1], asked)))
            if len(log_ratio) == 1:
                step = -log_ratio[-1]  # as if hits were proportional to the hits asked for
            else:
                slope = (log_ratio[-1] - log_ratio[-2]) / (log_scale[-1] - log_scale[-2] + 1e-12)
                step = -log_ratio[-1] / np.clip(slope, 0.2, 5.0)
            log_scale.append(log_scale[-1] + np.clip(step, -np.log(2.0), np.log(2.0)))
        hit_scale = np.exp(np.clip(log_scale[-1], np.log(0.1), np.log(10.0)))
        calibration = replace(first, hit_scale=tuple(hit_scale.tolist()))
        if check:
            _, hits = generate_counts(calibration, seed + 2)
            fit["generated_hits"] = hits.mean(axis=0).tolist()
    finally:
        model.train(was_training)
    return calibration
