"""Run directories: one run at a time in a folder, never a finished run overwritten by accident.

:func:`run_lock` holds an exclusive ``fcntl.flock`` on ``.caloadapt.lock`` in the run folder while a
run writes there, so a second training into the same folder is refused instead of interleaving
``metrics.csv`` and checkpoints. :func:`claim_run_directory` is what the command line does before a
training starts: refuse a folder that already holds a run unless ``--resume`` (continue it) or
``--overwrite`` (start afresh, removing the old run's files), and say what ``--resume`` found.

A run that fails before its first checkpoint leaves nothing behind: :func:`run_lock` removes the
files it made (and the folder, if it made that too), so the same command, corrected, simply runs
again. A run that fails later keeps ``last.pt``: ``--resume`` continues it, ``--overwrite`` replaces it.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import TrainingError

__all__ = ["LOCK_NAME", "RUN_FILES", "LOSS_CURVES", "run_lock", "claim_run_directory", "prepare_run_directory",
           "read_history"]

LOCK_NAME = ".caloadapt.lock"
#: the plot of ``metrics.csv`` the command line writes at the end of a training
LOSS_CURVES = "loss_curves.png"
#: files a training run writes into its folder (the sign that a folder holds a run)
RUN_FILES = ("last.pt", "best.pt", "model.pt", "metrics.csv", "parameters.json", LOSS_CURVES)
#: the files of a run that it can be continued or used from
CHECKPOINTS = ("last.pt", "best.pt", "model.pt")
#: what a run writes into its folder besides :data:`RUN_FILES`
_RUN_FOLDERS = ("tensorboard",)

#: folders locked by this process: resolved path -> (file descriptor, depth); nested use is allowed
_held: dict[str, list[int]] = {}


def prepare_run_directory(out_dir: str | os.PathLike[str]) -> Path:
    """Create the run folder (and its parents); a one-line error if that is impossible."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"{out_dir}: exists and is not a directory (a run needs a folder)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainingError(f"{out_dir}: cannot create the run folder: {err.strerror or err}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise TrainingError(f"{out_dir}: the run folder is not writable")
    return out_dir


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the run folder for this process; a :class:`TrainingError` if another process holds it.

    Should the block fail before it wrote ``last.pt``, what it made in the folder is removed again
    (see :func:`_undo_unfinished_start`); the outermost holder of a folder does that.
    """
    created = not os.path.lexists(out_dir)
    out_dir = prepare_run_directory(out_dir)
    key = str(out_dir.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield out_dir
        finally:
            _held[key][1] -= 1
        return
    path = out_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise TrainingError(f"{out_dir}: cannot create the lock file {LOCK_NAME}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _read_holder(fd)
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise TrainingError(f"{out_dir}: another caloadapt run is using this folder{holder}; wait for it or "
                                "choose another -o") from None
        raise TrainingError(f"{out_dir}: cannot lock the run folder: {err.strerror or err}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = [fd, 1]
    before = _run_outputs(out_dir)
    try:
        yield out_dir
    except BaseException:
        _undo_unfinished_start(out_dir, before, created)
        raise
    finally:
        del _held[key]
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting run)


def _run_outputs(out_dir: Path) -> dict[str, tuple[int, int]]:
    """The run's files and folders present in ``out_dir``: name -> (inode, modification time in ns)."""
    found = {}
    for name in (*RUN_FILES, *_RUN_FOLDERS):
        with contextlib.suppress(OSError):
            info = os.lstat(out_dir / name)
            found[name] = (info.st_ino, info.st_mtime_ns)
    return found


def _undo_unfinished_start(out_dir: Path, before: dict[str, tuple[int, int]], created: bool) -> None:
    """After a run failed: unless it wrote ``last.pt`` (which ``--resume`` continues), remove the run files
    it made, and the folder when the run made it and nothing else is in it. Called holding the lock."""
    after = _run_outputs(out_dir)
    if "last.pt" in after and after["last.pt"] != before.get("last.pt"):
        return
    for name in after.keys() - before.keys():
        path = out_dir / name
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    if created:
        with contextlib.suppress(OSError):
            (out_dir / LOCK_NAME).unlink()
            out_dir.rmdir()  # fails, harmlessly, when something else was put there meanwhile


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (process {pid})"
    return ""


def claim_run_directory(out_dir: str | os.PathLike[str], *, resume: bool, overwrite: bool = False) -> str:
    """Check a run folder before a training starts; returns a sentence on what will happen.

    - ``resume``: the folder must hold ``last.pt``; the sentence says which step it continues from;
    - otherwise a folder holding a run (any of :data:`RUN_FILES`) is refused unless ``overwrite``,
      which removes those files (and nothing else) first;
    - the files of a run that never wrote a checkpoint (one killed before its first) are replaced
      without ``overwrite``: there is nothing in them to continue or to use.
    """
    from ..models.checkpoint import load_checkpoint

    out_dir = Path(out_dir)
    if resume and overwrite:
        raise TrainingError("--resume continues a run and --overwrite replaces it; give one of them")
    last = out_dir / "last.pt"
    if resume:
        if not last.is_file():
            found = [name for name in RUN_FILES if (out_dir / name).exists()]
            what = f"it holds {', '.join(found)} but no last.pt" if found else (
                "it holds no run" if out_dir.is_dir() else "it does not exist")
            raise TrainingError(f"{out_dir}: nothing to resume ({what}); drop --resume to start a new run")
        payload = load_checkpoint(last)
        step = (payload.get("train_state") or {}).get("step", "?")
        total = (payload.get("train_config") or {}).get("steps", "?")
        return f"resuming {out_dir} from step {step} of {total} (last.pt)"
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    unfinished = found and not any(name in CHECKPOINTS for name in found)
    if found and not (overwrite or unfinished):
        raise TrainingError(f"{out_dir}: holds a run already ({', '.join(found)}); continue it with --resume, "
                            "replace it with --overwrite, or choose another -o")
    if found:
        with run_lock(out_dir):  # not while another process runs there
            for name in found:
                path = out_dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        if unfinished and not overwrite:
            return f"replacing the start of a run in {out_dir} that wrote no checkpoint (removed {', '.join(found)})"
        return f"overwriting the run in {out_dir} (removed {', '.join(found)})"
    return f"new run in {out_dir}"


def read_history(out_dir: str | os.PathLike[str]) -> dict[str, list[float]]:
    """The columns of a run's ``metrics.csv`` (column name -> values, NaN where a row left it empty).

    Raises:
        TrainingError: no ``metrics.csv`` in the folder, or a row that is not numbers.
    """
    path = Path(out_dir) / "metrics.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise TrainingError(f"cannot read {path}: {err.strerror or err}") from None
    if not rows:
        raise TrainingError(f"{path} is empty")
    header, body = rows[0], rows[1:]
    try:
        values = [[float(v) if v != "" else math.nan for v in row] for row in body]
    except ValueError:
        raise TrainingError(f"{path} holds a value that is not a number") from None
    if any(len(row) != len(header) for row in values):
        raise TrainingError(f"{path} has rows of another width than its header")
    return {name: [row[i] for row in values] for i, name in enumerate(header)}
