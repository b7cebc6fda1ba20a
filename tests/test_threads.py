"""The start-up thread choice (docs/threads.md): affinity, load, other caloadapt processes, OMP_NUM_THREADS,
``--threads`` on the command line, and the sweep's split of the cores among its workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from caloadapt import _threads
from caloadapt._threads import (choose_threads, configure_thread_environment, other_caloadapt_processes,
                                parse_threads, split_threads)
from caloadapt.cli import app
from caloadapt.errors import InputError


@pytest.mark.parametrize("kwargs, expected", [
    ({"usable": 2}, 2),                                    # idle, alone: every usable core
    ({"usable": 2, "load": 0.1}, 2),
    ({"usable": 2, "sharers": 2}, 1),                      # two caloadapt runs split the cores
    ({"usable": 16, "sharers": 3}, 5),
    ({"usable": 2, "load": 1.0}, 1),                       # one busy task elsewhere: one core left
    ({"usable": 2, "load": 6.0}, 1),                       # overloaded: never fewer than one thread
    ({"usable": 8, "load": 2.4}, 6),
    ({"usable": 4, "load": 32.0, "total_cpus": 64}, 2),    # the load is spread over the whole machine's CPUs
    ({"usable": 8, "load": 2.0, "sharers": 2}, 4),         # the tighter of the two limits
    ({"usable": 8, "load": 6.0, "sharers": 2}, 2),
    ({"usable": 2, "omp_num_threads": "3"}, 3),            # the user's OMP_NUM_THREADS decides
    ({"usable": 8, "sharers": 4, "load": 7.0, "omp_num_threads": "6"}, 6),
    ({"usable": 4, "omp_num_threads": "2,1"}, 2),          # a list per nesting level: the outer one
    ({"usable": 4, "omp_num_threads": "many"}, 4),         # not a count: ignored
    ({"usable": 4, "omp_num_threads": "0"}, 4),
])
def test_choose_threads(kwargs, expected):
    assert choose_threads(**kwargs) == expected


def test_ranks_of_a_distributed_run_split_the_cores(monkeypatch):
    monkeypatch.setattr(_threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(_threads, "other_caloadapt_processes", lambda: 0)
    monkeypatch.setattr(_threads, "USER_OMP_NUM_THREADS", None)
    monkeypatch.setattr(_threads, "busy_cpus", lambda: 0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _threads.auto_threads() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert _threads.auto_threads() == 8


def test_explicit_auto_overrides_omp_num_threads(monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1 for each of several ranks; --threads auto splits the cores instead."""
    monkeypatch.setattr(_threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(_threads, "other_caloadapt_processes", lambda: 3)
    monkeypatch.setattr(_threads, "USER_OMP_NUM_THREADS", "1")
    monkeypatch.setattr(_threads, "busy_cpus", lambda: 0.0)
    assert _threads.auto_threads() == 1
    assert _threads.auto_threads(respect_omp_num_threads=False) == 2


def test_the_users_omp_num_threads_decides_without_scanning_the_processes(monkeypatch):
    def scan():
        raise AssertionError("the process table was read although OMP_NUM_THREADS decides")

    monkeypatch.setattr(_threads, "other_caloadapt_processes", scan)
    monkeypatch.setattr(_threads, "USER_OMP_NUM_THREADS", "3,1")
    assert _threads.auto_threads() == 3
    monkeypatch.setattr(_threads, "USER_OMP_NUM_THREADS", "zero")  # not a count: the machine decides
    monkeypatch.setattr(_threads, "other_caloadapt_processes", lambda: 0)
    monkeypatch.setattr(_threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(_threads, "busy_cpus", lambda: 0.0)
    assert _threads.auto_threads() == 4


def _write_stat(path: Path, user: int, idle: int) -> None:
    path.write_text(f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {user} 0 0 {idle} 0 0 0 0 0 0\n")


def test_busy_cpus_counts_the_cpu_time_spent_computing_over_the_interval(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    _write_stat(stat, user=5, idle=7)
    assert _threads._cpu_times(stat) == (12, 7)
    assert _threads.busy_cpus(tmp_path / "missing", interval_s=0.0) is None
    readings = iter([(1000, 300), (1100, 300), (1100, 300), (1200, 400), (5, 5), (5, 5)])  # (all, idle) ticks
    monkeypatch.setattr(_threads, "_cpu_times", lambda _: next(readings))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert _threads.busy_cpus(stat, interval_s=0.0) == pytest.approx(4.0)   # every tick busy: all 4 CPUs
    assert _threads.busy_cpus(stat, interval_s=0.0) == pytest.approx(0.0)   # every tick idle
    assert _threads.busy_cpus(stat, interval_s=0.0) is None                 # no time passed: unknown


def test_a_stale_load_average_leaves_every_core_to_the_default_choice(monkeypatch):
    """A process that ended a moment ago (a pip install before the first demo) still sits in the load
    average; it computes nothing, so the default choice takes every usable core."""
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 1.5, 0.8))   # what the finished install left
    monkeypatch.setattr(_threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(_threads, "other_caloadapt_processes", lambda: 0)
    monkeypatch.setattr(_threads, "USER_OMP_NUM_THREADS", None)
    readings = iter([(1000, 100), (1040, 140),     # (all, idle) ticks: idle throughout
                     (1000, 100), (1040, 120)])    # one of the two CPUs computing throughout
    monkeypatch.setattr(_threads, "_cpu_times", lambda _: next(readings))
    assert _threads.auto_threads() == 2
    assert _threads.auto_threads() == 1


def _fake_proc(root: Path, commands: dict[int, list[str]]) -> Path:
    for pid, argv in commands.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    (root / "self").mkdir()  # not a process number
    return root


def test_other_caloadapt_processes(tmp_path):
    proc = _fake_proc(tmp_path, {
        101: ["/venv/bin/python3", "/venv/bin/caloadapt", "finetune", "--data", "t.h5"],
        102: ["caloadapt", "generate"],
        103: ["python3", "-u", "-m", "caloadapt", "train"],      # a torchrun rank
        104: ["python3", "-m", "pytest", "tests/test_caloadapt.py"],
        105: ["/usr/bin/vim", "caloadapt"],
        106: [],                                                 # a kernel thread
        os.getpid(): ["python3", "/venv/bin/caloadapt", "sweep"],  # this process is never counted
    })
    assert other_caloadapt_processes(proc) == 3
    assert other_caloadapt_processes(tmp_path / "missing") == 0


@pytest.mark.parametrize("text, expected", [(None, None), ("auto", None), ("AUTO", None), ("1", 1), ("12", 12)])
def test_parse_threads(text, expected):
    assert parse_threads(text) == expected


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5", ""])
def test_parse_threads_refuses(text):
    with pytest.raises(InputError, match="--threads must be a positive integer or 'auto'"):
        parse_threads(text)


@pytest.mark.parametrize("budget, workers, per_worker, expected", [
    (8, None, None, (8, 1)),     # one thread per worker, a worker per core
    (8, None, 2, (4, 2)),
    (8, 3, None, (3, 2)),
    (1, None, 4, (1, 4)),        # what is given is kept
    (2, 5, 3, (5, 3)),
])
def test_split_threads(budget, workers, per_worker, expected):
    assert split_threads(budget, workers, per_worker) == expected


def test_wait_policy_default_and_the_users_choice():
    environ: dict[str, str] = {}
    configure_thread_environment(environ)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        environ = dict(chosen)
        configure_thread_environment(environ)
        assert environ == chosen


#: each computing command with its required arguments (never read: --threads is checked first)
REQUIRED = {"generate": ["-o", "g.h5"], "finetune": ["--data", "t.h5", "-o", "run"],
            "train": ["--data", "t.h5", "-o", "run"], "pretrain": ["--data", "t.h5", "-o", "run"],
            "evaluate": ["--generated", "g.h5", "--reference", "r.h5"],
            "sweep": ["--data", "t.h5", "--reference", "r.h5", "-o", "sweep"], "demo": [], "benchmark": [],
            "simulate": ["-o", "s.h5"], "calibrate": ["--checkpoint", "c.pt", "--data", "t.h5", "-o", "c2.pt"],
            "export": ["--checkpoint", "c.pt", "-o", "e.pt"], "distill": ["--checkpoint", "c.pt", "--data", "t.h5",
                                                                         "-o", "cm"],
            "convert": ["a.h5", "b.h5"], "analyze-updates": ["a.pt", "b.pt"]}


@pytest.mark.parametrize("command", sorted(REQUIRED))
@pytest.mark.parametrize("value", ["0", "many"])
def test_bad_threads_is_one_line_and_status_2(command, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [command, *REQUIRED[command], "--threads", value])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"caloadapt: error: --threads must be a positive integer or 'auto', got {value!r}"]
    assert not any(tmp_path.iterdir())  # refused before any work


def test_threads_option_reaches_torch(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["generate", "--threads", "1", "--checkpoint", str(tmp_path / "none.pt"),
                                          "-o", str(tmp_path / "g.h5")])
        assert result.exit_code == 2  # the missing checkpoint, found after the threads were set
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def _start_up(env: dict[str, str], threads: str | None = None) -> list[str]:
    """What a fresh ``caloadapt`` process sets at start-up: its torch threads and OpenMP wait policy."""
    code = ("import os, torch; from caloadapt import cli, _threads; "
            f"n = cli._use_threads({threads!r}); "
            "print(n, torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_omp_num_threads_of_the_user_is_respected():
    assert _start_up({"OMP_NUM_THREADS": "3"}) == ["3", "3", "PASSIVE"]
    assert _start_up({"OMP_NUM_THREADS": "3"}, threads="1") == ["1", "1", "PASSIVE"]  # --threads decides
    assert _start_up({"OMP_WAIT_POLICY": "ACTIVE"}, threads="2") == ["2", "2", "ACTIVE"]
