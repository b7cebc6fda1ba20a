"""Planning and executing the runs of a sweep (local processes or Slurm via submitit)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_path
from .._provenance import to_jsonable
from .._threads import usable_cores
from ..errors import InputError
from .recipe import (PSEUDO_METHODS, SCRATCH_CONVERGED, ZERO_SHOT, adapt_model, adaptation_config,
                     converged_max_steps, is_converged, parse_method, whole_model_parameters)

__all__ = ["SweepSpec", "RunSpec", "plan_runs", "run_sweep", "run_one", "parse_method", "is_converged",
           "converged_max_steps", "whole_model_parameters", "ZERO_SHOT", "SCRATCH_CONVERGED", "PSEUDO_METHODS"]

@dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep needs; written to ``sweep.json`` in its directory.

    Attributes:
        checkpoints: label -> pre-trained checkpoint path (several compare pre-trainings, e.g.
            the physical frame against the published box normalisation).
        data: target training file; each run draws ``size`` showers from it with its seed.
        reference: held-out target showers the generated ones are compared with (never trained on).
        geometry: target geometry (name or path).
        sizes, methods, seeds: the grid; methods are ``name`` or ``name:key=value,...``
            (e.g. ``lora:rank=16,alpha=16``), or ``zero-shot`` (one run per checkpoint and seed, D = 0).
        steps, batch_size, max_points: training budget of every run (the same for all methods).
        lr_by_size: learning rates from the published table by data size (True), or the D <= 100
            rates at every size (False: at a short fixed budget the table's lower rates for large D
            would measure the budget, not the data; :mod:`caloadapt.adapt.defaults`).
        n_eval: generated and reference showers compared per run.
        n_steps_sampler: sampler steps at generation (None: each checkpoint's own sampler's).
        threads: torch threads per run.
        floor: optional second sample of the reference source (independent of ``reference``, ideally
            at its incident energies: ``caloadapt simulate --energies-from``); its first ``n_eval``
            showers are scored against the reference like the generated ones, and every result
            records ``geometric_mean_floor`` and ``ratio_to_floor`` = G / G_floor.
        patience: ``scratch-converged``: stop after this many validations (every ``val_every``
            steps) without improvement of the validation losses.
        max_steps: ``scratch-converged``: step cap (None: ``CONVERGED_STEP_FACTOR`` x ``steps``).
    """

    checkpoints: dict[str, str]
    data: str
    reference: str
    geometry: str
    sizes: tuple[int, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int = 1000
    batch_size: int = 32
    max_points: int = 512
    val_fraction: float = 0.2
    val_every: int = 100
    n_eval: int = 1000
    n_steps_sampler: int | None = None
    threads: int = 1
    lr_by_size: bool = True
    floor: str | None = None
    patience: int = 5
    max_steps: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    pretrained: str
    method: str
    size: int
    seed: int
    directory: str
    sweep: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.pretrained}/{self.method}/n{self.size}/s{self.seed}"


def plan_runs(spec: SweepSpec, out_dir: Path) -> list[RunSpec]:
    """All runs of the grid, in a fixed order; each with its own directory."""
    for text in spec.methods:
        if text != ZERO_SHOT:
            parse_method(text)  # fail early on a bad method, before any run starts
    if spec.patience < 1:
        raise InputError(f"patience must be at least 1, got {spec.patience}")
    converged_max_steps(spec.steps, spec.max_steps)
    runs = []
    for label in spec.checkpoints:
        for method in spec.methods:
            for size in (0,) if method == ZERO_SHOT else spec.sizes:
                for seed in spec.seeds:
                    safe = method.replace(":", "_").replace(",", "_").replace("=", "")
                    directory = out_dir / "runs" / label / safe / f"n{size}_s{seed}"
                    runs.append(RunSpec(label, method, size, seed, str(directory), spec.to_dict()))
    return runs


