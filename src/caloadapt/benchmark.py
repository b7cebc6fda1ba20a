"""Generation speed: milliseconds per shower and showers per second, model versus simulator.

:func:`run_benchmark` times, for ILD-like photons of one incident energy (50 GeV):

- ``simulator``: the embedded GFlash simulator (:func:`caloadapt.simulate.simulate`, hits);
- ``heun`` / ``euler``: the diffusion model with N sampler steps (2N-1 and N network evaluations);
- ``one_step``: the consistency-distilled model (one network evaluation), when a distilled
  checkpoint is given (otherwise skipped, with a note);
- ``one_step_compiled`` (with ``compile``): the same with the flow's sampling compiled
  (:meth:`~caloadapt.models.flow.ShowerFlow.compile_sampling`; the warm-up runs compile);
- ``onnx_one_step`` (or ``onnx_heun`` without a distilled model): the same through onnxruntime;
- ``exported_one_step``: the distilled model's whole generator exported to one TorchScript file
  (:mod:`caloadapt.export.torchscript`, DDML's contract) and called once per shower, as a Geant4
  host calls it (the file works at batch 1; a batch is that many calls; its output is the points
  a host reads, with no digitisation of them);
- ``reference_net``: one evaluation of the reference network, the CaloClouds II PointWise-Net
  (arXiv:2309.05704; :class:`~caloadapt.models.pointwise.PointwiseNet` with its default widths:
  504,920 parameters) on ``REFERENCE_POINTS`` points per shower, the points of a 50 GeV ILD photon in
  that paper's model. A one-step generator is only worth having if a whole shower costs less than
  this one evaluation, so it is timed in the same run and the ratio is reported side by side;
- ``reference_net_fused``: the same evaluation through the fused layers caloadapt's own generation
  uses (a stricter reference: the ratio against it is reported too);

at several batch sizes (1, 100, 1000), with one thread and with all threads, and on CUDA when
present. Every model case is end to end: flow sampling, point sampling, post-processing and
digitisation to cells (the simulator also returns digitised hits). Each measurement has warm-up
runs and repeats (fast cases repeat until a second is timed); the JSON holds the median, minimum,
maximum and inter-quartile range. A second table gives the cost per shower against the incident
energy (calochallenge-3 electrons, 1 GeV to 1 TeV, one thread). Measurements that would exceed the
time budget per measurement (estimated from the smaller batch) or the free memory are skipped and
say so.

The hardware (CPU model, cores, memory, load, GPU), library versions, energies and points per
shower are recorded. :func:`format_table` renders the results as a short text table.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ._atomic import atomic_path
from ._provenance import available_bytes, hardware_info, library_versions, to_jsonable, usable_cores
from ._timing import limited_threads, time_runs
from .errors import CheckpointError
from .models.sampling import Sampler

__all__ = ["run_benchmark", "format_table", "hardware_info", "library_versions", "TARGET_MS", "TARGET_MS_BATCH_1",
           "TARGET_SPEEDUP", "REFERENCE_POINTS", "SCHEMA"]

SCHEMA = "caloadapt-benchmark/1"
#: targets of one-step generation of 50 GeV ILD-like photons on one CPU thread, end to end: ms per shower at
#: batch 100 and at batch 1, and how many times faster than one evaluation of the reference network
TARGET_MS = 2.0
TARGET_MS_BATCH_1 = 5.0
TARGET_SPEEDUP = 5.0
#: points per shower of the reference network's evaluation (a 50 GeV ILD photon, CaloClouds II)
REFERENCE_POINTS = 850

_FULL = {"batch_sizes": (1, 100, 1000), "repeats": 5, "min_timed_s": 1.0, "warmup": 1, "budget_s": 120.0,
         "scan_energies_gev": (1.0, 10.0, 100.0, 1000.0), "scan_batch": 100}
_QUICK = {"batch_sizes": (1, 8), "repeats": 3, "min_timed_s": 0.0, "warmup": 1, "budget_s": 20.0,
          "scan_energies_gev": (1.0, 10.0), "scan_batch": 8}


# -- the cases ---------------------------------------------------------------------------------------------------

def _simulator_run(geometry, particle: str, energy_mev: np.ndarray, angles: dict | None = None) -> Callable[[], dict]:
    """One timed simulation; ``angles``: ``theta_deg`` / ``phi_deg`` of the showers (none: normal incidence)."""
    from .simulate import simulate

    counter = iter(range(10**9))

    def run() -> dict:
        hits = simulate(geometry, particle, energy_mev, seed=next(counter), **(angles or {}))
        return {"mean_hits": float(hits.n_points.mean())}
    return run


def _model_run(model, geometry, particle: str, energy_mev: np.ndarray, *, sampler: str, n_steps: int,
               device: torch.device, settings: Sampler | None, denoiser=None,
               angles: dict | None = None) -> Callable[[], dict]:
    """One timed generation of hits; ``settings``: the distilled checkpoint's sampler for ``consistency``;
    ``angles`` as for :func:`_simulator_run`. The first call (a warm-up one) generates the points and
    digitises them apart, to count the points; every later call generates the hits in one go."""
    chosen = settings.with_steps(n_steps) if sampler == "consistency" and settings is not None else Sampler(sampler,
                                                                                                           n_steps)
    generator = torch.Generator(device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    counted = {}  # the generated points per shower, counted on the first (warm-up) call

    def run() -> dict:
        with torch.inference_mode():
            if not counted:  # the points, then their hits: what the others time in one call
                showers = model.generate(geometry, energy_mev, chosen, generator=generator, particle=particle,
                                         denoiser=denoiser, **(angles or {}))
                counted["mean_points"] = float(showers.n_points.mean())
                hits = geometry.digitise(showers)
            else:
                hits = model.generate(geometry, energy_mev, chosen, generator=generator, particle=particle,
                                      denoiser=denoiser, digitise=True, **(angles or {}))
        sync()
        return {**counted, "mean_hits": float(hits.n_points.mean())}
    return run


def _reference_run(batch: int, device: torch.device, fused: bool = False) -> Callable[[], dict]:
    """One evaluation of the reference network (default PointWise-Net) on ``REFERENCE_POINTS`` points
    per shower, fixed random inputs at a mid-range noise level (sigma = 1): layer by layer as the
    reference implementation computes it, or (``fused``) through the fused evaluation that
    caloadapt's own generation uses (:class:`~caloadapt.models.fused.FusedDenoiser`)."""
    from .models.edm import EDMPrecond
    from .models.fused import FusedDenoiser
    from .models.pointwise import PointwiseNet

    generator = torch.Generator().manual_seed(0)
    net = PointwiseNet().to(device).eval()
    x = torch.randn(batch, REFERENCE_POINTS, 4, generator=generator).to(device)
    context = torch.rand(batch, 2, generator=generator).to(device)
    sigma = torch.ones(batch, device=device)
    evaluate = FusedDenoiser(EDMPrecond(net)).to(device) if fused else (
        lambda x, sigma, context: net(x, sigma.log() / 4, context))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> dict:
        with torch.inference_mode():
            evaluate(x, sigma, context)
        sync()
        return {"mean_points": float(REFERENCE_POINTS)}
    return run


