"""Materials and the effective quantities of material mixtures (sampling calorimeters).

Constants are the PDG values listed in the simulator reference §1.1; mixture rules follow §1.2
(mass-unit version, which fixes the dimensional inconsistency of the Geant4 GFlash code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import GeometryError

__all__ = ["Material", "MATERIALS", "Slab", "Mixture", "get_material", "E_S_MEV"]

#: scale energy of the Moliere radius, R_M = E_s X0 / E_c (simulator reference §1.2; Geant4 sampling, CMS)
E_S_MEV = 21.2


@dataclass(frozen=True)
class Material:
    """A pure material or compound with its PDG constants.

    Attributes:
        name: short name used in geometry files (``W``, ``Si``, ...).
        z: (effective) atomic number.
        a: (effective) mass number in g/mol.
        density_g_cm3: density in g/cm^3.
        x0_g_cm2: radiation length in g/cm^2.
        dedx_min_mev_cm2_g: minimum-ionising stopping power in MeV cm^2/g.
    """

    name: str
    z: float
    a: float
    density_g_cm3: float
    x0_g_cm2: float
    dedx_min_mev_cm2_g: float

    @property
    def x0_mm(self) -> float:
        """Radiation length in mm."""
        return 10.0 * self.x0_g_cm2 / self.density_g_cm3

    @property
    def critical_energy_mev(self) -> float:
        """GFlash critical energy E_c = 2.66 (X0 Z / A)^1.1 MeV with X0 in g/cm^2 (reference §1.1)."""
        return 2.66 * (self.x0_g_cm2 * self.z / self.a) ** 1.1

    @property
    def moliere_radius_mm(self) -> float:
        """Moliere radius R_M = E_s X0 / E_c in mm."""
        return E_S_MEV * self.x0_mm / self.critical_energy_mev


# simulator reference §1.1 (PDG constants); glue is modelled as air, as in the reference's ILD budget
MATERIALS: dict[str, Material] = {m.name: m for m in [
    Material("W", 74, 183.84, 19.30, 6.76, 1.145),
    Material("Si", 14, 28.0855, 2.329, 21.82, 1.664),
    Material("Pb", 82, 207.2, 11.35, 6.37, 1.122),
    Material("PbWO4", 68.36, 170.87, 8.30, 7.39, 1.255),
    Material("Fe", 26, 55.845, 7.874, 13.84, 1.451),
    Material("Cu", 29, 63.546, 8.96, 12.86, 1.403),
    Material("G10", 10.4, 20.8, 1.70, 33.0, 1.80),
    Material("C", 6, 12.011, 1.6, 42.70, 1.742),
    Material("Air", 7.3, 14.7, 1.205e-3, 36.62, 1.815),
    # plastic scintillator (polyvinyltoluene), PDG values quoted from memory: X0 43.90 g/cm^2, rho 1.032, <Z/A> 0.5414
    Material("Scintillator", 5.6, 10.3, 1.032, 43.90, 1.956),
    # liquid argon, PDG values quoted from memory: X0 19.55 g/cm^2, rho 1.396
    Material("LAr", 18, 39.948, 1.396, 19.55, 1.519),
]}


def get_material(name: str, extra: dict[str, Material] | None = None) -> Material:
    """Look a material up by name, first in ``extra`` (user-defined), then in :data:`MATERIALS`."""
    if extra and name in extra:
        return extra[name]
    if name in MATERIALS:
        return MATERIALS[name]
    known = sorted(set(MATERIALS) | set(extra or {}))
    raise GeometryError(f"unknown material {name!r}; known materials: {', '.join(known)}")


@dataclass(frozen=True)
class Slab:
    """A slab of one material along the shower axis."""

    material: Material
    thickness_mm: float
    active: bool = False

    @property
    def x0(self) -> float:
        """Thickness in radiation lengths."""
        return self.thickness_mm / self.material.x0_mm

    @property
    def mip_loss_mev(self) -> float:
        """Mean minimum-ionising energy loss crossing the slab, in MeV."""
        return self.material.dedx_min_mev_cm2_g * self.material.density_g_cm3 * self.thickness_mm / 10.0


@dataclass(frozen=True)
class Mixture:
    """Effective medium of a sequence of slabs (simulator reference §1.2).

    Attributes mirror the reference's notation: mass fractions w_i = rho_i d_i / sum rho_j d_j,
    1/X0_eff = sum w_i / X0_i (g/cm^2), S = sum w_i E_c,i / X0_i, E_c,eff = X0_eff S,
    R_M,eff = E_s / S, F_s = X0_eff[mm] / D.
    """

    z_eff: float
    a_eff: float
    density_g_cm3: float
    x0_mm: float
    critical_energy_mev: float
    moliere_radius_mm: float
    thickness_mm: float
    mip_fraction: float
    e_over_mip: float
    n_active: int
    has_passive: bool

    @property
    def has_active(self) -> bool:
        return self.n_active > 0

    @property
    def sampling_frequency(self) -> float:
        """F_s = X0_eff / D: the inverse of the number of X0 per sampling cell.

        The sampling cell thickness D is the mixed thickness per active slab.
        """
        return self.x0_mm * max(self.n_active, 1) / self.thickness_mm

    @property
    def is_sampling(self) -> bool:
        """True when the medium mixes active and passive material."""
        return self.has_active and self.has_passive

    @classmethod
    def of(cls, slabs: Sequence[Slab]) -> Mixture:
        """Mix the given slabs (pieces of slabs are allowed: pass their cut thickness)."""
        slabs = [s for s in slabs if s.thickness_mm > 0]
        if not slabs:
            raise GeometryError("cannot mix an empty sequence of material slabs")
        mass = [s.material.density_g_cm3 * s.thickness_mm for s in slabs]
        total_mass = sum(mass)
        w = [m / total_mass for m in mass]
        thickness = sum(s.thickness_mm for s in slabs)
        density = total_mass / thickness
        x0_g_cm2 = 1.0 / sum(wi / s.material.x0_g_cm2 for wi, s in zip(w, slabs))
        s_term = sum(wi * s.material.critical_energy_mev / s.material.x0_g_cm2 for wi, s in zip(w, slabs))
        mip_total = sum(s.mip_loss_mev for s in slabs)
        mip_active = sum(s.mip_loss_mev for s in slabs if s.active)
        n_active = sum(s.active for s in slabs)
        has_active = n_active > 0
        has_passive = any(not s.active for s in slabs)
        return cls(
            z_eff=sum(wi * s.material.z for wi, s in zip(w, slabs)),
            a_eff=sum(wi * s.material.a for wi, s in zip(w, slabs)),
            density_g_cm3=density,
            x0_mm=10.0 * x0_g_cm2 / density,
            critical_energy_mev=x0_g_cm2 * s_term,
            moliere_radius_mm=10.0 * (E_S_MEV / s_term) / density,
            thickness_mm=thickness,
            mip_fraction=mip_active / mip_total if has_active else 0.0,
            e_over_mip=_e_over_mip(slabs, mass) if has_active and has_passive else 1.0,
            n_active=n_active,
            has_passive=has_passive,
        )


def _e_over_mip(slabs: Sequence[Slab], mass: Sequence[float]) -> float:
    """e/mip = 1 / (1 + 0.007 (Z_passive - Z_active)) (reference §1.2, G4 and CMS).

    Z_passive and Z_active are those of the heaviest passive (absorber) and active materials by
    mass; PCB, glue and air in the gaps do not change the absorber (ILD gives 0.704 as Si-W).
    """
    passive = max((m, s.material.z) for m, s in zip(mass, slabs) if not s.active)[1]
    active = max((m, s.material.z) for m, s in zip(mass, slabs) if s.active)[1]
    return 1.0 / (1.0 + 0.007 * (passive - active))

