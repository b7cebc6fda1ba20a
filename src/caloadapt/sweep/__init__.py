"""Data-efficiency sweeps: every (pre-trained model, method, data size, seed), evaluated and tabulated.

Each run lives in its own directory and is finished when its ``result.json`` exists, so a sweep
restarted after an interruption skips what is done. Runs go to local worker processes or to a
Slurm cluster through submitit.
"""

from __future__ import annotations

from .runner import SCRATCH_CONVERGED, ZERO_SHOT, RunSpec, SweepSpec, plan_runs, run_sweep
from .summary import summarise

__all__ = ["SweepSpec", "RunSpec", "plan_runs", "run_sweep", "summarise", "ZERO_SHOT", "SCRATCH_CONVERGED"]