def _nfe(sampler: str, n_steps: int) -> int:
    return {"heun": 2 * n_steps - 1, "euler": n_steps}.get(sampler, n_steps)


def _memory_estimate(model, batch: int, points: float | None) -> float | None:
    """Rough peak bytes of one batch through the point network (a few float32 activations)."""
    if points is None:
        return None
    width = max(getattr(model.config, "widths", (512,)))
    return 6.0 * 4 * batch * points * width


def _row(case: str, engine: str, device: str, threads: int | None, batch: int, sampler: str | None,
         n_steps: int | None, energy_gev: float, geometry: str, particle: str) -> dict:
    return {"case": case, "engine": engine, "device": device, "threads": threads, "batch_size": batch,
            "sampler": sampler, "n_steps": n_steps, "nfe": None if sampler is None else _nfe(sampler, n_steps),
            "geometry": geometry, "particle": particle, "energy_gev": energy_gev}


def _load_models(checkpoint, distilled):
    from .models.checkpoint import load_model
    from .pretrained import default_checkpoint

    notes = []
    checkpoint = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    model, sampler = load_model(checkpoint)
    model.eval()
    one_step = None
    if distilled is not None:
        student, student_sampler = load_model(distilled)
        if not student_sampler.distilled:
            raise CheckpointError(f"{distilled}: not a distilled (consistency) checkpoint")
        one_step = (student.eval(), student_sampler, str(distilled))
    elif sampler.distilled:
        one_step = (model, sampler, str(checkpoint))
        notes.append("the checkpoint is distilled: heun/euler are timed with the student network (same "
                     "architecture and flow as the teacher, so the same cost; their showers are not meaningful)")
    if one_step is None:
        notes.append("one-step case skipped: give a distilled checkpoint (caloadapt distill) to time it")
    return model, str(checkpoint), one_step, notes


