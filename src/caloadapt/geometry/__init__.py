"""Detector geometries: materials, readout cells, voxelisation, built-in detectors by name.

Built in: ``ild-ecal`` (planar Si-W, the pre-training source), ``calochallenge-2`` and
``calochallenge-3`` (the Par04 cylinder of the CaloChallenge datasets), ``generic-mesh`` (a
cylindrical scoring mesh in X0 / Moliere-radius units), and the pre-training family
:data:`DETECTOR_FAMILY`: ``ild-ecal`` with ``crystal-pbwo4`` (homogeneous PbWO4),
``pb-scintillator`` (Pb / plastic scintillator), ``w-si-thick`` (4.2 mm W + 0.5 mm Si) and ``pb-lar``
(Pb / liquid argon, cylindrical mesh). :func:`geometry_descriptor` summarises any geometry in a
short vector for conditioning a generative model. Any YAML description or CaloChallenge-style
binning XML file can be given by path instead of a name.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from ..errors import GeometryError
from .calochallenge_xml import XMLBinning, parse_binning_xml
from .descriptor import (
    DESCRIPTOR_DIM,
    DESCRIPTOR_FIELDS,
    describe_geometry,
    geometry_descriptor,
)
from .geometry import EnergyScale, Geometry, ShowerParameters
from .materials import MATERIALS, Material, Mixture, Slab
from .readout import CylindricalReadout, PlanarReadout
from .spec import LOADED_GEOMETRIES, geometry_from_spec, geometry_from_yaml
from .stack import MaterialStack

__all__ = [
    "Geometry", "EnergyScale", "ShowerParameters", "MaterialStack", "Material", "Mixture", "Slab", "MATERIALS",
    "PlanarReadout", "CylindricalReadout", "XMLBinning", "parse_binning_xml",
    "BUILTIN_GEOMETRIES", "get_geometry", "geometry_from_spec", "geometry_from_yaml", "geometry_from_yaml_text",
    "DETECTOR_FAMILY", "DESCRIPTOR_FIELDS", "DESCRIPTOR_DIM", "describe_geometry", "geometry_descriptor",
]

#: detectors of different materials and sampling structures for pre-training on photons
DETECTOR_FAMILY = ("ild-ecal", "crystal-pbwo4", "pb-scintillator", "w-si-thick", "pb-lar")
BUILTIN_GEOMETRIES = ("ild-ecal", "calochallenge-2", "calochallenge-3", "generic-mesh") + DETECTOR_FAMILY[1:]


def _data_dir() -> Path:
    return Path(str(resources.files("caloadapt.geometry") / "data"))


@lru_cache(maxsize=None)
def _builtin(name: str) -> Geometry:
    return geometry_from_yaml(_data_dir() / f"{name}.yaml")


def get_geometry(name_or_path: str | Path | Geometry) -> Geometry:
    """A geometry by built-in name, YAML description file or CaloChallenge binning XML file.

    A binning XML gives the Par04 Si-W detector of the CaloChallenge read out with that binning
    (45 slices of 3.4 mm unless the file has another number of layers).
    """
    if isinstance(name_or_path, Geometry):
        return name_or_path
    text = str(name_or_path)
    if text in BUILTIN_GEOMETRIES:
        return _builtin(text)
    if text in LOADED_GEOMETRIES:  # a user geometry loaded earlier in this process
        return LOADED_GEOMETRIES[text]
    path = Path(text)
    if path.suffix.lower() in {".yaml", ".yml"}:
        return geometry_from_yaml(path)
    if path.suffix.lower() == ".xml":
        binning = parse_binning_xml(path)
        data = copy.deepcopy(_builtin("calochallenge-3").spec)
        data["name"] = path.stem
        data["description"] = f"Par04 Si-W read out with the binning of {path.name}"
        data["layers"]["n_layers"] = len(binning.r_edges_mm)
        data["layers"]["slice_mm"] = min(3.4, 153.0 / len(binning.r_edges_mm))
        data["readout"] = {"kind": "cylindrical", "binning_xml": str(path.resolve())}
        return geometry_from_spec(data, source=str(path))
    raise GeometryError(f"unknown geometry {text!r}; built-in geometries: {', '.join(BUILTIN_GEOMETRIES)}, "
                        "or give a .yaml description or a CaloChallenge binning .xml file")


def geometry_from_yaml_text(text: str, source: str = "file attributes") -> Geometry:
    """Rebuild a geometry from the YAML text stored in a shower file."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise GeometryError(f"malformed geometry description in {source}") from None
    if not isinstance(data, dict):
        raise GeometryError(f"malformed geometry description in {source}")
    if data.get("name") in BUILTIN_GEOMETRIES:
        return _builtin(data["name"])
    return geometry_from_spec(data, source=source)
