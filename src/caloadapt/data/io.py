"""Shower files: the package's point-cloud HDF5, the ILD (CaloClouds) layout and the CaloChallenge layout.

========================  ==================================================================
format                    content
========================  ==================================================================
``points`` (default)      ``points`` (P, 4) float32 x, y, z [mm], energy [MeV]; ``offsets``
                          (N + 1,); ``incident_energy_mev`` (N,); ``meta/*``; units, particle
                          and geometry (name and YAML description) as attributes; chunked, LZF
``ild``                   ``events`` (N, 4, M) float32 zero-padded at the start, features
                          (x [mm], layer + position in layer, z [mm], energy [GeV]);
                          ``energy`` (N, 1) incident energy [GeV] (CaloClouds);
                          ``p_norm_local`` (N, 3) unit direction of the particle in the local
                          shower frame (beam axis, x, depth), as in the CaloClouds-3 angular files
``calochallenge``         ``incident_energies`` (N, 1) [MeV]; ``showers`` (N, cells) [MeV] in
                          (layer, alpha, r) order, cells below threshold zeroed;
                          ``incident_theta_deg``, ``incident_phi_deg`` (N, 1) [degrees]
========================  ==================================================================

Incidence angles (docs/inclined.md) are ``meta/theta_deg`` and ``meta/phi_deg`` in the points
format. A file without them holds showers at normal incidence (theta = phi = 90 degrees); the
ILD and CaloChallenge writers add their angle datasets only once a shower is not at normal
incidence, so normal-incidence files keep exactly the layout of the published data sets.

The format is detected from the keys on reading. Every writer writes a temporary file and renames
it when complete, so an interrupted run never leaves a partial file under the target name.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import yaml

from .. import __version__
from .._atomic import atomic_path
from .._inputs import input_file, wrong_kind
from .._signals import deferred_termination
from ..errors import CaloadaptError, InputError, OutputError
from ..geometry import Geometry, geometry_from_yaml_text, get_geometry
from ..incidence import NORMAL_PHI_DEG, NORMAL_THETA_DEG, angles_from_local_direction, local_direction
from ..geometry.layer_units import depth_to_layer_units, layer_units_to_depth
from ..showers import ENERGY, PARTICLES, Showers

__all__ = ["FORMATS", "detect_format", "read_showers", "iter_showers", "write_showers", "ShowerWriter",
           "file_info", "file_geometry", "count_showers", "ILD_IMPACT_MM", "ILD_DIRECTION_KEY",
           "CALOCHALLENGE_ANGLE_KEYS"]

FORMATS = ("points", "ild", "calochallenge")
#: impact point of the CaloClouds ILD photons in the (x, z) plane, mm (CaloClouds-2 cfg.origin)
ILD_IMPACT_MM = (0.0, 40.0)
#: ILD layout: direction of the particle in the CaloClouds-3 local frame (FLC-QU-hep/CaloClouds-3,
#: pointcloud/data/dataset.py ``PointCloudAngular``; frame in metadata.md, ``orientation``)
ILD_DIRECTION_KEY = "p_norm_local"
#: CaloChallenge layout: incidence angles in degrees, (N, 1) like ``incident_energies``
CALOCHALLENGE_ANGLE_KEYS = ("incident_theta_deg", "incident_phi_deg")
_CALOCHALLENGE_GEOMETRY = {6480: "calochallenge-2", 40500: "calochallenge-3"}


#: bytes of dense rows (CaloChallenge voxels, ILD's padded hits) turned into hits at once: a chunk of
#: 1000 showers of a readout of 10^7 cells would be 80 GB as float64 voxels, its hits a few MB
DENSE_READ_BYTES = 256 * 2**20


# -- opening and detection -------------------------------------------------------------------
def _open(path: str | os.PathLike[str]) -> h5py.File:
    if not os.path.lexists(path):
        raise InputError(f"{path}: no such file")
    path = input_file(path, "shower file")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise InputError(wrong_kind(path, "shower file (HDF5)", expected=("HDF5",))
                         or f"{path}: not an HDF5 file (or unreadable)") from None


def _format_of(f: h5py.File, path) -> str:
    keys = set(f.keys())
    if f.attrs.get("format") == "caloadapt-points" or {"points", "offsets"} <= keys:
        return "points"
    if {"events", "energy"} <= keys:
        return "ild"
    if {"incident_energies", "showers"} <= keys:
        return "calochallenge"
    raise InputError(f"{path}: unknown shower file layout with keys {sorted(keys) or 'none'}; expected "
                     "points/offsets (caloadapt), events/energy (ILD) or incident_energies/showers (CaloChallenge)")


def detect_format(path: str | os.PathLike[str]) -> str:
    """``points``, ``ild`` or ``calochallenge``, from the keys of the file."""
    with _open(path) as f:
        return _format_of(f, path)


def _dataset(f: h5py.File, key: str, ndim: int, path) -> h5py.Dataset:
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise InputError(f"{path}: missing dataset {key!r}")
    if f[key].ndim != ndim:
        raise InputError(f"{path}: dataset {key!r} has shape {f[key].shape}, expected {ndim} dimensions")
    return f[key]


def _check_dtype(dataset: h5py.Dataset, what: str, path, integer: bool = False) -> None:
    """Numbers only (integers for offsets): strings, compounds or complex values are refused."""
    kinds = "iu" if integer else "iuf"
    if dataset.dtype.kind not in kinds:
        expected = "integers" if integer else "real numbers"
        raise InputError(f"{path}: dataset {what!r} holds {dataset.dtype} values, expected {expected}")


def _check_values(values: np.ndarray, what: str, path, positive: bool = False) -> None:
    if not np.all(np.isfinite(values)):
        raise InputError(f"{path}: {what} contain NaN or infinite values")
    if np.any(values < 0) or (positive and np.any(values <= 0)):
        raise InputError(f"{path}: {what} must be {'positive' if positive else 'non-negative'}")


def _check_finite(values: np.ndarray, what: str, path) -> None:
    if not np.all(np.isfinite(values)):
        raise InputError(f"{path}: {what} contain NaN or infinite values")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _read_dataset(dataset: h5py.Dataset, index, path, what: str) -> np.ndarray:
    try:
        return dataset[index]
    except (OSError, RuntimeError, ValueError) as err:
        raise InputError(f"{path}: cannot read {what}: corrupt or truncated data ({_first_line(err)})") from None


# -- per-format readers (rows [start, stop)) --------------------------------------------------
class _Reader:
    """Random access to the showers of one file, whatever its layout."""

    def __init__(self, path, geometry: Geometry | str | None, smear: bool, seed: int | None):
        self.path = Path(path)
        self.file = _open(path)
        self.smear, self.rng = smear, np.random.default_rng(seed)
        self.particle = "electron"
        self.rows_per_read = sys.maxsize  # dense layouts read fewer rows at once (DENSE_READ_BYTES)
        try:
            self.format = _format_of(self.file, path)
            getattr(self, f"_init_{self.format}")(geometry)
            if self.n == 0:
                raise InputError(f"{path}: file holds no showers")
        except BaseException:
            self.file.close()
            raise

    def _init_points(self, geometry) -> None:
        f = self.file
        self.points = _dataset(f, "points", 2, self.path)
        offsets = _dataset(f, "offsets", 1, self.path)
        self.energy = _dataset(f, "incident_energy_mev", 1, self.path)
        _check_dtype(self.points, "points", self.path)
        _check_dtype(offsets, "offsets", self.path, integer=True)
        _check_dtype(self.energy, "incident_energy_mev", self.path)
        self.offsets = _read_dataset(offsets, slice(None), self.path, "offsets").astype(np.int64)
        if "meta" in f:
            for key, value in f["meta"].items():
                if not isinstance(value, h5py.Dataset) or value.ndim != 1:
                    raise InputError(f"{self.path}: meta/{key} must be a 1-D dataset")
                _check_dtype(value, f"meta/{key}", self.path)
        self.n = len(self.energy)
        if self.points.shape[1] != 4 or len(self.offsets) != self.n + 1 or self.offsets[-1] != len(self.points):
            raise InputError(f"{self.path}: points {self.points.shape}, offsets {self.offsets.shape} and "
                             f"{self.n} incident energies do not fit together")
        if self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0):
            raise InputError(f"{self.path}: offsets must start at 0 and never decrease")
        self.particle = str(f.attrs.get("particle", "electron"))
        if self.particle not in PARTICLES:
            raise InputError(f"{self.path}: unknown particle {self.particle!r} in the file; expected one of "
                             f"{', '.join(sorted(PARTICLES))}")
        stored = f.attrs.get("geometry_spec")
        self.geometry = get_geometry(geometry) if geometry is not None else (
            geometry_from_yaml_text(stored, str(self.path)) if stored is not None
            else get_geometry(str(f.attrs.get("geometry", "ild-ecal"))))

    def _init_ild(self, geometry) -> None:
        self.events = _dataset(self.file, "events", 3, self.path)
        self.energy = _dataset(self.file, "energy", 2, self.path)
        _check_dtype(self.events, "events", self.path)
        _check_dtype(self.energy, "energy", self.path)
        self.n = len(self.events)
        self.rows_per_read = max(1, DENSE_READ_BYTES // (8 * int(np.prod(self.events.shape[1:]))))
        if self.events.shape[1] != 4 or self.energy.shape != (self.n, 1):
            raise InputError(f"{self.path}: ILD layout needs events (N, 4, M) and energy (N, 1), got "
                             f"{self.events.shape} and {self.energy.shape}")
        self.particle = "photon"
        self.geometry = get_geometry(geometry if geometry is not None else "ild-ecal")
        self.direction = None
        if ILD_DIRECTION_KEY in self.file:
            self.direction = _dataset(self.file, ILD_DIRECTION_KEY, 2, self.path)
            _check_dtype(self.direction, ILD_DIRECTION_KEY, self.path)
            if self.direction.shape != (self.n, 3):
                raise InputError(f"{self.path}: {ILD_DIRECTION_KEY} has shape {self.direction.shape}, "
                                 f"expected ({self.n}, 3)")

    def _init_calochallenge(self, geometry) -> None:
        self.showers = _dataset(self.file, "showers", 2, self.path)
        self.energy = _dataset(self.file, "incident_energies", 2, self.path)
        _check_dtype(self.showers, "showers", self.path)
        _check_dtype(self.energy, "incident_energies", self.path)
        self.n = len(self.showers)
        n_cells = self.showers.shape[1]
        self.rows_per_read = max(1, DENSE_READ_BYTES // (8 * n_cells))
        if self.energy.shape != (self.n, 1):
            raise InputError(f"{self.path}: incident_energies has shape {self.energy.shape}, expected ({self.n}, 1)")
        if geometry is None:
            if n_cells not in _CALOCHALLENGE_GEOMETRY:
                raise InputError(f"{self.path}: {n_cells} voxels per shower match no built-in geometry; "
                                 "give --geometry")
            geometry = _CALOCHALLENGE_GEOMETRY[n_cells]
        self.geometry = get_geometry(geometry)
        if n_cells != self.geometry.n_cells:
            raise InputError(f"{self.path}: {n_cells} voxels per shower, but geometry "
                             f"{self.geometry.name!r} has {self.geometry.n_cells}")
        present = [key in self.file for key in CALOCHALLENGE_ANGLE_KEYS]
        if any(present) and not all(present):
            raise InputError(f"{self.path}: has only one of {' and '.join(CALOCHALLENGE_ANGLE_KEYS)}")
        self.angles = None
        if all(present):
            self.angles = [_dataset(self.file, key, 2, self.path) for key in CALOCHALLENGE_ANGLE_KEYS]
            for key, dataset in zip(CALOCHALLENGE_ANGLE_KEYS, self.angles):
                _check_dtype(dataset, key, self.path)
                if dataset.shape != (self.n, 1):
                    raise InputError(f"{self.path}: {key} has shape {dataset.shape}, expected ({self.n}, 1)")

    def read(self, start: int, stop: int) -> Showers:
        try:
            read = getattr(self, f"_read_{self.format}")
            parts = [read(first, min(first + self.rows_per_read, stop))
                     for first in range(start, stop, self.rows_per_read)]
            showers = parts[0] if len(parts) == 1 else Showers.concatenate(parts)
            # smeared once for the whole chunk: the same points however many reads it took
            return self.geometry.smear_hits(showers, self.rng) if self.smear and self.format == "calochallenge" \
                else showers
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:  # h5py: corrupt chunks, filters
            raise InputError(f"{self.path}: cannot read showers {start}..{stop - 1}: corrupt or truncated data "
                             f"({_first_line(err)})") from None

    def read_indices(self, indices: np.ndarray) -> Showers:
        """Showers at sorted, unique ``indices``, read as runs of consecutive rows."""
        indices = np.asarray(indices, np.int64)
        if len(indices) == 0 or np.any(np.diff(indices) <= 0) or indices[0] < 0 or indices[-1] >= self.n:
            raise InputError(f"{self.path}: shower indices must be sorted, unique and in 0..{self.n - 1}")
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        runs = np.split(indices, breaks)
        return Showers.concatenate([self.read(int(r[0]), int(r[-1]) + 1) for r in runs])

    def _read_points(self, start: int, stop: int) -> Showers:
        p0, p1 = self.offsets[start], self.offsets[stop]
        points = self.points[p0:p1]
        energy = self.energy[start:stop]
        _check_values(points[:, ENERGY], "point energies", self.path)
        _check_finite(points[:, :ENERGY], "point coordinates", self.path)
        _check_values(energy, "incident energies", self.path, positive=True)
        meta = {k: v[start:stop] for k, v in self.file["meta"].items()} if "meta" in self.file else {}
        return Showers(points, self.offsets[start:stop + 1] - p0, energy, self.particle, self.geometry.name, meta)

    def _read_ild(self, start: int, stop: int) -> Showers:
        events = np.asarray(self.events[start:stop], dtype=np.float64)  # (n, 4, M)
        energy_gev = np.asarray(self.energy[start:stop, 0], dtype=np.float64)
        _check_values(events[:, 3], "hit energies", self.path)
        _check_values(energy_gev, "incident energies", self.path, positive=True)
        mask = events[:, 3] > 0
        _check_finite(events[:, :3].transpose(0, 2, 1)[mask], "hit coordinates", self.path)
        x, layer_u, z, e = (events[:, k][mask] for k in range(4))
        points = np.stack([x - ILD_IMPACT_MM[0], z - ILD_IMPACT_MM[1],
                           layer_units_to_depth(self.geometry, layer_u), 1000.0 * e], axis=1)
        meta = {}
        if self.direction is not None:
            local = np.asarray(self.direction[start:stop], dtype=np.float64)
            _check_finite(local, ILD_DIRECTION_KEY, self.path)
            if np.any(local[:, 2] <= 0):
                raise InputError(f"{self.path}: {ILD_DIRECTION_KEY} holds directions that do not enter the "
                                 "calorimeter through its front (depth component <= 0)")
            # CaloClouds-3 local (beam, x, depth) -> shower frame (x, beam, depth)
            meta["theta_deg"], meta["phi_deg"] = angles_from_local_direction(local[:, [1, 0, 2]])
        return Showers.from_counts(points, mask.sum(axis=1), 1000.0 * energy_gev, particle=self.particle,
                                   geometry=self.geometry.name, meta=meta)

    def _read_calochallenge(self, start: int, stop: int) -> Showers:
        voxels = np.asarray(self.showers[start:stop], dtype=np.float64)
        energy = np.asarray(self.energy[start:stop, 0], dtype=np.float64)
        _check_values(voxels, "voxel energies", self.path)
        _check_values(energy, "incident energies", self.path, positive=True)
        showers = self.geometry.points_from_voxels(voxels, energy, "electron")
        if self.angles is not None:
            for key, name, dataset in zip(CALOCHALLENGE_ANGLE_KEYS, ("theta_deg", "phi_deg"), self.angles):
                values = np.asarray(dataset[start:stop, 0], dtype=np.float64)
                _check_finite(values, key, self.path)
                showers.meta[name] = values
        return showers

    def close(self) -> None:
        self.file.close()


def iter_showers(path: str | os.PathLike[str], geometry: Geometry | str | None = None, *,
                 chunk_size: int = 1000, start: int = 0, stop: int | None = None,
                 smear: bool = False, seed: int | None = None) -> Iterator[Showers]:
    """Read showers chunk by chunk, never holding more than ``chunk_size`` showers in memory.

    Args:
        path: a shower file of any supported layout.
        geometry: geometry of the showers; default: recorded in the file (``points``), ``ild-ecal``
            (``ild``), or found from the number of voxels (``calochallenge``).
        chunk_size: showers per chunk.
        start, stop: read only showers ``[start, stop)``.
        smear: for voxel files, place points uniformly inside their cells instead of at centres.
        seed: seed of the smearing.
    """
    reader = _Reader(path, geometry, smear, seed)
    try:
        stop = reader.n if stop is None else min(stop, reader.n)
        for first in range(start, stop, chunk_size):
            yield reader.read(first, min(first + chunk_size, stop))
    finally:
        reader.close()


def read_showers(path: str | os.PathLike[str], geometry: Geometry | str | None = None, *,
                 indices: np.ndarray | None = None, **kwargs) -> Showers:
    """Read showers (all, ``start``/``stop``, or sorted ``indices``) into one batch; see :func:`iter_showers`."""
    if indices is not None:
        reader = _Reader(path, geometry, kwargs.get("smear", False), kwargs.get("seed"))
        try:
            return reader.read_indices(indices)
        finally:
            reader.close()
    chunks = list(iter_showers(path, geometry, chunk_size=kwargs.pop("chunk_size", 10_000), **kwargs))
    if not chunks:
        raise InputError(f"{path}: no showers in the requested range")
    return Showers.concatenate(chunks)


# -- writing ---------------------------------------------------------------------------------
class _OutputFile(io.RawIOBase):
    """The file HDF5 writes through (h5py's ``fileobj`` driver), keeping the first write error.

    HDF5 cannot recover from a failed write: its library state is broken and closing the file
    can crash the interpreter. So after the first failure (a full disk, a quota, an I/O error)
    this file only pretends to write, HDF5 finishes and closes cleanly, and the writer reports
    :attr:`error` and discards the temporary file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__()
        self.raw = open(path, "r+b", buffering=0)  # noqa: SIM115 (closed in close())
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer) -> int:
        return self.raw.readinto(buffer)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += self.raw.write(view[done:])
                return len(view)
            except OSError as err:
                self.error = err
        self.raw.seek(len(view), os.SEEK_CUR)  # after a failure: pretend, so that HDF5 stays consistent
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.raw.truncate(size)
            except OSError as err:
                self.error = err
        return self.tell() if size is None else size

    def flush(self) -> None:
        pass  # unbuffered

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