def run_benchmark(checkpoint: str | os.PathLike[str] | None = None,
                  out_path: str | os.PathLike[str] = "benchmark.json", *, quick: bool = False,
                  device: str = "auto", distilled: str | os.PathLike[str] | None = None,
                  batch_sizes: Sequence[int] | None = None, threads: Sequence[int] | None = None,
                  n_steps: int = 13, repeats: int | None = None, warmup: int | None = None,
                  budget_s: float | None = None, energy_gev: float = 50.0, theta_deg: float = 90.0,
                  scan_energies_gev: Sequence[float] | None = None, scan_batch: int | None = None,
                  onnx: bool = True, simulator: bool = True, compile: bool = False,
                  log: Callable[[str], None] | None = None) -> dict:
    """Measure generation speed; write the results as JSON and :func:`format_table`'s text beside it
    (``out_path`` with suffix ``.txt``), both atomically; return them.

    Arguments:
        checkpoint: the diffusion model (None: the shipped pre-trained model). A distilled
            checkpoint is also accepted (then it provides the one-step case).
        out_path: JSON output.
        quick: small settings for a smoke test (batch 1 and 8, 3 repeats, energies 1 and 10 GeV).
        device: ``auto`` (CPU, plus CUDA when present), ``cpu`` or ``cuda``.
        distilled: a distilled checkpoint for the ``one_step`` case (else skipped with a note).
        batch_sizes: showers per batch (default 1, 100, 1000; quick 1, 8).
        threads: CPU thread counts (default 1 and all usable cores).
        n_steps: Heun/Euler steps N (13: CaloClouds II).
        repeats, warmup: timed and warm-up runs per measurement (5 and 1; quick 3 and 1). Without
            ``quick``, a measurement whose runs take less than a second in all goes on (up to 200
            runs) until one second is timed: fast cases get a median of many runs.
        budget_s: time budget per measurement; larger batches estimated to exceed it are skipped
            (default 120 s; quick 20 s).
        energy_gev: incident energy of the ILD photons of the main table (50 GeV).
        theta_deg: their polar angle of incidence (90: normal incidence; another angle needs a model
            trained with angle conditioning, docs/inclined.md).
        scan_energies_gev, scan_batch: the calochallenge-3 electron energy scan (1, 10, 100,
            1000 GeV at batch 100, one thread; quick 1, 10 GeV at batch 8).
        onnx: include the onnxruntime case (needs onnx, onnxscript, onnxruntime).
        simulator: include the embedded simulator.
        compile: also time the one-step case with its flow compiled (``one_step_compiled``, main table
            only; a note says why when torch cannot compile here).
        log: progress messages (e.g. ``print``); None is silent.

    Returns:
        ``{"schema", "created", "quick", "hardware", "versions", "checkpoint", "settings",
        "results": [rows], "energy_scan": {..., "results": [rows]}, "summary", "notes"}``; every row
        has ``case, engine, device, threads, batch_size, sampler, n_steps, nfe, geometry,
        particle, energy_gev`` and either ``ms_per_shower``/``showers_per_s`` statistics
        (median, min, max, iqr, mean, n), ``mean_points``/``mean_hits`` and ``repeats``, or
        ``skipped`` with the reason.
    """
    from .geometry import get_geometry
    from .train.loop import resolve_device

    say = log or (lambda message: None)
    defaults = _QUICK if quick else _FULL
    batch_sizes = tuple(sorted(int(b) for b in (batch_sizes or defaults["batch_sizes"])))
    usable = usable_cores()
    threads = tuple(dict.fromkeys(int(t) for t in (threads or (1, usable))))
    repeats = int(repeats or defaults["repeats"])
    min_timed_s = defaults["min_timed_s"]
    warmup = int(defaults["warmup"] if warmup is None else warmup)
    budget_s = float(budget_s or defaults["budget_s"])
    scan_energies = tuple(float(e) for e in (scan_energies_gev or defaults["scan_energies_gev"]))
    scan_batch = int(scan_batch or defaults["scan_batch"])
    devices = [torch.device("cpu")]
    if device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif device == "cuda":
        resolve_device("cuda")  # raises the clear "no CUDA device" error
    elif device not in ("auto", "cpu"):
        from .errors import InputError

        raise InputError(f"unknown device {device!r}; expected auto, cpu or cuda")

    model, checkpoint_name, one_step, notes = _load_models(checkpoint, distilled)
    if theta_deg != 90.0 and not model.config.angle_conditioning:
        from .errors import InputError

        raise InputError(f"--theta {theta_deg:g}: {checkpoint_name} was trained without angle conditioning and "
                         "generates normal incidence only (theta 90)")
    hardware = hardware_info()
    ild, ds3 = get_geometry("ild-ecal"), get_geometry("calochallenge-3")
    ild_particle = "photon"
    results: list[dict] = []
    previous: dict[tuple, dict] = {}  # (case, device, threads) -> last measurement, for the estimates

    def measure(row: dict, make_run: Callable[[], Callable[[], dict]], net_model) -> dict:
        key = (row["case"], row["engine"], row["device"], row["threads"], row["geometry"], row["energy_gev"])
        last = previous.get(key)
        estimate = None
        if last is not None and "ms_per_shower" in last:
            estimate = last["ms_per_shower"]["median"] * row["batch_size"] / 1000.0
            points = last.get("mean_points")
            need = _memory_estimate(net_model, row["batch_size"], points) if net_model is not None else None
            free = available_bytes()
            if need is not None and free is not None and need > 0.5 * free:
                row["skipped"] = f"estimated {need / 2**30:.1f} GiB of activations, {free / 2**30:.1f} GiB free"
                return row
        try:
            row.update(time_runs(make_run(), row["batch_size"], repeats=repeats, warmup=warmup, budget_s=budget_s,
                                estimate_s=estimate, min_timed_s=min_timed_s))
        except (MemoryError, torch.OutOfMemoryError) as err:  # record, go on with the other cases
            row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if "ms_per_shower" in row:
            previous[key] = row
        say(_row_line(row))
        return row

    onnx_files: dict[str, Path] = {}
    workdir = tempfile.TemporaryDirectory(prefix="caloadapt-benchmark-")
    try:
        if onnx:
            try:
                from .export.onnx import export_onnx

                if one_step is not None:
                    onnx_files["one_step"] = export_onnx(one_step[0], Path(workdir.name) / "one_step.onnx",
                                                         consistency=one_step[1].to_dict())
                else:
                    onnx_files["heun"] = export_onnx(model, Path(workdir.name) / "heun.onnx")
            except Exception as err:  # noqa: BLE001 - the other cases still run
                notes.append(f"ONNX case skipped: {type(err).__name__}: {err}")
        scripted = None
        if one_step is not None and theta_deg == 90.0:
            try:
                from .export.torchscript import export_torchscript

                scripted = export_torchscript(one_step[0], ild, one_step[1], Path(workdir.name) / "one_step.pt",
                                              max_points=20_000)
            except Exception as err:  # noqa: BLE001 - the other cases still run
                notes.append(f"TorchScript case skipped: {type(err).__name__}: {err}")
        energy = float(energy_gev)
        angles = {} if theta_deg == 90.0 else {"theta_deg": float(theta_deg), "phi_deg": 90.0}

        compiled = None
        if compile and one_step is not None:
            compiled = copy.deepcopy(one_step[0])
            try:
                compiled.flow.compile_sampling()
            except RuntimeError as err:
                notes.append(f"one_step_compiled skipped: {err}")
                compiled = None

        def model_cases(dev: torch.device, scan: bool = False):
            cases = [("heun", "heun", n_steps, model)] + ([] if scan else [("euler", "euler", n_steps, model)])
            if one_step is not None:
                cases.append(("one_step", "consistency", 1, one_step[0]))
            if compiled is not None and not scan:  # each batch shape compiles: not in the energy scan
                cases.append(("one_step_compiled", "consistency", 1, compiled))
            return [(name, sampler, steps, m.to(dev)) for name, sampler, steps, m in cases]

        # main table: ILD photons at one energy
        for dev in devices:
            for n_threads in (threads if dev.type == "cpu" else (None,)):
                with limited_threads(n_threads):
                    say(f"-- {dev.type}, threads {n_threads if n_threads is not None else 'n/a'}")
                    for batch in batch_sizes:
                        energies = np.full(batch, energy * 1000.0)
                        if simulator and dev.type == "cpu":
                            row = _row("simulator", "numpy", "cpu", n_threads, batch, None, None, energy, ild.name,
                                       ild_particle)
                            results.append(measure(row, lambda: _simulator_run(ild, ild_particle, energies, angles),
                                                   None))
                        for case, fused in (("reference_net", False), ("reference_net_fused", True)):
                            row = _row(case, "torch", dev.type, n_threads, batch, None, None, energy, ild.name,
                                       ild_particle)
                            row["nfe"] = 1
                            results.append(measure(row, lambda fused=fused: _reference_run(batch, dev, fused), None))
                        for name, sampler, steps, m in model_cases(dev):
                            row = _row(name, "torch", dev.type, n_threads, batch, sampler, steps, energy, ild.name,
                                       ild_particle)
                            settings = one_step[1] if sampler == "consistency" else None
                            results.append(measure(row, lambda m=m, sampler=sampler, steps=steps, settings=settings:
                                                   _model_run(m, ild, ild_particle, energies, sampler=sampler,
                                                              n_steps=steps, device=dev, settings=settings,
                                                              angles=angles), m))
                        if dev.type == "cpu" and scripted is not None:
                            row = _row("exported_one_step", "torchscript", "cpu", n_threads, batch, "consistency",
                                       1, energy, ild.name, ild_particle)
                            results.append(measure(row, lambda: _torchscript_run(scripted, ild, energy, batch), None))
                        if dev.type == "cpu":
                            for name, path in onnx_files.items():
                                results.append(measure(*_onnx_case(name, path, model, one_step, n_threads, batch,
                                                                   n_steps, energy, ild, ild_particle, energies,
                                                                   angles)))

        # energy scan: calochallenge-3 electrons, one thread
        scan_rows: list[dict] = []
        with limited_threads(1):
            say("-- energy scan: calochallenge-3 electrons, 1 thread")
            for e in scan_energies:
                for batch in sorted({1, scan_batch}):
                    energies = np.full(batch, e * 1000.0)
                    if simulator:
                        row = _row("simulator", "numpy", "cpu", 1, batch, None, None, e, ds3.name, "electron")
                        scan_rows.append(measure(row, lambda: _simulator_run(ds3, "electron", energies), None))
                    for name, sampler, steps, m in model_cases(torch.device("cpu"), scan=True):
                        row = _row(name, "torch", "cpu", 1, batch, sampler, steps, e, ds3.name, "electron")
                        settings = one_step[1] if sampler == "consistency" else None
                        scan_rows.append(measure(row, lambda m=m, sampler=sampler, steps=steps, settings=settings:
                                                 _model_run(m, ds3, "electron", energies, sampler=sampler,
                                                            n_steps=steps, device=torch.device("cpu"),
                                                            settings=settings), m))
    finally:
        workdir.cleanup()

    report = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "hardware": hardware,
        "versions": library_versions(),
        "checkpoint": {"path": checkpoint_name, "model_config": model.config.to_dict(),
                       "distilled": None if one_step is None else one_step[2],
                       "consistency": None if one_step is None else one_step[1].to_dict()},
        "settings": {"geometry": ild.name, "particle": ild_particle, "energy_gev": energy_gev, "theta_deg": theta_deg,
                     "batch_sizes": list(batch_sizes), "threads": list(threads),
                     "devices": [d.type for d in devices], "n_steps": n_steps, "repeats": repeats,
                     "min_timed_s": min_timed_s, "warmup": warmup,
                     "budget_s": budget_s, "scan_energies_gev": list(scan_energies), "scan_batch": scan_batch,
                     "timed": "one batch end to end: flow sampling, point sampling, post-processing and "
                              "digitisation to cells (simulator: simulation and digitisation)"},
        "results": results,
        "energy_scan": {"geometry": ds3.name, "particle": "electron", "threads": 1, "results": scan_rows},
        "notes": notes,
    }
    report["summary"] = _summary(report)
    report["hardware"]["load_average_end"] = hardware_info()["load_average"]
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(report, nan_as_null=False), indent=2) + "\n")
    with atomic_path(out_path.with_suffix(".txt")) as tmp:
        tmp.write_text(format_table(report) + "\n")
    return report


