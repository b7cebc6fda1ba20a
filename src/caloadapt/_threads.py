"""How many CPU threads a caloadapt command computes with, chosen once at start-up (docs/threads.md).

Two runs that each start one thread per core on a shared machine do not just halve each other's speed:
torch's OpenMP runtime (libgomp) lets an idle worker spin for a long while before it sleeps, and each
parallel region ends at a barrier that waits for the slowest thread. With more threads than cores the
spinning threads take the cores from the threads that have work, and two fine-tuning runs took 4.8x
the time of one instead of 2x. So the command line

- asks OpenMP to let idle threads sleep (``OMP_WAIT_POLICY=PASSIVE``), in the environment before
  numpy and torch load their runtimes, unless the user chose a wait policy or spin count;
- uses as many threads as the cores it may run on (the CPU affinity) divided among the caloadapt
  processes running there, and no more than the cores that other work keeps free now (at least one):
  the CPU time the machine spent computing over a fifth of a second at start-up (``/proc/stat``), not
  the load average, which still counts a process that finished a minute ago (a ``pip install`` just
  before the first ``caloadapt demo`` cost that run half its cores);
- leaves the count to ``OMP_NUM_THREADS`` when the user set it (and ``--threads`` is not given), and
  to ``--threads N``; an explicit ``--threads auto`` makes the choice above even when
  ``OMP_NUM_THREADS`` is set (torchrun sets it to 1 for each of several ranks).

This module imports neither numpy nor torch at import time: it must run before they load.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["AUTO", "parse_threads", "choose_threads", "configure_thread_environment", "apply_threads",
           "auto_threads", "split_threads", "usable_cores", "other_caloadapt_processes", "busy_cpus"]

#: the ``--threads`` value that asks for the start-up choice
AUTO = "auto"

#: the OpenMP threads the user asked for before caloadapt started (``None``: not set)
USER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")


def configure_thread_environment(environ=os.environ) -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose how they wait.

    Must run before numpy / torch load libgomp, which reads these variables once, when it loads.
    """
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity; a container's CPU set counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _is_caloadapt(argv: list[str]) -> bool:
    """Whether a command line runs caloadapt: ``caloadapt ...``, ``python .../caloadapt ...`` or
    ``python -m caloadapt ...``."""
    if not argv:
        return False
    if os.path.basename(argv[0]) == "caloadapt":
        return True
    if not os.path.basename(argv[0]).startswith("python"):
        return False
    rest = argv[1:]
    while rest and rest[0].startswith("-") and rest[0] != "-m":  # interpreter flags, e.g. torchrun's -u
        rest = rest[1:]
    return bool(rest) and (os.path.basename(rest[0]) == "caloadapt" or rest[:2] == ["-m", "caloadapt"])


def other_caloadapt_processes(proc: Path = Path("/proc")) -> int:
    """How many other caloadapt processes run on this machine (never this one or its parent: a
    ``caloadapt`` script may run as a child of ``python -m caloadapt``); 0 where /proc is missing."""
    own = {os.getpid(), os.getppid()}
    count = 0
    try:
        entries = list(proc.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # ended meanwhile, or not ours to read
            continue
        count += _is_caloadapt([a for a in argv if a])
    return count


def _cpu_times(stat: Path) -> tuple[int, int]:
    """(all, idle) CPU time of the machine in clock ticks, from the ``cpu`` line of ``/proc/stat``
    (idle counts the time waiting for input/output too)."""
    with open(stat) as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks[:8]), ticks[3] + ticks[4]  # user nice system idle iowait irq softirq steal


def busy_cpus(stat: Path = Path("/proc/stat"), interval_s: float = 0.2) -> float | None:
    """How many CPUs of the machine are computing now: the busy share of the CPU time over
    ``interval_s``, times the CPU count (this process sleeps meanwhile, so it counts only others);
    None where ``/proc/stat`` cannot be read. Unlike the load average it forgets a finished process
    at once."""
    try:
        total0, idle0 = _cpu_times(stat)
        time.sleep(interval_s)
        total1, idle1 = _cpu_times(stat)
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    return (elapsed - (idle1 - idle0)) / elapsed * (os.cpu_count() or 1)


