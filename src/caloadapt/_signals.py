"""SIGTERM and SIGHUP (Slurm, ``timeout``, a closed terminal) handled like Ctrl-C.

The command line installs :func:`termination_handlers`: SIGTERM / SIGHUP raise :class:`Terminated`
(SIGINT ``KeyboardInterrupt``) where the program is, so every ``with`` block unwinds (temporary
outputs are removed) and the CLI prints one line and exits with ``128 + signal`` (143 for
SIGTERM, 129 for SIGHUP, 130 for SIGINT).

Two kinds of code must not be interrupted in the middle, and wrap themselves in
:func:`deferred_termination`, where a signal is only recorded:

- a training loop: it finishes its step, writes a resumable checkpoint and raises
  :class:`Terminated` itself (Slurm pre-emption sends SIGTERM some time before SIGKILL);
- calls into the HDF5 library that write through Python code: an exception raised inside
  them would break the library's state (and crash the interpreter later).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "TERMINATION_SIGNALS", "termination_handlers", "deferred_termination",
           "pending_termination"]

TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_HANDLED = (signal.SIGINT, *TERMINATION_SIGNALS)

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


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _handler(signum, frame) -> None:
    if _deferrals:
        _deferrals[-1].append(signum)
        return
    _raise_for(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def termination_handlers() -> Iterator[None]:
    """Within the block SIGTERM / SIGHUP raise :class:`Terminated` and SIGINT ``KeyboardInterrupt``
    (unless deferred); the old handlers come back after."""
    if not _in_main_thread():
        yield
        return
    # a signal the caller ignores stays ignored: `nohup caloadapt ...` must outlive its terminal
    old = {signum: signal.signal(signum, _handler) for signum in _HANDLED
           if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_termination() -> Iterator[list[int]]:
    """Within the block SIGINT, SIGTERM and SIGHUP are recorded in the yielded list instead of raised.

    The caller may check :func:`pending_termination` at safe points and raise itself; a signal
    still pending when the block ends is raised then (``KeyboardInterrupt`` for SIGINT, else
    :class:`Terminated`). Where no handler of this module is installed (library use in the main
    thread), they are installed for the duration of the block.
    """
    installed = {}
    if _in_main_thread():
        for signum in _HANDLED:
            if signal.getsignal(signum) not in (_handler, signal.SIG_IGN):
                installed[signum] = signal.signal(signum, _handler)
    pending: list[int] = []
    _deferrals.append(pending)
    try:
        yield pending
    finally:
        del _deferrals[next(i for i, p in enumerate(_deferrals) if p is pending)]
        for signum, handler in installed.items():
            signal.signal(signum, handler)
    if pending:
        if _deferrals:  # an outer deferral decides what to do with it
            _deferrals[-1].extend(pending)
        else:
            _raise_for(pending[0])


def pending_termination() -> int | None:
    """The first signal recorded by the innermost :func:`deferred_termination`, or None."""
    return _deferrals[-1][0] if _deferrals and _deferrals[-1] else None
