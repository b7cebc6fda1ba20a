"""Files a command reads, checked where they enter: one line naming the file and what is wrong with it.

A path that leads nowhere, a directory, a FIFO (reading would wait for a writer forever), a device
(``/dev/zero`` never ends), an unreadable file, or a file of another kind than the one asked for (a
shower file given as a checkpoint, a checkpoint given as a geometry) is refused before it is read,
rather than surfacing later as a hang, a runaway allocation or a library's own exception.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import CaloadaptError, InputError

__all__ = ["input_file", "describe_content", "wrong_kind", "read_text_file", "file_type_name", "MAX_TEXT_BYTES"]

#: largest text input read (a geometry description, a binning XML: the built-in ones are a few KiB)
MAX_TEXT_BYTES = 16 * 2**20

_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))

#: the first bytes of the files caloadapt reads (or is given by mistake), and what they are
_SIGNATURES = ((b"\x89HDF\r\n\x1a\n", "an HDF5 file (a shower file?)"),
               (b"PK\x03\x04", "a zip archive (a PyTorch checkpoint?)"),
               (b"\x80\x02", "a Python pickle (an old PyTorch checkpoint?)"))


def file_type_name(mode: int) -> str:
    """'a directory', 'a FIFO', ... for a file mode that is not a regular file's."""
    return next((name for test, name in _TYPES if test(mode)), "not a regular file")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def input_file(path: str | os.PathLike[str], what: str, error: type[CaloadaptError] = InputError) -> Path:
    """``path`` if it is a readable regular file (or a link to one), else ``error`` naming it as ``what``
    (a noun: ``shower file``, ``checkpoint file``)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except (OSError, ValueError) as err:  # not a directory on the way, too long, a loop of links, a NUL byte
        raise error(f"{path}: cannot read this {what}: {getattr(err, 'strerror', None) or err}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: is {file_type_name(mode)}, not {_a(what)}")
    if not os.access(path, os.R_OK):
        raise error(f"{path}: cannot read this {what}: permission denied")
    return path


def describe_content(path: str | os.PathLike[str]) -> str | None:
    """What a regular file holds, judging by its first bytes ('an HDF5 file (a shower file?)', 'empty',
    'a text file', 'an XML file'), or None where that is not recognised."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head:
        return "empty"
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the end of the block
            return None
        text = head[:err.start].decode("utf-8")
    if "\0" in text:
        return None
    return "an XML file" if text.lstrip().startswith("<") else "a text file"


def wrong_kind(path: str | os.PathLike[str], what: str, expected: tuple[str, ...] = ()) -> str | None:
    """'PATH: is an HDF5 file (a shower file?), not a checkpoint file' when the content shows another kind
    of file than ``what``; None when it is unrecognised or one of ``expected`` (words of its description)."""
    content = describe_content(path)
    if content is None or any(word in content for word in expected):
        return None
    return f"{path}: is {content}, not {_a(what)}"


def read_text_file(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_TEXT_BYTES,
                   error: type[CaloadaptError] = InputError) -> str:
    """The UTF-8 text of a small input file (a geometry description, a binning XML), refused in one line
    when it is not a readable regular file, larger than ``max_bytes`` or not text."""
    path = input_file(path, what, error)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise error(f"{path}: cannot read this {what}: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise error(f"{path}: is larger than {max_bytes // 2**20} MiB, too large for {_a(what)}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(wrong_kind(path, what, ("text", "XML")) or f"{path}: is not text (UTF-8), not {_a(what)}") \
            from None
