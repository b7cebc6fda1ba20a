"""SIGTERM and SIGHUP (Slurm, ``timeout``, a closed terminal) handled like Ctrl-C.

The command line installs :func:`termination_handlers`: the signal raises :class:`Terminated`
where the program is, so every ``with`` block unwinds (temporary outputs are removed) and the
CLI prints one line and exits with ``128 + signal`` (143 for SIGTERM, 129 for SIGHUP).

A training loop wraps its steps in :func:`deferred_termination`: there the signal is only
recorded; the loop finishes its step, writes a resumable checkpoint and then raises
:class:`Terminated` itself (Slurm pre-emption sends SIGTERM some time before SIGKILL).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "TERMINATION_SIGNALS", "termination_handlers", "deferred_termination", "pending_termination"]

TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

#: lists of pending signals of the active deferrals (innermost last)
_deferrals: list[list[int]] = []


class Terminated(BaseException):
    """The process received SIGTERM or SIGHUP (a BaseException, like KeyboardInterrupt).

    ``note`` says what was kept (e.g. the checkpoint to resume from).
    """

    def __init__(self, signum: int, note: str = ""):
        self.signum, self.note = int(signum), note
        super().__init__(f"terminated by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _handler(signum, frame) -> None:
    if _deferrals:
        _deferrals[-1].append(signum)
        return
    raise Terminated(signum)


@contextlib.contextmanager
def termination_handlers() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise :class:`Terminated`; the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {signum: signal.signal(signum, _handler) for signum in TERMINATION_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_termination() -> Iterator[list[int]]:
    """Within the block termination signals are recorded in the yielded list instead of raised.

    The caller checks the list at safe points and raises :class:`Terminated` itself; a signal still
    pending when the block ends is raised then. Without :func:`termination_handlers` installed
    the signals keep their usual effect.
    """
    pending: list[int] = []
    _deferrals.append(pending)
    try:
        yield pending
    finally:
        del _deferrals[next(i for i, p in enumerate(_deferrals) if p is pending)]
    if pending:
        raise Terminated(pending[0])


def pending_termination() -> int | None:
    """The first termination signal recorded by the innermost :func:`deferred_termination`, or None."""
    return _deferrals[-1][0] if _deferrals and _deferrals[-1] else None