def _torchscript_run(path: Path, geometry, energy_gev: float, batch: int) -> Callable[[], dict]:
    """``batch`` calls of an exported batch-1 generator (:mod:`caloadapt.export.torchscript`) at ``energy_gev``.
    The first call (a warm-up one) also counts the points and digitises them in ``geometry`` apart, to
    count the hits; the later calls time the file alone."""
    from .export.torchscript import parse_ddml_output
    from .showers import Showers

    module = torch.jit.load(str(path), map_location="cpu")
    n_layers = int(module.n_layers)
    inputs = (torch.tensor([energy_gev]), torch.tensor([0.0]), torch.tensor([0.0]))
    counted: dict[str, float] = {}

    def run() -> dict:
        with torch.inference_mode():
            outputs = [module(*inputs) for _ in range(batch)]
        if not counted:
            bodies = [np.concatenate(parse_ddml_output(out.numpy(), n_layers)) for out in outputs]
            points = np.concatenate([np.stack([-b[:, 1], -b[:, 0], geometry.layer_centres_mm[b[:, 2].astype(int)],
                                               b[:, 3]], axis=1) for b in bodies])
            showers = Showers.from_counts(points, np.array([len(b) for b in bodies]),
                                          np.full(batch, energy_gev * 1000.0), geometry=geometry.name)
            counted.update(mean_points=float(showers.n_points.mean()),
                           mean_hits=float(geometry.digitise(showers).n_points.mean()))
        return dict(counted)
    return run


