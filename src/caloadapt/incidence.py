"""Incidence direction of the incoming particle: the barrel angle convention (docs/inclined.md).

Angles are those of a particle coming from the interaction point of a collider detector whose
calorimeter is a barrel around the beam axis:

- ``theta_deg``: polar angle to the beam axis, in (0, 180) degrees;
- ``phi_deg``: azimuth around the beam axis, any value (taken modulo 360 degrees).

Normal incidence is ``theta = 90, phi = 90``: the particle flies along global +y into the barrel
module at the top, as the CaloClouds ILD photons (sample tag ``th90_ph90``) and the Par04 electrons of
the CaloChallenge (``/gun/direction 0 1 0``) do. The module hit is the one facing the particle's
azimuth: a face of a regular polygon of ``barrel_sides`` faces with normals at multiples of
360 / ``barrel_sides`` degrees (ILD: an octagon), or, with ``barrel_sides = 0``, a cylinder whose
normal always points along the particle's azimuth. So phi changes the direction in the module
only through the angle between the particle's azimuth and the face normal.

Every geometry's shower frame is that module's frame (:mod:`caloadapt.showers`): ``z`` depth along
the face normal, ``y`` along the beam axis, ``x`` across the module (global x for the top module;
the ILD layout's x, with y its z). In it the direction is

    d = (-sin(theta) sin(dphi), cos(theta), sin(theta) cos(dphi)),   dphi = phi - phi_face,

and the inclination to the layer normal is ``arccos(d_z)``. Every allowed angle enters through the
front face (``d_z > 0``); inclinations above :data:`MAX_INCLINATION_DEG` are refused.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .errors import InputError

__all__ = ["NORMAL_THETA_DEG", "NORMAL_PHI_DEG", "MAX_INCLINATION_DEG", "check_angles",
           "face_phi_deg", "local_direction", "inclination_deg", "angles_from_local_direction",
           "transverse_basis", "to_particle_frame", "from_particle_frame"]

#: polar angle of normal incidence (a particle perpendicular to the beam axis)
NORMAL_THETA_DEG = 90.0
#: azimuth of normal incidence: along global +y, the direction of the CaloClouds and Par04 guns
NORMAL_PHI_DEG = 90.0
#: largest inclination to the layer normal that is simulated: beyond it the particle grazes the
#: module, and a planar layer stack of finite width no longer describes what it crosses
MAX_INCLINATION_DEG = 80.0


def face_phi_deg(phi_deg: ArrayLike, barrel_sides: int) -> np.ndarray:
    """Azimuth in degrees of the normal of the barrel face that a particle of azimuth ``phi_deg`` hits.

    Faces of a regular ``barrel_sides``-gon have normals at multiples of 360 / ``barrel_sides``
    (as key4hep/DDML ``PolyhedraBarrelGeometry::phiSector`` numbers them); a cylinder
    (``barrel_sides = 0``) faces every particle head-on in azimuth.
    """
    phi = np.asarray(phi_deg, dtype=np.float64)
    if barrel_sides == 0:
        return phi
    step = 360.0 / barrel_sides
    return step * np.round(phi / step)


def check_angles(theta_deg: ArrayLike, phi_deg: ArrayLike, barrel_sides: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(theta_deg, phi_deg)`` float arrays of one shape; a clear error for angles refused.

    Raises :class:`InputError` for non-finite values, theta outside (0, 180) degrees (the particle
    would fly along the beam and never reach the barrel) and inclinations to the layer normal above
    :data:`MAX_INCLINATION_DEG`.
    """
    theta, phi = (np.array(a, dtype=np.float64) for a in np.broadcast_arrays(theta_deg, phi_deg))  # own copies
    if not (np.all(np.isfinite(theta)) and np.all(np.isfinite(phi))):
        raise InputError("incidence angles must be finite numbers (degrees)")
    if np.any((theta <= 0) | (theta >= 180)):
        bad = theta[(theta <= 0) | (theta >= 180)][0]
        raise InputError(f"theta={bad:g} degrees: the polar angle to the beam axis must lie strictly between "
                         "0 and 180 (normal incidence at 90)")
    inclination = inclination_deg(theta, phi, barrel_sides)
    if np.any(inclination > MAX_INCLINATION_DEG):
        i = int(np.argmax(inclination))
        raise InputError(f"theta={theta.flat[i]:g}, phi={phi.flat[i]:g} degrees hit the calorimeter at "
                         f"{inclination.flat[i]:.1f} degrees to its layer normal; at most {MAX_INCLINATION_DEG:g} "
                         "is simulated")
    return theta, phi


