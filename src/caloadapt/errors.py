"""Errors that reach the user as one clear line.

Every problem caused by the user's input (a file, a name, an option) raises a subclass of
:class:`CaloadaptError`; the CLI prints its message on one line and exits with status 2.
"""

from __future__ import annotations

__all__ = ["CaloadaptError", "InputError", "GeometryError", "CheckpointError", "OutputError", "TrainingError"]


class CaloadaptError(Exception):
    """Base class of all user-facing errors; the message names the input and the problem."""


class InputError(CaloadaptError):
    """A data file or an option is missing, malformed or inconsistent."""


class GeometryError(CaloadaptError):
    """A geometry name, YAML or XML description is unknown or malformed."""


class CheckpointError(CaloadaptError):
    """A checkpoint is missing, corrupt, or does not fit the requested model or method."""


class OutputError(CaloadaptError):
    """An output cannot be written: not a regular file at its path, no space, no permission."""


class TrainingError(CaloadaptError):
    """A run cannot start or continue: its folder is in use or holds another run, or training diverged."""
