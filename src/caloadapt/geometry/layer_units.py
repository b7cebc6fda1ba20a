"""The ILD-style layer coordinate: depth in units of layers, ``layer + 0.5`` at a layer's cell centres.

The ILD photon files (and the box point frame of the models) give the depth of a point as this
coordinate; it maps piecewise linearly onto the depth in mm between the layer edges and centres.
"""

from __future__ import annotations

import numpy as np

from .geometry import Geometry

__all__ = ["layer_units_to_depth", "depth_to_layer_units"]


def _knots(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Matching (layer coordinate, depth mm) knots: layer edges and ``layer + 0.5`` at cell centres."""
    knots_u = np.concatenate([[0.0], np.arange(geometry.n_layers) + 0.5, [geometry.n_layers]])
    knots_z = np.concatenate([[geometry.layer_edges_mm[0]], geometry.layer_centres_mm, [geometry.layer_edges_mm[-1]]])
    return knots_u, knots_z


def layer_units_to_depth(geometry: Geometry, layer_u: np.ndarray) -> np.ndarray:
    """Depth in mm of an ILD-style layer coordinate (``layer + 0.5`` at the cell centre)."""
    knots_u, knots_z = _knots(geometry)
    return np.interp(layer_u, knots_u, knots_z)


def depth_to_layer_units(geometry: Geometry, depth_mm: np.ndarray) -> np.ndarray:
    """Inverse of :func:`layer_units_to_depth`."""
    knots_u, knots_z = _knots(geometry)
    return np.interp(depth_mm, knots_z, knots_u)
