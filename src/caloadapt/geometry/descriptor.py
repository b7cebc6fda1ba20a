"""A short fixed-length vector that tells a generative model which detector it simulates.

:func:`describe_geometry` gives the raw physical quantities; :func:`geometry_descriptor` maps each
with a fixed rule (no fitted normalisation, so an unseen detector maps the same way) to numbers of
order one. The built-in geometries and plausible electromagnetic calorimeters land within
``[-3, 3]`` (:data:`DESCRIPTOR_RANGE`).

=====================  =================================================  ==============================
field                  physical quantity [unit]                           transform
=====================  =================================================  ==============================
``log_x0``             X0 of the shower (shape) medium [mm]               ln(X0 / 10 mm)
``log_moliere``        Moliere radius of the shape medium [mm]            ln(R_M / 20 mm)
``log_ec``             critical energy of the shape medium [MeV]          ln(E_c / 10 MeV)
``log_visible``        visible / deposited energy, X0-weighted over the   log10(f_vis) + 1
                       readout layers (e_vis * f_mip; 1 if homogeneous)
``log_cell_scale``     readout MeV per deposited MeV                      log10(calibration * f_vis)
                       (calibration * f_vis)
``log_threshold``      cell threshold in mips of one sensor               log10(max(thr, 1e-3))
``log_layer_x0``       mean readout-layer thickness [X0]                  ln(t_layer / 1 X0)
``log_cell_moliere``   transverse cell size [R_M]: planar pitch, or       ln(size / 0.25)
                       median inner radial bin width (cylindrical)
``azimuth``            azimuthal segmentation 2 pi / n_alpha [rad]        2 sqrt(d_alpha / 2 pi)
                       (0 for planar: no azimuthal cells)                 (= 2 / sqrt(n_alpha))
``log_extent_moliere`` transverse half-extent of the readout [R_M]        ln(extent / 4)
                       (planar: half the narrower side; cylindrical:
                       median outer radius)
``n_layers``           number of readout layers                           n / 50
``readout_kind``       0 planar, 1 cylindrical                            identity
``active_depth``       front of first to back of last readout layer [X0]  depth / 25 X0
``front_offset``       material in front of the first readout layer [X0]  offset / 1 X0
=====================  =================================================  ==============================
"""

from __future__ import annotations

import weakref

import numpy as np

from .geometry import Geometry

__all__ = ["DESCRIPTOR_DIM", "DESCRIPTOR_FIELDS", "DESCRIPTOR_RANGE", "describe_geometry", "geometry_descriptor"]

DESCRIPTOR_FIELDS: tuple[str, ...] = (
    "log_x0", "log_moliere", "log_ec", "log_visible", "log_cell_scale", "log_threshold", "log_layer_x0",
    "log_cell_moliere", "azimuth", "log_extent_moliere", "n_layers", "readout_kind", "active_depth",
    "front_offset",
)
DESCRIPTOR_DIM: int = len(DESCRIPTOR_FIELDS)
#: bounds every component stays within for the built-in geometries and plausible calorimeters
DESCRIPTOR_RANGE: tuple[float, float] = (-3.0, 3.0)

#: lowest threshold (in sensor mips) the descriptor resolves; a zero threshold maps here
_MIN_THRESHOLD_MIP = 1e-3

_CACHE: weakref.WeakKeyDictionary[Geometry, np.ndarray] = weakref.WeakKeyDictionary()


def _visible_fraction(geometry: Geometry) -> float:
    """Visible / deposited energy averaged over the readout layers, weighted by their X0."""
    layer_x0 = np.diff(geometry.stack.x0_at(geometry.layer_edges_mm))
    return float(np.average(geometry.layer_visible_fraction, weights=layer_x0))


def _transverse_cells_mm(geometry: Geometry) -> tuple[float, float, float]:
    """(cell size mm, azimuthal bin rad, half-extent mm) of the transverse readout."""
    readout = geometry.readout
    if readout.kind == "planar":
        return readout.pitch_mm, 0.0, 0.5 * min(readout.n_x, readout.n_y) * readout.pitch_mm
    layers = [(edges, n) for edges, n in zip(readout.r_edges_mm, readout.n_alpha) if len(edges) > 1]
    inner_mm = float(np.median([edges[1] - edges[0] for edges, _ in layers]))
    azimuth_rad = float(np.median([2 * np.pi / n for _, n in layers]))
    return inner_mm, azimuth_rad, float(np.median([edges[-1] for edges, _ in layers]))


def describe_geometry(geometry: Geometry) -> dict[str, float]:
    """Raw physical quantities of a geometry, the units in the key names.

    The shower medium is the geometry's shape medium (what the simulator develops showers in);
    the visible fraction is what the simulator applies layer by layer (``layer_visible_fraction``).
    """
    rm_mm = geometry.moliere_radius_mm
    f_vis = _visible_fraction(geometry)
    cell_mm, azimuth_rad, extent_mm = _transverse_cells_mm(geometry)
    front_x0, back_x0 = geometry.stack.x0_at(geometry.layer_edges_mm[[0, -1]])
    mip_readout_mev = geometry.energy.calibration * geometry.stack.sensor_mip_mev
    raw = {
        "x0_mm": geometry.x0_mm,
        "moliere_radius_mm": rm_mm,
        "critical_energy_mev": geometry.critical_energy_mev,
        "visible_fraction": f_vis,
        "readout_mev_per_deposited_mev": geometry.energy.calibration * f_vis,
        "threshold_sensor_mips": geometry.energy.threshold_mev / mip_readout_mev,
        "layer_thickness_x0": (back_x0 - front_x0) / geometry.n_layers,
        "cell_size_moliere": cell_mm / rm_mm,
        "cell_azimuth_rad": azimuth_rad,
        "readout_extent_moliere": extent_mm / rm_mm,
        "n_layers": float(geometry.n_layers),
        "readout_kind": 0.0 if geometry.readout.kind == "planar" else 1.0,
        "active_depth_x0": back_x0 - front_x0,
        "front_offset_x0": front_x0,
    }
    return {key: float(value) for key, value in raw.items()}


def _transform(raw: dict[str, float]) -> np.ndarray:
    """The fixed map of the module table, in the order of :data:`DESCRIPTOR_FIELDS`."""
    return np.array([
        np.log(raw["x0_mm"] / 10.0),
        np.log(raw["moliere_radius_mm"] / 20.0),
        np.log(raw["critical_energy_mev"] / 10.0),
        np.log10(raw["visible_fraction"]) + 1.0,
        np.log10(raw["readout_mev_per_deposited_mev"]),
        np.log10(max(raw["threshold_sensor_mips"], _MIN_THRESHOLD_MIP)),
        np.log(raw["layer_thickness_x0"]),
        np.log(raw["cell_size_moliere"] / 0.25),
        2.0 * np.sqrt(raw["cell_azimuth_rad"] / (2 * np.pi)),
        np.log(raw["readout_extent_moliere"] / 4.0),
        raw["n_layers"] / 50.0,
        raw["readout_kind"],
        raw["active_depth_x0"] / 25.0,
        raw["front_offset_x0"],
    ], dtype=np.float32)


def geometry_descriptor(geometry: Geometry) -> np.ndarray:
    """``(DESCRIPTOR_DIM,)`` float32 descriptor of the geometry (cached per geometry object)."""
    cached = _CACHE.get(geometry)
    if cached is None:
        cached = _transform(describe_geometry(geometry))
        _CACHE[geometry] = cached
    return cached.copy()
