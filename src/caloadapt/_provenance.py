"""What every written result records about itself: plain JSON values, the library versions, the machine."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from . import __version__
from ._threads import usable_cores

__all__ = ["to_jsonable", "library_versions", "hardware_info", "available_bytes", "usable_cores"]

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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_gib(key: str) -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def available_bytes() -> float | None:
    gib = _meminfo_gib("MemAvailable")
    return None if gib is None else gib * 2**30


def hardware_info() -> dict:
    """Platform, CPU model, cores, memory, load average and GPUs of this machine."""
    physical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_model": _cpu_model(),
            "logical_cores": os.cpu_count(), "physical_cores": physical, "usable_cores": usable_cores(),
            "memory_gib": None if _meminfo_gib("MemTotal") is None else round(_meminfo_gib("MemTotal"), 1),
            "load_average": load, "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "gpus": gpus, "cuda": torch.version.cuda if torch.cuda.is_available() else None}
