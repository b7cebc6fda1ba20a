"""What every written result records about itself: plain JSON values and the library versions."""

from __future__ import annotations

import dataclasses
import math
import platform
from importlib import metadata
from pathlib import Path

import numpy as np

from . import __version__

__all__ = ["to_jsonable", "library_versions"]

#: reported name -> distribution name of the libraries a result may depend on
_LIBRARIES = {"torch": "torch", "numpy": "numpy", "scipy": "scipy", "h5py": "h5py", "zuko": "zuko", "peft": "peft",
              "sklearn": "scikit-learn", "matplotlib": "matplotlib", "mplhep": "mplhep", "onnx": "onnx",
              "onnxruntime": "onnxruntime", "onnxscript": "onnxscript"}


def to_jsonable(value, *, nan_as_null: bool = True):
    """Plain JSON types: numpy scalars and arrays to Python, paths to str, dataclasses to dicts.

    With ``nan_as_null`` NaN and infinities become None (strict JSON); without, they stay floats
    (``json.dumps`` writes them as ``NaN``, which Python's reader reads back).
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, nan_as_null=nan_as_null) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, nan_as_null=nan_as_null) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), nan_as_null=nan_as_null)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if nan_as_null and not math.isfinite(value) else value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), nan_as_null=nan_as_null)
    return value


def library_versions() -> dict[str, str | None]:
    """Versions of Python, caloadapt and the libraries it uses (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "caloadapt": __version__}
    for name, distribution in _LIBRARIES.items():
        try:
            versions[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
