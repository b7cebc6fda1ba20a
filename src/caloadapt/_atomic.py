"""Atomic file output: write to a temporary file beside the target, then rename.

What sits at the target decides what happens:

- nothing, or a regular file: the temporary file is renamed onto it when complete (a replaced
  file keeps its permission bits, and its owner where the user may set it);
- a symbolic link: it is followed deliberately; the file it points to is replaced as above and
  the link stays a link (a dangling link is refused, as it would create a file elsewhere);
- anything else (a directory, a device such as ``/dev/null``, a FIFO, a socket): refused with an
  :class:`~caloadapt.errors.OutputError`, the path is never touched.

Any failure (an exception, ``KeyboardInterrupt``, a termination signal turned into an exception)
removes the temporary file and leaves whatever was at the target as it was.

A process killed outright (``kill -9``, the machine going down) cannot remove its temporary file. So
the writer holds an ``flock`` on it, which the kernel releases when the process ends however it
ends, and every later output into the same folder sweeps the temporary files nobody holds
(:func:`sweep_stale_temporaries`): never those of a live process, on this machine or another.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ._inputs import file_type_name
from .errors import OutputError

__all__ = ["atomic_path", "output_target", "sweep_stale_temporaries", "WRITE_ERRNOS"]

#: errors that only writing causes: inside the block they become one line naming the output
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}

#: the temporary file of an output NAME is ``.NAME<TEMPORARY_MARK>XXXXXXXX.tmp`` beside it
TEMPORARY_MARK = ".caloadapt-"
#: a temporary file is swept only when unchanged this long too: one just created, not yet locked, stays
STALE_AFTER_S = 60.0


def sweep_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of outputs in ``folder`` whose writers are gone; the removed paths.

    A writer holds an ``flock`` on its temporary file until it is renamed or removed; a file that can
    be locked (and has not changed for :data:`STALE_AFTER_S`) belongs to no running process.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and TEMPORARY_MARK in entry.name and entry.name.endswith(".tmp")):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime < STALE_AFTER_S:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # refused while its writer lives
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def output_target(path: str | os.PathLike[str]) -> Path:
    """The file an output to ``path`` replaces: ``path`` itself, or where its symbolic link points.

    Raises :class:`OutputError` when that is not a regular file (or nothing), or a dangling link.
    """
    given = Path(path)
    target = given
    if given.is_symlink():
        target = Path(os.path.realpath(given))
        if not os.path.lexists(target):
            raise OutputError(f"{given}: is a dangling symbolic link (to {os.readlink(given)}); refusing to write "
                              "through it")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as err:
        raise OutputError(f"{given}: cannot use as output: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        raise OutputError(f"{given}: is {file_type_name(mode)}, not a regular file; refusing to write over it")
    return target


def _write_error(target: Path, err: OSError) -> OutputError:
    return OutputError(f"{target}: cannot write: {err.strerror or err}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or an exception leaves any existing ``path`` untouched and no partial file behind.
    See the module documentation for what is refused.
    """
    given = Path(path)
    target = output_target(given)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{given}: cannot create its folder {target.parent}: {err.strerror or err}") from None
    sweep_stale_temporaries(target.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}{TEMPORARY_MARK}", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise OutputError(f"{given}: cannot write in {target.parent}: {err.strerror or err}") from None
    with contextlib.suppress(OSError):  # a file system without locks: then no sweeper can lock it either
        fcntl.flock(fd, fcntl.LOCK_EX)  # ours until renamed or removed, or until this process ends however it ends
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except OSError as err:
            if err.errno in WRITE_ERRNOS or err.filename in (tmp_name, str(tmp)):
                raise _write_error(given, err) from None
            raise
        try:
            _keep_mode_and_owner(tmp, target)
            _fsync(tmp)
            output_target(given)  # still nothing, a regular file or a link to one
            os.replace(tmp, target)
        except OSError as err:
            raise _write_error(given, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _keep_mode_and_owner(tmp: Path, target: Path) -> None:
    try:
        old = os.stat(target)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; new outputs get the user's usual permissions
        return
    os.chmod(tmp, stat.S_IMODE(old.st_mode))
    mine = os.stat(tmp)
    if (mine.st_uid, mine.st_gid) != (old.st_uid, old.st_gid):
        with contextlib.suppress(OSError):  # only root may give a file away; others keep their own
            os.chown(tmp, old.st_uid, old.st_gid)
        os.chmod(tmp, stat.S_IMODE(old.st_mode))  # chown may clear set-id bits


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