def _positive_threads(omp_num_threads: str | None) -> int | None:
    """The thread count an ``OMP_NUM_THREADS`` value asks for, or None (unset, empty, not a positive
    integer); OpenMP allows a list per nesting level, whose first entry counts."""
    if omp_num_threads is None:
        return None
    try:
        value = int(omp_num_threads.split(",")[0])
    except ValueError:
        return None
    return value if value >= 1 else None


def choose_threads(usable: int, *, load: float | None = None, total_cpus: int | None = None,
                   sharers: int = 1, omp_num_threads: str | None = None) -> int:
    """The number of threads for one caloadapt process.

    Arguments:
        usable: CPUs this process may run on (its affinity).
        load: CPUs of the machine busy with other work now (:func:`busy_cpus`; ``None``: unknown, not used).
        total_cpus: CPUs of the whole machine, which the load is counted over (default ``usable``).
        sharers: caloadapt processes that split the usable CPUs, this one included (other runs, or the
            ranks of a distributed run on this node).
        omp_num_threads: the user's ``OMP_NUM_THREADS``; a positive integer is taken as it is.

    Returns ``usable // sharers``, at most the CPUs the load leaves free, and at least 1.
    """
    value = _positive_threads(omp_num_threads)
    if value is not None:
        return value
    share = usable // max(1, sharers)
    if load is not None:
        # the load is counted over the whole machine; our share of it is the part that falls on
        # the CPUs we may use
        busy = load * usable / max(1, total_cpus or usable)
        share = min(share, usable - int(busy + 0.5))
    return max(1, share)


def split_threads(budget: int, workers: int | None, per_worker: int | None) -> tuple[int, int]:
    """Worker processes and threads per worker that share ``budget`` threads: what is not given is
    chosen so that workers x threads stays within the budget (one thread each when neither is given)."""
    workers = workers or max(1, budget // (per_worker or 1))
    return workers, per_worker or max(1, budget // workers)


def parse_threads(text: str | None) -> int | None:
    """The ``--threads`` value: ``None`` for ``auto`` (or not given): the start-up choice; else a positive
    integer."""
    from .errors import InputError

    if text is None or text.strip().lower() == AUTO:
        return None
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"--threads must be a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise InputError(f"--threads must be a positive integer or 'auto', got {text!r}")
    return value


def auto_threads(*, respect_omp_num_threads: bool = True) -> int:
    """The start-up choice on this machine: affinity, CPUs busy now, other caloadapt processes and
    the ranks of a distributed run on this node (``LOCAL_WORLD_SIZE``, set by torchrun); the user's
    ``OMP_NUM_THREADS`` instead, when set and respected (then nothing else is looked at)."""
    user = _positive_threads(USER_OMP_NUM_THREADS) if respect_omp_num_threads else None
    if user is not None:
        return user
    load = busy_cpus()
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    sharers = max(1 + other_caloadapt_processes(), ranks)
    return choose_threads(usable_cores(), load=load, total_cpus=os.cpu_count(), sharers=sharers,
                          omp_num_threads=USER_OMP_NUM_THREADS if respect_omp_num_threads else None)


def apply_threads(requested: int | None, *, respect_omp_num_threads: bool = True) -> int:
    """Set torch's intra-op and inter-op pools and the BLAS pools to ``requested`` threads (``None``:
    the start-up choice, see :func:`auto_threads`); return the number used."""
    import torch

    threads = requested if requested is not None else auto_threads(respect_omp_num_threads=respect_omp_num_threads)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # the inter-op pool has started already (a second command in one process)
        pass
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy's OpenBLAS then keeps its own count; caloadapt's heavy work is torch's
        pass
    else:
        threadpool_limits(limits=threads, user_api="blas")
    return threads
