"""Geometry descriptions in YAML: schema, validation and construction of a :class:`Geometry`.

A description lists the material slabs front to back (with ``repeat`` blocks), how readout
layers are cut (one per sensor, or equal slices in mm or X0), the transverse readout (planar grid,
cylindrical mesh from explicit edges, Moliere-radius units or a CaloChallenge binning XML), the
energy scale and the simulator settings. The built-in geometries are such files, shipped in
``caloadapt/geometry/data/``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .._inputs import read_text_file
from ..errors import GeometryError
from .calochallenge_xml import parse_binning_xml
from .geometry import EnergyScale, Geometry, ShowerParameters
from .materials import Material, Slab, get_material
from .readout import CylindricalReadout, PlanarReadout
from .stack import MaterialStack

__all__ = ["GeometrySpec", "geometry_from_spec", "geometry_from_yaml", "LOADED_GEOMETRIES"]

#: most entries (mappings, lists, values) a description may hold once YAML aliases are expanded: a
#: built-in one holds about a thousand; a chain of aliases can name billions in a few lines
MAX_ENTRIES = 100_000
#: most slabs a stack may expand to (a real calorimeter has a few hundred): a mistyped ``repeat`` is
#: refused instead of expanded until the memory runs out
MAX_SLABS = 100_000
#: most readout layers (the built-in geometries have 20 to 45)
MAX_LAYERS = 10_000

#: every geometry built in this process, by name, so showers naming a user geometry resolve
LOADED_GEOMETRIES: dict[str, Geometry] = {}


class _Strict(BaseModel):
    # a NaN or an infinity in a description is a typo: it would reach the showers as non-finite points
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class MaterialSpec(_Strict):
    z: float = Field(gt=0)
    a: float = Field(gt=0)
    density_g_cm3: float = Field(gt=0)
    x0_g_cm2: float = Field(gt=0)
    dedx_min_mev_cm2_g: float = Field(gt=0)


class SlabSpec(_Strict):
    material: str
    thickness_mm: float = Field(gt=0)
    active: bool = False


def _stack_item_kind(item) -> str:
    """A stack item with a ``repeat`` key is a repeat block, anything else a slab (so that an error
    inside one is reported for what it is, not as the other kind lacking its fields)."""
    keys = item if isinstance(item, dict) else vars(item) if isinstance(item, BaseModel) else {}
    return "repeat" if "repeat" in keys else "slab"


#: one entry of a stack: a slab or a repeat block
StackItem = Annotated[Union[Annotated[SlabSpec, Tag("slab")], Annotated["RepeatSpec", Tag("repeat")]],
                      Discriminator(_stack_item_kind)]


class RepeatSpec(_Strict):
    repeat: int = Field(ge=1)
    slabs: list[StackItem]


class LayerSpec(_Strict):
    segmentation: Literal["sensors", "slices"]
    slice_mm: float | None = Field(default=None, gt=0)
    slice_x0: float | None = Field(default=None, gt=0)
    n_layers: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_slice_unit(self) -> LayerSpec:
        if self.segmentation == "slices" and (self.slice_mm is None) == (self.slice_x0 is None):
            raise ValueError("slices need exactly one of slice_mm or slice_x0")
        return self


class LayerReadoutSpec(_Strict):
    """The cylindrical mesh of one layer, where layers differ."""
    r_edges_mm: list[float]
    n_alpha: int = Field(ge=1)


class ReadoutSpec(_Strict):
    kind: Literal["planar", "cylindrical"]
    pitch_mm: float | None = Field(default=None, gt=0)
    n_x: int | None = Field(default=None, ge=1)
    n_y: int | None = Field(default=None, ge=1)
    binning_xml: str | None = None
    r_edges_mm: list[float] | None = None
    layers: list[LayerReadoutSpec] | None = None
    n_r: int | None = Field(default=None, ge=1)
    dr_mm: float | None = Field(default=None, gt=0)
    dr_moliere: float | None = Field(default=None, gt=0)
    n_alpha: int | None = Field(default=None, ge=1)
    along_particle: bool = False


class EnergySpec(_Strict):
    e_vis: float | None = Field(default=None, gt=0)
    visible_fraction: float | None = Field(default=None, gt=0, le=1)
    calibration: float | Literal["inverse_visible_fraction"] = 1.0
    threshold_mev: float = Field(ge=0)

    @model_validator(mode="after")
    def _one_visible_scale(self) -> EnergySpec:
        if (self.e_vis is None) == (self.visible_fraction is None):
            raise ValueError("give exactly one of e_vis or visible_fraction")
        if self.calibration == "inverse_visible_fraction" and self.visible_fraction is None:
            raise ValueError("calibration 'inverse_visible_fraction' needs visible_fraction")
        return self


class ShowerSpec(_Strict):
    sampling_term: float = Field(gt=0)
    kappa: float = Field(default=1.5, gt=0)
    moyal_sigma: float = Field(default=0.1, ge=0)
    shape_layers: tuple[int, int] | None = None
    local_moliere: bool = True


class GeometrySpec(_Strict):
    name: str
    description: str = ""
    particle: Literal["electron", "photon", "positron"] = "electron"
    barrel_sides: int = Field(default=0, ge=0)
    materials: dict[str, MaterialSpec] = {}
    stack: list[StackItem]
    layers: LayerSpec
    readout: ReadoutSpec
    energy: EnergySpec
    shower: ShowerSpec


def _count_entries(data, limit: int) -> int:
    """Entries of parsed YAML as a tree (aliases counted where they are used), stopping past ``limit``."""
    seen: dict[int, int] = {}

    def count(node) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) not in seen:  # an alias is the same object: counted once, used many times
            children = node.values() if isinstance(node, dict) else node
            total = 1
            for child in children:
                total += count(child)
                if total > limit:
                    break
            seen[id(node)] = total
        return seen[id(node)]

    return count(data)


def _count_slabs(items) -> int:
    """Slabs of a stack once its repeat blocks are expanded (a Python integer: no overflow)."""
    return sum(item.repeat * _count_slabs(item.slabs) if isinstance(item, RepeatSpec) else 1 for item in items)


def _expand(items, materials: dict[str, Material]) -> list[Slab]:
    slabs: list[Slab] = []
    for item in items:
        if isinstance(item, RepeatSpec):
            slabs += _expand(item.slabs, materials) * item.repeat
        else:
            slabs.append(Slab(get_material(item.material, materials), item.thickness_mm, item.active))
    return slabs


def _layer_segmentation(spec: LayerSpec, stack: MaterialStack) -> tuple[np.ndarray, np.ndarray]:
    """Layer edges and cell-centre depths in mm."""
    if spec.segmentation == "sensors":
        sensors = stack.active_slabs_mm
        if len(sensors) == 0:
            raise GeometryError("a per-sensor readout needs active slabs in the stack")
        centres = sensors.mean(axis=1)
        # cells end half-way in X0 between consecutive sensor centres (simulator reference §6.1)
        t_centres = stack.x0_at(centres)
        inner = stack.depth_mm_at(0.5 * (t_centres[1:] + t_centres[:-1]))
        edges = np.concatenate([[0.0], inner, [stack.depth_mm]])
        if spec.n_layers is not None and spec.n_layers != len(centres):
            raise GeometryError(f"n_layers={spec.n_layers} but the stack has {len(centres)} sensors")
        return edges, centres
    slice_mm = spec.slice_mm if spec.slice_mm is not None else spec.slice_x0 * stack.mixture().x0_mm
    n_layers = spec.n_layers or math.floor(stack.depth_mm / slice_mm + 1e-9)
    if n_layers < 1:
        raise GeometryError(f"slices of {slice_mm:.3f} mm do not fit in a {stack.depth_mm:.3f} mm deep stack")
    if n_layers > MAX_LAYERS:
        raise GeometryError(f"{n_layers:,} readout layers (slices of {slice_mm:.3g} mm), more than the "
                            f"{MAX_LAYERS:,} caloadapt builds")
    edges = slice_mm * np.arange(n_layers + 1)
    return edges, 0.5 * (edges[1:] + edges[:-1])


def _readout(spec: ReadoutSpec, n_layers: int, moliere_radius_mm: float, base_dir: Path | None):
    if spec.kind == "planar":
        if None in (spec.pitch_mm, spec.n_x, spec.n_y):
            raise GeometryError("a planar readout needs pitch_mm, n_x and n_y")
        if spec.along_particle:
            raise GeometryError("along_particle needs a cylindrical readout (a mesh around the particle axis)")
        return PlanarReadout(n_layers, spec.pitch_mm, spec.n_x, spec.n_y)
    if spec.binning_xml is not None:
        path = Path(spec.binning_xml)
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        binning = parse_binning_xml(path)
        if len(binning.r_edges_mm) != n_layers:
            raise GeometryError(f"binning XML {path} has {len(binning.r_edges_mm)} layers, "
                                f"the depth segmentation {n_layers}")
        return CylindricalReadout(binning.r_edges_mm, binning.n_alpha, spec.along_particle)
    if spec.layers is not None:
        if len(spec.layers) != n_layers:
            raise GeometryError(f"readout lists {len(spec.layers)} layers, the depth segmentation {n_layers}")
        return CylindricalReadout(tuple(np.asarray(lay.r_edges_mm, float) for lay in spec.layers),
                                  tuple(lay.n_alpha for lay in spec.layers), spec.along_particle)
    if spec.n_alpha is None:
        raise GeometryError("a cylindrical readout needs n_alpha")
    if spec.r_edges_mm is not None:
        edges = spec.r_edges_mm
    elif spec.n_r is not None and (spec.dr_mm or spec.dr_moliere):
        dr = spec.dr_mm if spec.dr_mm is not None else spec.dr_moliere * moliere_radius_mm
        edges = dr * np.arange(spec.n_r + 1)
    else:
        raise GeometryError("a cylindrical readout needs binning_xml, r_edges_mm, or n_r with dr_mm/dr_moliere")
    return CylindricalReadout.uniform(n_layers, edges, spec.n_alpha, spec.along_particle)


def geometry_from_spec(data: dict, base_dir: Path | None = None, source: str = "geometry") -> Geometry:
    """Validate a geometry description (parsed YAML) and build the :class:`Geometry`."""
    if _count_entries(data, MAX_ENTRIES) > MAX_ENTRIES:
        raise GeometryError(f"invalid geometry description {source}: more than {MAX_ENTRIES:,} entries once its "
                            "YAML aliases are expanded")
    try:
        spec = GeometrySpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        value = first.get("input")
        got = f" (got {value!r})" if isinstance(value, (int, float, str, bool)) and first["type"] != "missing" else ""
        raise GeometryError(f"invalid geometry description {source}: {where}: {first['msg']}{got}") from None
    try:
        geometry = _build(spec, data, base_dir)
    except GeometryError as err:  # named after the description it comes from
        if source in str(err):
            raise
        raise GeometryError(f"invalid geometry description {source}: {err}") from None
    LOADED_GEOMETRIES[geometry.name] = geometry
    return geometry


def _build(spec: GeometrySpec, data: dict, base_dir: Path | None) -> Geometry:
    materials = {name: Material(name, m.z, m.a, m.density_g_cm3, m.x0_g_cm2, m.dedx_min_mev_cm2_g)
                 for name, m in spec.materials.items()}
    n_slabs = _count_slabs(spec.stack)
    if n_slabs > MAX_SLABS:
        raise GeometryError(f"the stack expands to {n_slabs:,} slabs, more than the {MAX_SLABS:,} caloadapt builds "
                            "(a mistyped repeat?)")
    stack = MaterialStack.of(_expand(spec.stack, materials))
    if not any(s.active for s in stack.slabs):
        raise GeometryError("the stack has no active slab")
    edges, centres = _layer_segmentation(spec.layers, stack)
    if edges[-1] > stack.depth_mm + 1e-6:
        raise GeometryError(f"readout layers end at {edges[-1]:.2f} mm, "
                            f"behind the {stack.depth_mm:.2f} mm deep stack")
    first, last = spec.shower.shape_layers or (0, len(centres) - 1)
    if not 0 <= first <= last < len(centres):
        raise GeometryError(f"shape_layers outside 0..{len(centres) - 1}")
    shape_region = (float(edges[first]), float(edges[last + 1]))
    shape_medium = stack.mixture(*shape_region)
    readout = _readout(spec.readout, len(centres), shape_medium.moliere_radius_mm, base_dir)
    e = spec.energy
    e_vis = e.e_vis if e.e_vis is not None else e.visible_fraction / (
        shape_medium.mip_fraction if shape_medium.has_passive else 1.0)
    calibration = 1.0 / e.visible_fraction if e.calibration == "inverse_visible_fraction" else float(e.calibration)
    resolved = copy.deepcopy(data)
    resolved["readout"] = readout.to_spec()  # self-contained: no file reference left
    return Geometry(
        name=spec.name, stack=stack, layer_edges_mm=edges, layer_centres_mm=centres, readout=readout,
        energy=EnergyScale(e_vis=e_vis, calibration=calibration, threshold_mev=e.threshold_mev),
        shower=ShowerParameters(spec.shower.sampling_term, spec.shower.kappa, spec.shower.moyal_sigma,
                                shape_region, spec.shower.local_moliere),
        particle=spec.particle, description=spec.description, barrel_sides=spec.barrel_sides, spec=resolved,
    )


def geometry_from_yaml(path: str | Path) -> Geometry:
    """Build a geometry from a YAML description file."""
    path = Path(path)
    try:
        data = yaml.safe_load(read_text_file(path, "geometry file", error=GeometryError))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise GeometryError(f"malformed YAML in geometry file {path}{where}") from None
    if not isinstance(data, dict):
        raise GeometryError(f"geometry file {path} must hold a mapping of geometry fields")
    return geometry_from_spec(data, base_dir=path.parent, source=str(path))