def _onnx_case(name, path, model, one_step, n_threads, batch, n_steps, energy, geometry, particle, energies, angles):
    from .export.onnx import onnx_model

    base = one_step[0] if name == "one_step" else model
    sampler, steps = ("consistency", 1) if name == "one_step" else ("heun", n_steps)
    row = _row(f"onnx_{name}", "onnxruntime", "cpu", n_threads, batch, sampler, steps, energy, geometry.name, particle)

    def make_run():
        view = onnx_model(base.cpu(), path, threads=n_threads)
        return _model_run(view, geometry, particle, energies, sampler=sampler, n_steps=steps,
                          device=torch.device("cpu"), settings=one_step[1] if one_step else None,
                          denoiser=view.denoiser, angles=angles)
    return row, make_run, base


def _find(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if "ms_per_shower" in r and all(r.get(k) == v for k, v in match.items())]


def _targets(ms_by_batch: dict[int, float], reference: dict[int, float]) -> dict[str, bool]:
    """Which one-step targets the median ms per shower of one case (one thread, by batch size) meets,
    the speed-up against the reference network's medians of the same run."""
    targets = {"batch 100: <= 2 ms/shower": ms_by_batch.get(100, math.inf) <= TARGET_MS,
               "batch 1: <= 5 ms/shower": ms_by_batch.get(1, math.inf) <= TARGET_MS_BATCH_1,
               "batch 100: >= 5 x faster than the reference network":
                   reference.get(100, 0.0) / ms_by_batch.get(100, math.inf) >= TARGET_SPEEDUP}
    return {name: bool(met) for name, met in targets.items()}


