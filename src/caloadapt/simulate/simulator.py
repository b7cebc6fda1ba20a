"""The embedded shower simulator: incident energies in, digitised showers (or spots) out."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from tqdm.auto import tqdm

from .._memory import check_memory
from ..showers import PARTICLES, Showers
from ..errors import InputError
from ..geometry import Geometry, get_geometry
from ..incidence import NORMAL_PHI_DEG, NORMAL_THETA_DEG, check_angles, local_direction
from .engine import STEP_X0, SimulationSettings, StepGrid, simulate_chunk

__all__ = ["simulate", "iter_simulate"]

#: spots per chunk: bounds memory (about 100 B per spot in flight) while keeping NumPy calls large
SPOTS_PER_CHUNK = 1_000_000
#: memory of one spot in flight, bytes (upper estimate)
BYTES_PER_SPOT = 100
#: (sub-shower x step) entries per chunk of inclined showers, whose 1/cos finer depth grid would
#: otherwise make the per-step arrays, not the spots, the largest allocation
STEPS_PER_CHUNK = 4_000_000


def _expected_spots(geometry: Geometry, energy_mev: float, settings: SimulationSettings) -> float:
    """Rough upper estimate of spots per shower, used only to size the chunks."""
    if settings.mode == "A":
        return 400.0 * (energy_mev / 1000.0) ** 0.96 + 50  # above both GFlash N_spot laws (reference §4.1)
    visible = energy_mev * float(geometry.layer_visible_fraction.max())
    return visible / (geometry.shower.kappa * geometry.stack.sensor_mip_mev) + 50


def _check_request(particle: str, incident_energy_mev: np.ndarray) -> np.ndarray:
    if particle not in PARTICLES:
        raise InputError(f"unknown particle {particle!r}; expected one of {', '.join(sorted(PARTICLES))}")
    energy = np.asarray(incident_energy_mev, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(energy)) or np.any(energy <= 0):
        raise InputError("incident energies must be finite and positive")
    return energy


def iter_simulate(geometry: Geometry | str, particle: str, incident_energy_mev: np.ndarray, *,
                  theta_deg: np.ndarray | float = NORMAL_THETA_DEG, phi_deg: np.ndarray | float = NORMAL_PHI_DEG,
                  seed: int | None = None, level: str = "hits",
                  settings: SimulationSettings = SimulationSettings(),
                  progress: bool = False) -> Iterator[Showers]:
    """Simulate showers chunk by chunk, in the order of ``incident_energy_mev``.

    Args:
        geometry: a :class:`Geometry` or the name/path of one.
        particle: ``photon``, ``electron`` or ``positron``.
        incident_energy_mev: ``(N,)`` energies of the incoming particles in MeV.
        theta_deg, phi_deg: incidence direction, one value or ``(N,)`` per shower, in degrees:
            polar angle to the beam axis and azimuth (docs/inclined.md); the default (90, 90) is
            normal incidence. Stored per shower in ``meta``.
        seed: seed of the random stream; the same seed, energies and angles give identical showers.
        level: ``hits`` (one point per cell above threshold, as in the real data sets) or
            ``spots`` (the step-level energy depositions before digitisation).
        settings: simulator options (mode A/B, photon pair split, fluctuations).
        progress: show a progress bar (showers).
    """
    geometry = get_geometry(geometry)
    energy = _check_request(particle, incident_energy_mev)
    if level not in {"hits", "spots"}:
        raise InputError(f"unknown output level {level!r}; expected 'hits' or 'spots'")
    try:
        theta, phi = (np.broadcast_to(np.asarray(a, dtype=np.float64), energy.shape) for a in (theta_deg, phi_deg))
    except ValueError:
        raise InputError(f"incidence angles must be one value or one per shower ({len(energy)})") from None
    theta, phi = check_angles(theta, phi, geometry.barrel_sides)
    spots = _expected_spots(geometry, float(energy.max(initial=1.0)), settings)
    check_memory(BYTES_PER_SPOT * spots, f"one shower of {energy.max(initial=1.0) / 1000:.4g} GeV "
                                         f"({spots:.3g} energy spots)")
    chunk = int(max(1, SPOTS_PER_CHUNK // spots))
    cos_min = float(local_direction(theta, phi, geometry.barrel_sides)[:, 2].min(initial=1.0))
    if cos_min < 1.0:
        steps = geometry.stack.depth_x0 / (STEP_X0 * cos_min)
        chunk = int(max(1, min(chunk, STEPS_PER_CHUNK // (2 * steps))))  # 2: photons make two sub-showers
    grid = StepGrid.of(geometry)
    streams = np.random.SeedSequence(seed).spawn(max(1, -(-len(energy) // chunk)))
    with tqdm(total=len(energy), unit="shower", disable=not progress, desc=f"simulate {geometry.name}") as bar:
        for stream, start in zip(streams, range(0, len(energy), chunk)):
            rng = np.random.default_rng(stream)
            rows = slice(start, start + chunk)
            spots = simulate_chunk(geometry, particle, energy[rows], rng, settings, grid, theta[rows], phi[rows])
            yield _in_readout_layers(geometry, spots) if level == "spots" else geometry.digitise(spots)
            bar.update(len(spots))


def _in_readout_layers(geometry: Geometry, spots: Showers) -> Showers:
    """The spots whose depth lies in a readout layer, the others' energy in ``outside_energy_mev``.

    An inclined shower's lateral spread reaches in front of the first readout layer and behind the
    last (docs/inclined.md), where nothing is read out; the digitised hits never held such spots,
    and a spot file must not either.
    """
    inside = geometry.layer_index(spots.points[:, 2]) >= 0
    if inside.all():
        return spots
    shower = spots.shower_index
    return Showers.from_counts(spots.points[inside], np.bincount(shower[inside], minlength=len(spots)),
                               spots.incident_energy_mev, particle=spots.particle, geometry=spots.geometry,
                               meta=spots.meta_with_outside(~inside, shower))


def simulate(geometry: Geometry | str, particle: str, incident_energy_mev: np.ndarray, **kwargs) -> Showers:
    """Simulate showers and return them as one batch (see :func:`iter_simulate` for the options)."""
    geometry = get_geometry(geometry)
    chunks = list(iter_simulate(geometry, particle, incident_energy_mev, **kwargs))
    return Showers.concatenate(chunks) if chunks else Showers.empty(particle, geometry.name)