def local_direction(theta_deg: ArrayLike, phi_deg: ArrayLike, barrel_sides: int = 0) -> np.ndarray:
    """``(..., 3)`` unit direction of the particle in the shower frame (x, y, z = depth).

    Normal incidence gives exactly (0, 0, 1).
    """
    # elevation above the plane perpendicular to the beam: its sine and cosine are exactly 0 and 1
    # at theta = 90, so normal incidence is exact (np.cos(np.pi / 2) is 6e-17, not 0)
    elevation = np.radians(NORMAL_THETA_DEG - np.asarray(theta_deg, dtype=np.float64))
    dphi = np.radians(np.asarray(phi_deg, dtype=np.float64) - face_phi_deg(phi_deg, barrel_sides))
    sin_theta = np.cos(elevation)
    return np.stack([-sin_theta * np.sin(dphi), np.sin(elevation), sin_theta * np.cos(dphi)], axis=-1)


def inclination_deg(theta_deg: ArrayLike, phi_deg: ArrayLike, barrel_sides: int = 0) -> np.ndarray:
    """Angle in degrees between the particle direction and the layer normal."""
    return np.degrees(np.arccos(np.clip(local_direction(theta_deg, phi_deg, barrel_sides)[..., 2], -1.0, 1.0)))


def angles_from_local_direction(direction: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(theta_deg, phi_deg)`` of a shower-frame direction, for the module at the top (face at 90 degrees).

    The inverse of :func:`local_direction` up to the face: a direction only fixes phi relative to the
    face normal, so phi is returned as ``90 + dphi``.
    """
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    theta = np.degrees(np.arccos(np.clip(d[..., 1], -1.0, 1.0)))
    dphi = np.degrees(np.arctan2(-d[..., 0], d[..., 2]))
    return theta, NORMAL_PHI_DEG + dphi


def transverse_basis(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors u, v perpendicular to each ``(N, 3)`` direction: the particle frame's x and y axes.

    u lies in the plane of incidence (tilted out of the layer plane by the inclination), v in the
    layer plane; (u, v, direction) is right-handed. Normal incidence gives exactly u = (1, 0, 0) and
    v = (0, 1, 0), so the particle frame is then the shower frame itself, bit for bit.
    """
    sin_incl = np.hypot(direction[:, 0], direction[:, 1])
    cos_incl = direction[:, 2]
    tilted = sin_incl > 0
    cos_az = np.where(tilted, direction[:, 0] / np.where(tilted, sin_incl, 1.0), 1.0)
    sin_az = np.where(tilted, direction[:, 1] / np.where(tilted, sin_incl, 1.0), 0.0)
    u = np.stack([cos_incl * cos_az, cos_incl * sin_az, -sin_incl], axis=1)
    v = np.stack([-sin_az, cos_az, np.zeros_like(cos_az)], axis=1)
    return u, v


def to_particle_frame(points_mm: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``(P, 3)`` shower-frame points -> particle frame (along u, along v, along the direction), mm.

    ``direction`` is ``(P, 3)``, the direction of each point's particle; the origin (the impact
    point) is shared by both frames.
    """
    u, v = transverse_basis(direction)
    return np.stack([np.einsum("pi,pi->p", points_mm, u), np.einsum("pi,pi->p", points_mm, v),
                     np.einsum("pi,pi->p", points_mm, direction)], axis=1)


def from_particle_frame(points_mm: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_particle_frame`: particle-frame points back to the shower (detector) frame."""
    u, v = transverse_basis(direction)
    return points_mm[:, :1] * u + points_mm[:, 1:2] * v + points_mm[:, 2:3] * direction
