"""Parser of the CaloChallenge binning XML files (``<Bins><Bin><Layer r_edges=.. n_bin_alpha=../>``)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._inputs import read_text_file
from ..errors import GeometryError

__all__ = ["XMLBinning", "parse_binning_xml"]


@dataclass(frozen=True)
class XMLBinning:
    """The binning of one particle in a CaloChallenge XML file.

    Attributes:
        particle: particle name of the ``<Bin>`` element (``electron``, ``photon``, ``pion``).
        pid: PDG code of the ``<Bin>`` element.
        r_edges_mm: radial bin edges per layer, mm (a single 0 edge marks a layer without cells).
        n_alpha: number of equal angular bins covering 2 pi, per layer.
    """

    particle: str
    pid: int
    r_edges_mm: tuple[np.ndarray, ...]
    n_alpha: tuple[int, ...]


def parse_binning_xml(source: str | Path, particle: str | None = None) -> XMLBinning:
    """Read a binning XML file or string; pick the ``<Bin>`` of ``particle`` (default: the first)."""
    text = str(source) if str(source).lstrip().startswith("<") else \
        read_text_file(source, "binning XML file", error=GeometryError)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise GeometryError(f"malformed binning XML {source}: {err}") from None
    bins = root.findall("Bin") if root.tag != "Bin" else [root]
    if particle is not None:
        bins = [b for b in bins if b.get("name") == particle]
    if not bins:
        raise GeometryError(f"binning XML {source} has no <Bin> element"
                            + (f" for particle {particle!r}" if particle else ""))
    element = bins[0]
    layers = element.findall("Layer")
    if not layers:
        raise GeometryError(f"binning XML {source} has no <Layer> elements")
    try:
        layers = sorted(layers, key=lambda lay: int(lay.get("id", "")))
        edges = tuple(np.array([float(v) for v in lay.get("r_edges", "").split(",")]) for lay in layers)
        n_alpha = tuple(int(lay.get("n_bin_alpha", "1")) for lay in layers)
        pid = int(element.get("pid", "0"))
    except ValueError as err:
        raise GeometryError(f"malformed binning XML {source}: {err}") from None
    return XMLBinning(element.get("name", ""), pid, edges, n_alpha)