def run_one(run: RunSpec) -> dict:
    """Fine-tune, generate, evaluate one run; write and return its ``result.json``.

    The data subset depends on the seed only (``data_seed = seed``), so at one (size, seed)
    every method sees the same target showers.
    """
    from ..data.io import read_showers
    from ..evaluate.scoring import score_showers
    from ..generate import iter_generate
    from ..geometry import get_geometry
    from ..models.checkpoint import load_model
    from ..showers import Showers

    spec = SweepSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in run.sweep.items()})
    torch.set_num_threads(spec.threads)
    directory = Path(run.directory)
    result_path = directory / "result.json"
    geometry = get_geometry(spec.geometry)
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if spec.floor is not None and result.get("floor") != spec.floor and "geometric_mean" in result:
            # finished before a floor was given: score the floor, keep the run
            reference = read_showers(spec.reference, geometry, stop=spec.n_eval)
            result.update(_floor_result(spec, reference, geometry, run.seed, result["geometric_mean"]))
            _write_result(result_path, result)
        return result
    started = time.perf_counter()
    converged = is_converged(run.method)
    if run.method == ZERO_SHOT:
        model, sampler = load_model(spec.checkpoints[run.pretrained])
        summary, parameters = {"best": None, "steps": 0}, []
    else:
        method = parse_method(run.method)
        config = adaptation_config(method.name, run.size, lr_by_size=spec.lr_by_size, flow=method.flow,
                                   val_every=spec.val_every,
                                   steps=converged_max_steps(spec.steps, spec.max_steps) if converged else spec.steps,
                                   batch_size=spec.batch_size, max_points=spec.max_points, n_samples=run.size,
                                   val_fraction=spec.val_fraction, patience=spec.patience if converged else None,
                                   seed=run.seed, data_seed=run.seed, device="cpu")
        summary, model, sampler = adapt_model(spec.checkpoints[run.pretrained], spec.data, geometry, directory,
                                              method, config)
        parameters = json.loads((directory / "parameters.json").read_text())["groups"]
    train_s = time.perf_counter() - started
    reference = read_showers(spec.reference, geometry, stop=spec.n_eval)
    generated = Showers.concatenate(list(iter_generate(model, geometry, reference.incident_energy_mev,
                                                       sampler.with_steps(spec.n_steps_sampler), seed=run.seed,
                                                       particle=reference.particle, theta_deg=reference.theta_deg,
                                                       phi_deg=reference.phi_deg)))
    table = score_showers(generated, reference, geometry, seed=run.seed)
    result = {"pretrained": run.pretrained, "backbone": model.config.backbone,
              "geometry_conditioning": model.config.geometry_conditioning,
              "method": run.method, "size": run.size, "seed": run.seed,
              "geometric_mean": table.geometric_mean, "geometric_mean_std": table.geometric_mean_std,
              "scores": table.as_dict()["scores"], "parameters": parameters,
              **whole_model_parameters(parameters), "steps": int(summary["steps"]),
              "stopped_early": bool(converged and summary["steps"] < config.steps),
              "best_validation": summary["best"], "train_s": train_s}
    if spec.floor is not None:
        result.update(_floor_result(spec, reference, geometry, run.seed, table.geometric_mean))
    result["total_s"] = time.perf_counter() - started
    _write_result(result_path, result)
    return result


def _finished(run: RunSpec, spec: SweepSpec) -> bool:
    """A run is finished when its result exists (and holds the floor, when the sweep has one)."""
    path = Path(run.directory) / "result.json"
    if not path.exists():
        return False
    return spec.floor is None or json.loads(path.read_text()).get("floor") == spec.floor


def _floor_result(spec: SweepSpec, reference, geometry, seed: int, geometric_mean: float) -> dict:
    """The floor's scores against the reference (same scoring as the generated showers) and G / G_floor."""
    from ..data.io import read_showers
    from ..evaluate.scoring import score_showers

    floor = read_showers(spec.floor, geometry, stop=spec.n_eval)
    table = score_showers(floor, reference, geometry, seed=seed)
    g_floor = table.geometric_mean
    return {"floor": spec.floor, "n_floor": len(floor), "geometric_mean_floor": g_floor,
            "geometric_mean_floor_std": table.geometric_mean_std, "scores_floor": table.as_dict()["scores"],
            "ratio_to_floor": geometric_mean / g_floor if g_floor and np.isfinite(g_floor) and g_floor > 0 else None}


def _write_result(path: Path, result: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(result, nan_as_null=False), indent=2))


def run_sweep(spec: SweepSpec, out_dir: str | Path, *, executor: str = "local", workers: int | None = None,
              slurm: dict | None = None, log=print) -> list[dict]:
    """Run every unfinished run of the grid; return the results of all runs.

    Arguments:
        executor: ``local`` (worker processes on this machine) or ``slurm`` (submitit job array).
        workers: local worker processes (default: the usable cores // threads per run).
        slurm: submitit parameters for ``slurm`` (e.g. ``{"slurm_partition": "gpu", "timeout_min": 240}``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "sweep.json") as tmp:
        tmp.write_text(json.dumps(spec.to_dict(), indent=2))
    runs = plan_runs(spec, out_dir)
    todo = [r for r in runs if not _finished(r, spec)]
    log(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run ({executor})")
    if executor == "local":
        workers = workers or max(1, usable_cores() // spec.threads)
        if workers == 1:
            for i, run in enumerate(todo):
                log(f"[{i + 1}/{len(todo)}] {run.label}")
                run_one(run)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for i, (run, _) in enumerate(zip(todo, pool.map(run_one, todo))):
                    log(f"[{i + 1}/{len(todo)}] {run.label} done")
    elif executor == "slurm":
        import submitit

        pool = submitit.AutoExecutor(folder=str(out_dir / "slurm"))
        pool.update_parameters(cpus_per_task=spec.threads, **(slurm or {}))
        jobs = pool.map_array(run_one, todo)
        log(f"submitted {len(jobs)} Slurm jobs; waiting")
        for job in jobs:
            job.result()
    else:
        raise InputError(f"unknown executor {executor!r}; expected local or slurm")
    return [json.loads((Path(r.directory) / "result.json").read_text()) for r in runs]
