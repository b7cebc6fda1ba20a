"""Showers in memory and on disk: the ragged batch type and the file formats."""

from __future__ import annotations

from .io import FORMATS, ShowerWriter, detect_format, file_info, iter_showers, read_showers, write_showers
from ..showers import ENERGY, PARTICLES, X, Y, Z, Showers

__all__ = ["Showers", "PARTICLES", "X", "Y", "Z", "ENERGY", "FORMATS", "ShowerWriter", "detect_format",
           "file_info", "iter_showers", "read_showers", "write_showers"]