class ShowerWriter:
    """Append showers chunk by chunk to a new file; it appears under its name only on success.

    Use as a context manager::

        with ShowerWriter("out.h5", "calochallenge", geometry) as writer:
            for chunk in chunks:
                writer.append(chunk)
    """

    def __init__(self, path: str | os.PathLike[str], format: str = "points",
                 geometry: Geometry | str | None = None, attrs: dict | None = None):
        if format not in FORMATS:
            raise InputError(f"unknown output format {format!r}; expected one of {', '.join(FORMATS)}")
        self.path, self.format = Path(path), format
        self.geometry = get_geometry(geometry) if geometry is not None else None
        self.attrs = attrs or {}
        self.n = 0

    def __enter__(self) -> ShowerWriter:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        try:
            self._output = _OutputFile(tmp)
            with deferred_termination():  # HDF5 writes through Python code: never interrupt it inside
                self.file = h5py.File(self._output, "w")
        except (OSError, RuntimeError, ValueError) as err:
            error = OutputError(f"{self.path}: cannot write: {_first_line(err)}")
            with contextlib.suppress(OutputError):
                self._close()
            self._atomic.__exit__(OutputError, error, None)
            raise error from None
        except BaseException as err:  # a signal raised when the file was just created
            with contextlib.suppress(OutputError):
                self._close()
            self._atomic.__exit__(type(err), err, None)
            raise
        return self

    def _close(self) -> None:
        """Close the HDF5 file and its output file; a write error that happened becomes :class:`OutputError`."""
        failure = None
        with deferred_termination():
            try:
                if hasattr(self, "file"):
                    self.file.close()
            except (OSError, RuntimeError, ValueError) as err:
                failure = err
            if hasattr(self, "_output"):
                self._output.close()
                failure = self._output.error or failure
        if failure is not None:
            raise self._write_error(failure)

    def _write_error(self, err: BaseException) -> OutputError:
        text = err.strerror if isinstance(err, OSError) and err.strerror else _first_line(err)
        try:
            free = os.statvfs(self.path.parent if self.path.parent.exists() else ".")
            text += f" ({free.f_bavail * free.f_frsize / 2**20:.1f} MiB free)"
        except OSError:
            pass
        return OutputError(f"{self.path}: cannot write: {text}; nothing was kept")

    def __exit__(self, exc_type, exc, tb) -> bool:
        failure = None
        try:
            self._close()
        except OutputError as error:
            failure = error
        except BaseException as error:  # a signal that arrived while closing
            self._atomic.__exit__(type(error), error, None)
            raise
        if exc_type is None and failure is None and self.n == 0:
            failure = InputError(f"{self.path}: nothing to write (no showers)")
        if failure is not None and (exc_type is None or (issubclass(exc_type, Exception)
                                                         and not issubclass(exc_type, CaloadaptError))):
            self._atomic.__exit__(type(failure), failure, None)  # removes the temporary file
            raise failure
        self._atomic.__exit__(exc_type, exc, tb)  # renames it into place, or removes it after an error
        return False

    def append(self, showers: Showers) -> None:
        if self.geometry is None:
            self.geometry = get_geometry(showers.geometry)
        self.geometry.check_showers(showers)
        if len(showers):
            try:
                with deferred_termination():  # a signal is raised after the HDF5 calls, not inside them
                    if self.n == 0:
                        getattr(self, f"_create_{self.format}")(showers)
                    getattr(self, f"_append_{self.format}")(showers)
                    self.file.flush()
            except (OSError, RuntimeError) as err:  # the HDF5 library reports its write errors so
                raise self._write_error(self._output.error or err) from None
            if self._output.error is not None:  # stop at the first failed write, not at the end
                raise self._write_error(self._output.error)
            self.n += len(showers)

    # points
    def _create_points(self, showers: Showers) -> None:
        f = self.file
        f.attrs.update({"format": "caloadapt-points", "format_version": 1, "caloadapt_version": __version__,
                        "particle": showers.particle, "geometry": self.geometry.name,
                        "geometry_spec": yaml.safe_dump(self.geometry.spec, sort_keys=False),
                        "units": "points: x, y, z [mm], energy [MeV]; incident_energy_mev [MeV]"})
        f.attrs.update({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in self.attrs.items()})
        # LZF, not gzip: as small for these floats (the byte shuffle gzip needed does not help LZF) and
        # five times faster to write, about 2 ms of a one-step shower's 5 at gzip level 4 (docs/speed.md);
        # h5py always reads it, other HDF5 readers with the LZF filter (hdf5plugin)
        f.create_dataset("points", (0, 4), np.float32, maxshape=(None, 4), chunks=(65536, 4), compression="lzf")
        f.create_dataset("offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(65536,))
        f.create_dataset("incident_energy_mev", (0,), np.float64, maxshape=(None,), chunks=(65536,))
        for key in showers.meta:
            f.create_dataset(f"meta/{key}", (0,), np.float64, maxshape=(None,), chunks=(65536,))

    def _append_points(self, showers: Showers) -> None:
        f = self.file
        base = int(f["offsets"][-1])
        _extend(f["points"], showers.points)
        _extend(f["offsets"], base + showers.offsets[1:])
        _extend(f["incident_energy_mev"], showers.incident_energy_mev)
        for key in f.get("meta", {}):
            if key not in showers.meta:
                raise InputError(f"{self.path}: chunk lacks meta {key!r} present in earlier chunks")
            _extend(f[f"meta/{key}"], showers.meta[key])

    # calochallenge
    def _create_calochallenge(self, showers: Showers) -> None:
        n_cells = self.geometry.n_cells
        self.file.create_dataset("incident_energies", (0, 1), np.float64, maxshape=(None, 1), chunks=(1024, 1),
                                 compression="gzip")
        self.file.create_dataset("showers", (0, n_cells), np.float32, maxshape=(None, n_cells),
                                 chunks=(max(1, min(100, 2**20 // n_cells)), n_cells), compression="gzip")

    def _append_calochallenge(self, showers: Showers) -> None:
        for chunk in showers.chunks(max(1, 2**26 // (4 * self.geometry.n_cells))):
            _extend(self.file["showers"], self.geometry.voxelise(chunk, threshold=True))
        _extend(self.file["incident_energies"], showers.incident_energy_mev[:, None])
        for key, values, normal in zip(CALOCHALLENGE_ANGLE_KEYS, (showers.theta_deg, showers.phi_deg),
                                       (NORMAL_THETA_DEG, NORMAL_PHI_DEG)):
            self._extend_angles(key, values[:, None], np.full(1, normal), _is_inclined(showers))

    # ild
    def _create_ild(self, showers: Showers) -> None:
        width = max(6000, int(showers.n_points.max()))  # CaloClouds pads to 6000 points
        self.file.create_dataset("events", (0, 4, width), np.float32, maxshape=(None, 4, None),
                                 chunks=(16, 4, width), compression="gzip")
        self.file.create_dataset("energy", (0, 1), np.float32, maxshape=(None, 1), chunks=(1024, 1))

    def _append_ild(self, showers: Showers) -> None:
        events = self.file["events"]
        width = events.shape[2]
        if showers.n_points.max(initial=0) > width:
            width = self._widen_ild(int(showers.n_points.max()))
        counts = showers.n_points
        block = np.zeros((len(showers), 4, width), np.float32)
        rows = np.repeat(np.arange(len(showers)), counts)
        # padding first: the points of a shower fill its last n columns
        cols = np.arange(len(showers.points)) - np.repeat(showers.offsets[:-1] - (width - counts), counts)
        p = showers.points.astype(np.float64)
        features = [p[:, 0] + ILD_IMPACT_MM[0], depth_to_layer_units(self.geometry, p[:, 2]),
                    p[:, 1] + ILD_IMPACT_MM[1], p[:, 3] / 1000.0]
        for k, values in enumerate(features):
            block[rows, k, cols] = values
        _extend(events, block)
        _extend(self.file["energy"], (showers.incident_energy_mev / 1000.0)[:, None])
        direction = local_direction(showers.theta_deg, showers.phi_deg, self.geometry.barrel_sides)
        # shower frame (x, beam, depth) -> CaloClouds-3 local (beam, x, depth); normal incidence (0, 0, 1)
        self._extend_angles(ILD_DIRECTION_KEY, direction[:, [1, 0, 2]].astype(np.float32),
                            np.array([0.0, 0.0, 1.0], np.float32), _is_inclined(showers))

    def _extend_angles(self, key: str, values: np.ndarray, normal: np.ndarray, inclined: bool) -> None:
        """Append a per-shower angle dataset, created with normal-incidence rows for the showers
        already written when the first inclined shower arrives."""
        if key not in self.file:
            if not inclined:
                return
            self.file.create_dataset(key, data=np.tile(normal.astype(values.dtype), (self.n, 1)),
                                     maxshape=(None, values.shape[1]), chunks=(1024, values.shape[1]))
        _extend(self.file[key], values)

    def _widen_ild(self, width: int) -> int:
        """Grow the point axis, keeping the zero padding at the start of earlier rows."""
        events = self.file["events"]
        old = events.shape[2]
        events.resize(width, axis=2)
        for first in range(0, events.shape[0], 256):
            rows = events[first:first + 256, :, :old]
            shifted = np.zeros((len(rows), 4, width), np.float32)
            shifted[:, :, width - old:] = rows
            events[first:first + 256] = shifted
        return width


def _is_inclined(showers: Showers) -> bool:
    """True when a shower of the batch records an incidence other than normal."""
    return bool(np.any(showers.theta_deg != NORMAL_THETA_DEG) or np.any(showers.phi_deg != NORMAL_PHI_DEG))


def _extend(dataset: h5py.Dataset, values: np.ndarray) -> None:
    n = dataset.shape[0]
    dataset.resize(n + len(values), axis=0)
    dataset[n:] = values


def write_showers(path: str | os.PathLike[str], showers: Showers, format: str = "points",
                  geometry: Geometry | str | None = None, attrs: dict | None = None) -> None:
    """Write one batch of showers atomically (see :class:`ShowerWriter`)."""
    with ShowerWriter(path, format, geometry, attrs) as writer:
        writer.append(showers)


def file_geometry(path: str | os.PathLike[str], geometry: Geometry | str | None = None) -> Geometry:
    """The geometry of a shower file: ``geometry`` if given, else what the file records or implies."""
    reader = _Reader(path, geometry, False, None)
    reader.close()
    return reader.geometry


def count_showers(path: str | os.PathLike[str]) -> int:
    """Number of showers in a file of any layout."""
    with _open(path) as f:
        key = {"points": "incident_energy_mev", "ild": "energy", "calochallenge": "incident_energies"}[_format_of(f, path)]
        return len(f[key])


def max_points_per_shower(path: str | os.PathLike[str]) -> int:
    """Most points one shower of a file can hold, read cheaply: the largest shower of a points file, the
    padded width of an ILD file, the cells of a CaloChallenge file (an upper bound)."""
    with _open(path) as f:
        fmt = _format_of(f, path)
        if fmt == "points":
            offsets = _read_dataset(_dataset(f, "offsets", 1, path), slice(None), path, "offsets")
            return int(np.diff(offsets).max(initial=0))
        if fmt == "ild":
            return int(_dataset(f, "events", 3, path).shape[2])
        return int(_dataset(f, "showers", 2, path).shape[1])


def file_info(path: str | os.PathLike[str], geometry: Geometry | str | None = None,
              chunk_size: int = 2000) -> dict:
    """Summary of a shower file: format, geometry, counts, energy and incidence-angle ranges, points per shower."""
    n, e_min, e_max, counts = 0, np.inf, -np.inf, []
    angles = {"theta_deg": [np.inf, -np.inf], "phi_deg": [np.inf, -np.inf]}
    fmt, geo, particle = detect_format(path), None, None
    for chunk in iter_showers(path, geometry, chunk_size=chunk_size):
        n += len(chunk)
        e_min = min(e_min, float(chunk.incident_energy_mev.min()))
        e_max = max(e_max, float(chunk.incident_energy_mev.max()))
        for name, values in (("theta_deg", chunk.theta_deg), ("phi_deg", chunk.phi_deg)):
            angles[name] = [min(angles[name][0], float(values.min())), max(angles[name][1], float(values.max()))]
        counts.append(chunk.n_points)
        geo, particle = chunk.geometry, chunk.particle
    counts = np.concatenate(counts)
    return {"path": str(path), "format": fmt, "geometry": geo, "particle": particle, "showers": n,
            "incident_energy_gev": [e_min / 1000.0, e_max / 1000.0], **angles,
            "points_per_shower": {"min": int(counts.min()), "mean": float(counts.mean()), "max": int(counts.max())}}