def _summary(report: dict) -> dict:
    rows = report["results"]
    summary: dict = {"target_ms": TARGET_MS, "target_ms_batch_1": TARGET_MS_BATCH_1, "target_speedup": TARGET_SPEEDUP}

    def by_batch(case: str) -> dict[int, float]:  # one CPU thread, median ms per shower
        return {r["batch_size"]: r["ms_per_shower"]["median"] for r in _find(rows, case=case, device="cpu", threads=1)}

    sim_by_batch, reference, one_by_batch = by_batch("simulator"), by_batch("reference_net"), by_batch("one_step")
    reference_fused = by_batch("reference_net_fused")
    summary["simulator_ms_per_shower_1_thread"] = {str(b): v for b, v in sim_by_batch.items()}
    summary["reference_net_ms_per_shower_1_thread"] = {str(b): v for b, v in reference.items()}
    summary["reference_net_fused_ms_per_shower_1_thread"] = {str(b): v for b, v in reference_fused.items()}
    if one_by_batch:
        batch, ms = min(one_by_batch.items(), key=lambda item: item[1])
        summary["one_step_ms_per_shower_1_thread"] = {str(b): v for b, v in one_by_batch.items()}
        summary["one_step_best"] = {"ms_per_shower": ms, "batch_size": batch}
        if batch in sim_by_batch:
            summary["one_step_over_simulator"] = ms / sim_by_batch[batch]
        # the reference network's time over the one-step generator's, batch by batch (same run, same thread)
        speedup = {b: reference[b] / v for b, v in one_by_batch.items() if b in reference}
        summary["one_step_speedup_over_reference"] = {str(b): v for b, v in speedup.items()}
        # and over the same network evaluated the way caloadapt evaluates its own (a stricter comparison)
        summary["one_step_speedup_over_reference_fused"] = {
            str(b): reference_fused[b] / v for b, v in one_by_batch.items() if b in reference_fused}
        summary["one_step_targets"] = _targets(one_by_batch, reference)
        compiled = by_batch("one_step_compiled")
        if compiled:
            summary["one_step_compiled_ms_per_shower_1_thread"] = {str(b): v for b, v in compiled.items()}
            summary["one_step_compiled_speedup_over_reference"] = {
                str(b): reference[b] / v for b, v in compiled.items() if b in reference}
            summary["one_step_compiled_targets"] = _targets(compiled, reference)
    else:
        summary["one_step_best"] = None
    heun = by_batch("heun")
    if heun:
        batch, ms = min(heun.items(), key=lambda item: item[1])
        summary["heun_best"] = {"ms_per_shower": ms, "batch_size": batch}
        if batch in sim_by_batch:
            summary["heun_over_simulator"] = ms / sim_by_batch[batch]
        if one_by_batch:
            summary["heun_over_one_step"] = ms / summary["one_step_best"]["ms_per_shower"]
    return summary


