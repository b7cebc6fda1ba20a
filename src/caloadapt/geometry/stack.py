"""The ordered list of material slabs along the shower axis and its depth <-> X0 mapping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import GeometryError
from .materials import Mixture, Slab

__all__ = ["MaterialStack"]


@dataclass(frozen=True)
class MaterialStack:
    """Slabs from the calorimeter front face (depth 0) to its back.

    GFlash develops showers in radiation lengths t; the stack maps t to physical depth by
    piecewise-linear interpolation over the slab boundaries (simulator reference §6.1).
    """

    slabs: tuple[Slab, ...]
    boundaries_mm: np.ndarray = field(init=False, repr=False, compare=False)
    boundaries_x0: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.slabs:
            raise GeometryError("a material stack needs at least one slab")
        if not all(np.isfinite(s.thickness_mm) and s.thickness_mm > 0 for s in self.slabs):
            raise GeometryError("every slab of a material stack needs a positive, finite thickness")
        object.__setattr__(self, "boundaries_mm",
                           np.concatenate([[0.0], np.cumsum([s.thickness_mm for s in self.slabs])]))
        object.__setattr__(self, "boundaries_x0", np.concatenate([[0.0], np.cumsum([s.x0 for s in self.slabs])]))

    @classmethod
    def of(cls, slabs: Sequence[Slab]) -> MaterialStack:
        return cls(tuple(slabs))

    @property
    def depth_mm(self) -> float:
        """Total depth in mm."""
        return float(self.boundaries_mm[-1])

    @property
    def depth_x0(self) -> float:
        """Total depth in radiation lengths."""
        return float(self.boundaries_x0[-1])

    def depth_mm_at(self, t_x0: np.ndarray) -> np.ndarray:
        """Physical depth in mm of depth ``t_x0`` in radiation lengths from the front."""
        return np.interp(t_x0, self.boundaries_x0, self.boundaries_mm)

    def x0_at(self, depth_mm: np.ndarray) -> np.ndarray:
        """Depth in radiation lengths of physical depth ``depth_mm`` from the front."""
        return np.interp(depth_mm, self.boundaries_mm, self.boundaries_x0)

    @property
    def active_slabs_mm(self) -> np.ndarray:
        """``(n_active, 2)`` front and back depth in mm of each active slab, front to back."""
        index = [i for i, s in enumerate(self.slabs) if s.active]
        return np.stack([self.boundaries_mm[index], self.boundaries_mm[np.add(index, 1)]], axis=1) \
            if index else np.zeros((0, 2))

    def slabs_between(self, start_mm: float, stop_mm: float) -> list[Slab]:
        """The material in ``[start_mm, stop_mm)``, cutting slabs at the edges pro rata."""
        pieces = []
        for slab, front, back in zip(self.slabs, self.boundaries_mm[:-1], self.boundaries_mm[1:]):
            overlap = min(back, stop_mm) - max(front, start_mm)
            if overlap > 1e-12:
                pieces.append(Slab(slab.material, overlap, slab.active))
        return pieces

    def mixture(self, start_mm: float = 0.0, stop_mm: float | None = None) -> Mixture:
        """Effective medium of the material in ``[start_mm, stop_mm)`` (default: the whole stack)."""
        stop_mm = self.depth_mm if stop_mm is None else stop_mm
        pieces = self.slabs_between(start_mm, stop_mm)
        if not pieces:
            raise GeometryError(f"no material between {start_mm:.3f} and {stop_mm:.3f} mm")
        return Mixture.of(pieces)

    @property
    def sensor_mip_mev(self) -> float:
        """Mean mip energy loss in one (the first) active slab, in MeV (Mode B spot energy unit)."""
        for slab in self.slabs:
            if slab.active:
                return slab.mip_loss_mev
        raise GeometryError("the material stack has no active slab")