# -- text table ----------------------------------------------------------------------------------------------

def _fmt_ms(stats: dict) -> str:
    return f"{stats['median']:.3g} [{stats['min']:.3g}-{stats['max']:.3g}]"


def _row_line(row: dict) -> str:
    head = (f"{row['case']:<19} {row['engine']:<11} {row['device']:<4} "
            f"{'-' if row['threads'] is None else row['threads']:>3} {row['batch_size']:>5} "
            f"{'-' if row['nfe'] is None else row['nfe']:>3}")
    if "skipped" in row:
        return f"{head}  skipped: {row['skipped']}"
    points = row.get("mean_points", row.get("mean_hits"))
    return (f"{head}  {_fmt_ms(row['ms_per_shower']):>24} {row['showers_per_s']['median']:>10.4g} "
            f"{points:>8.0f} {row.get('mean_hits', math.nan):>7.0f}")


def format_table(results: dict) -> str:
    """A short text rendering of :func:`run_benchmark` results (main table, energy scan, summary)."""
    hw = results["hardware"]
    gpus = ", ".join(g["name"] for g in hw.get("gpus") or []) or "none"
    s = results["settings"]
    lines = [f"caloadapt benchmark ({'quick' if results.get('quick') else 'full'}): {s['geometry']} {s['particle']}s "
             f"at {s['energy_gev']:g} GeV, theta {s.get('theta_deg', 90.0):g} deg; N = {s['n_steps']} sampler steps",
             f"CPU: {hw['cpu_model']} ({hw['usable_cores']} usable of {hw['logical_cores']} logical cores), "
             f"GPU: {gpus}; load average {hw.get('load_average')}; torch {results['versions']['torch']}, "
             f"onnxruntime {results['versions'].get('onnxruntime')}",
             "",
             f"{'case':<19} {'engine':<11} {'dev':<4} {'thr':>3} {'batch':>5} {'NFE':>3}  "
             f"{'ms/shower median [min-max]':>24} {'showers/s':>10} {'points':>8} {'hits':>7}"]
    lines += [_row_line(r) for r in results["results"]]
    scan = results.get("energy_scan", {})
    if scan.get("results"):
        lines += ["", f"cost per shower vs incident energy: {scan['geometry']} {scan['particle']}s, 1 thread"]
        lines += [f"{'E/GeV':>6} {'case':<19} {'engine':<11} {'dev':<4} {'thr':>3} {'batch':>5} {'NFE':>3}  "
                  f"{'ms/shower median [min-max]':>24} {'showers/s':>10} {'points':>8} {'hits':>7}"]
        lines += [f"{r['energy_gev']:>6g} {_row_line(r)}" for r in scan["results"]]
    summary = results.get("summary", {})
    lines.append("")
    best = summary.get("one_step_best")
    if best:
        ratio = summary.get("one_step_over_simulator")
        ratio_text = ""
        if ratio is not None:
            faster = (f"the simulator is {ratio:.3g} x faster" if ratio > 1
                      else f"{1 / ratio:.3g} x faster than the simulator")
            ratio_text = f"; {ratio:.3g} x the embedded simulator's cost per shower at that batch size ({faster})"
        lines.append(f"one-step, 1 CPU thread: {best['ms_per_shower']:.3g} ms/shower at batch {best['batch_size']}"
                     f"{ratio_text}")
        for key, heading in (("one_step_targets", None),
                             ("one_step_compiled_targets", "one-step with the flow compiled, 1 CPU thread:")):
            if key in summary:
                lines += [heading] if heading else []
                lines += [f"  target {name}: {'met' if ok else 'not met'}" for name, ok in summary[key].items()]
        fused = summary.get("one_step_speedup_over_reference_fused", {})
        for batch, speedup in summary.get("one_step_speedup_over_reference", {}).items():
            also = f"; {fused[batch]:.3g} x against its fused evaluation" if batch in fused else ""
            lines.append(f"one-step at batch {batch}: {speedup:.3g} x faster than one evaluation of the reference "
                         f"network on {REFERENCE_POINTS} points, timed in the same run "
                         f"(target >= {summary['target_speedup']:g} x){also}")
    else:
        lines.append("one-step: not measured (no distilled checkpoint)")
    if summary.get("heun_best"):
        h = summary["heun_best"]
        extra = f", {summary['heun_over_simulator']:.3g} x the simulator" if "heun_over_simulator" in summary else ""
        lines.append(f"heun N={s['n_steps']}, 1 CPU thread: {h['ms_per_shower']:.3g} ms/shower at batch "
                     f"{h['batch_size']}{extra}")
    lines += [f"note: {n}" for n in results.get("notes", [])]
    return "\n".join(lines)
