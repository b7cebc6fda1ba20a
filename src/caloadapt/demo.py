"""``caloadapt demo``: the whole study on a laptop CPU, offline, in minutes.

1. target data: CaloChallenge-dataset-3-like electrons from the embedded simulator (or real files),
   and the floor: a second simulated sample at the reference's incident energies (another seed);
2. the shipped pre-trained model (ILD-like photons) adapted with 100 target showers by each method
   of ``--methods`` (default: full fine-tuning and LoRA in the point network and the flow) and the
   from-scratch baseline with the same budget (``scratch``) and, when asked for, trained to convergence
   (``scratch-converged``: early stopping on its validation split, ``patience`` validations, at most
   ``max_steps`` steps);
3. each adapted model distilled into its one-step student (:mod:`caloadapt.adapt.one_step`: from the
   shipped student of the pre-trained model; the scratch baseline's from its own network), which is
   what generates the showers: milliseconds per shower. With ``teachers`` the adapted models also
   generate with their own multi-step sampler (seconds per shower: the long version of the study);
4. showers generated conditioned on the held-out reference energies, each evaluated against the
   held-out reference beside the floor (G / G_floor); a report, the plots and ``metrics.json``.

Methods are written as for ``caloadapt sweep``: ``name`` or ``name:key=value,...``, e.g.
``bitfit:flow=frozen`` (the flow frozen) or ``lora:rank=4``. Trainable parameters are counted for
the point network and the flow together.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ._atomic import atomic_path
from ._provenance import to_jsonable
from .adapt.one_step import one_step_config, one_step_student
from .data import ShowerWriter, write_showers
from .data.io import count_showers, file_geometry, read_showers
from .errors import InputError
from .evaluate.pipeline import EvaluationOptions, run_evaluation
from .evaluate.report import Document
from .generate import iter_generate
from .geometry import get_geometry
from .models.adapters import check_available
from .models.checkpoint import load_model
from .pretrained import default_checkpoint, shipped_student
from .simulate import sample_incident_energies, simulate
from .sweep.recipe import (SCRATCH_CONVERGED, ZERO_SHOT, adapt_model, adaptation_config, converged_max_steps,
                           is_converged, parse_method, whole_model_parameters)
from .train import resolve_device

__all__ = ["DemoSettings", "run_demo", "METHODS", "ONE_STEP", "TEACHER"]

#: the default methods: the same-budget scratch baseline, full fine-tuning and LoRA of rank 8 in the point
#: network and in the flow's hidden layers with the flow's biases (parameter-efficient as a whole, 2 %;
#: docs/fidelity.md, "LoRA in the flow"); BitFit with the flow fully adapted (the published choice, 86 % of the
#: parameters) is ``--methods scratch,full,bitfit``
METHODS = ("scratch", "full", "lora:rank=8,alpha=8,flow=lora")
#: the kinds of generator a row of the demo scores: an adapted model's one-step student, or the adapted
#: model itself with its multi-step sampler (``teachers``)
ONE_STEP, TEACHER = "one-step", "teacher"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; ``quick()`` is the reduced version CI runs."""

    n_adapt: int = 100            # target showers used for adaptation (train + validation)
    n_reference: int = 150        # held-out target showers for the evaluation
    energy_gev: tuple[float, float] = (1.0, 100.0)  # log-uniform, the two lower DS3 decades
    steps: int = 500              # training steps per method (the same budget for all; finetune: 1000)
    batch_size: int = 16
    max_points: int = 256
    one_step_steps: int | None = None  # distillation steps of each student (None: one_step_config's default)
    occupancy_showers: int = 80   # training showers each calibration is fitted on
    teachers: bool = False        # also generate with each adapted model's own multi-step sampler (slow)
    sampler_steps: int | None = None  # teachers: None is the pre-trained checkpoint's own sampler
    n_bootstrap: int = 20
    classifier: str = "cpu"
    fpd_kpd: bool | None = None   # the evaluation's rule: only with >= 10000 showers per sample
    patience: int = 5             # scratch-converged: validations (every steps // 5) without improvement
    max_steps: int | None = None  # scratch-converged: step cap (None: 10 x steps)

    @classmethod
    def quick(cls, teachers: bool = False) -> DemoSettings:
        # 8 sampler steps for the teachers, not fewer: the shipped model's radial compression (asinh) turns
        # the error of a 3-step Heun solve into points metres from the axis, and every shower comes out empty
        return cls(n_adapt=40, n_reference=30, energy_gev=(1.0, 20.0), steps=12, batch_size=8, max_points=64,
                   one_step_steps=6, occupancy_showers=16, teachers=teachers, sampler_steps=8, n_bootstrap=5,
                   classifier="none", fpd_kpd=False, max_steps=60)


def _target_files(out: Path, settings: DemoSettings, target_data: Path | None, reference_data: Path | None,
                  floor_data: Path | None, seed: int, log) -> tuple[Path, Path, Path | None]:
    """Target, reference and floor files: the given ones, or simulated (the floor at the reference's
    incident energies with another seed, so that it is what a perfect simulator conditioned on those
    energies would score; a floor with its own energies would include the energy-sampling spread)."""
    if target_data is not None and reference_data is not None:
        return target_data, reference_data, floor_data
    if (target_data is None) != (reference_data is None):
        raise InputError("give both --target-data and --reference-data, or neither")
    if floor_data is not None:
        raise InputError("--floor-data goes with --target-data and --reference-data; the simulated demo "
                         "simulates its own floor")
    geometry = get_geometry("calochallenge-3")
    rng = np.random.default_rng(seed)
    paths = {}
    for name, n in (("target", settings.n_adapt), ("reference", settings.n_reference)):
        energies = sample_incident_energies(n, settings.energy_gev, "log-uniform", rng)
        log(f"simulating {n} {name} electrons in {geometry.name} ({settings.energy_gev[0]:g}-"
            f"{settings.energy_gev[1]:g} GeV, embedded GFlash simulator)")
        showers = simulate(geometry, "electron", energies, seed=seed + (name == "reference"))
        paths[name] = out / "data" / f"{name}.h5"
        write_showers(paths[name], showers, format="calochallenge")
        if name == "reference":
            log(f"simulating the floor: {n} more electrons at the reference energies (another seed)")
            paths["floor"] = out / "data" / "floor.h5"
            write_showers(paths["floor"], simulate(geometry, "electron", energies, seed=seed + 2),
                          format="calochallenge")
    return paths["target"], paths["reference"], paths["floor"]


def run_demo(out: str | Path = "caloadapt-demo", *, quick: bool = False, teachers: bool = False,
             target_data: Path | None = None,
             reference_data: Path | None = None, floor_data: Path | None = None, checkpoint: Path | None = None,
             device: str = "auto", seed: int = 0, methods: tuple[str, ...] | list[str] | None = None,
             patience: int | None = None, max_steps: int | None = None, log=print) -> list[dict]:
    """Run the demo; returns one row per method (trainable parameters, steps, time, scores, floor).

    Arguments:
        methods: method texts (:data:`METHODS` by default); ``scratch-converged`` adds the scratch
            baseline trained with early stopping.
        teachers: also generate with each adapted model's own multi-step sampler (seconds per shower),
            beside its one-step student.
        patience, max_steps: override :class:`DemoSettings` for ``scratch-converged``.
        floor_data: with real ``target_data``/``reference_data``, a second sample of the reference
            source (ideally at its energies); without it the real-data demo has no floor.
    """
    started = time.perf_counter()
    settings = DemoSettings.quick(teachers) if quick else DemoSettings(teachers=teachers)
    overrides = {k: v for k, v in (("patience", patience), ("max_steps", max_steps)) if v is not None}
    if overrides:
        settings = replace(settings, **overrides)
    if settings.patience < 1:
        raise InputError(f"patience must be at least 1, got {settings.patience}")
    cap = converged_max_steps(settings.steps, settings.max_steps)
    methods = tuple(m.strip() for m in (methods or METHODS))
    if not methods or len(set(methods)) != len(methods):
        raise InputError(f"methods must be distinct and not empty, got {list(methods)}")
    for text in methods:
        if text == ZERO_SHOT:
            raise InputError("zero-shot is a sweep method (caloadapt sweep --methods zero-shot,...)")
        check_available(parse_method(text))  # fail early, before any simulation or training
    if "scratch" not in methods:
        raise InputError("the demo compares with the same-budget scratch baseline: keep 'scratch' in --methods")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target, reference, floor = _target_files(out, settings, target_data, reference_data, floor_data, seed, log)
    geometry = file_geometry(target)
    pretrained = checkpoint or default_checkpoint()
    n_adapt = min(settings.n_adapt, count_showers(target))
    reference_showers = read_showers(reference, geometry, stop=settings.n_reference)
    rows = []
    for text in methods:
        converged = is_converged(text)
        method = parse_method(text)
        name = _directory_name(text)
        steps = cap if converged else settings.steps
        log(f"[{text}] adapting with {n_adapt} target showers, "
            + (f"early stopping (patience {settings.patience}, at most {cap} steps)" if converged
               else f"{settings.steps} steps"))
        run_dir = out / "runs" / name
        # the adapted model is calibrated for its own (slow) sampler only when it generates itself
        config = adaptation_config(method.name, n_adapt, flow=method.flow, val_every=max(1, settings.steps // 5),
                                   steps=steps, batch_size=settings.batch_size, max_points=settings.max_points,
                                   n_samples=n_adapt, val_fraction=0.2, seed=seed, data_seed=seed, device=device,
                                   patience=settings.patience if converged else None,
                                   occupancy_showers=settings.occupancy_showers if settings.teachers else 0)
        t0 = time.perf_counter()
        summary, model, sampler = adapt_model(pretrained, target, geometry, run_dir, method, config, progress=True)
        parameters = json.loads((run_dir / "parameters.json").read_text())["groups"]
        trained = {"method": text, **whole_model_parameters(parameters), "steps": int(summary["steps"]),
                   "max_steps": steps, "stopped_early": bool(converged and summary["steps"] < steps),
                   "train_s": time.perf_counter() - t0, "best_validation": summary["best"]}

        def scored(kind: str, directory: str, model, sampler) -> dict:
            log(f"[{text}] generating {len(reference_showers)} showers ({_sampler_words(sampler)})")
            t0 = time.perf_counter()
            generated = out / "generated" / f"{directory}.h5"
            with ShowerWriter(generated, "calochallenge", geometry) as writer:
                for chunk in iter_generate(model, geometry, reference_showers.incident_energy_mev, sampler,
                                           seed=seed, device=resolve_device(device), progress=True,
                                           theta_deg=reference_showers.theta_deg, phi_deg=reference_showers.phi_deg):
                    writer.append(chunk)
            generate_s = time.perf_counter() - t0
            log(f"[{text}] evaluating against the held-out reference" + (" and the floor" if floor else ""))
            metrics = run_evaluation(generated, reference, geometry, out / "evaluation" / directory,
                                     EvaluationOptions(max_showers=settings.n_reference,
                                                       n_bootstrap=settings.n_bootstrap,
                                                       classifier=settings.classifier, fpd_kpd=settings.fpd_kpd,
                                                       seed=seed, progress=False),
                                     command=f"caloadapt demo ({text}, {kind})", floor=floor)
            result = metrics["summary"]
            return {**trained, "kind": kind, "directory": directory, "sampler": _sampler_words(sampler),
                    "generate_s": generate_s, "ms_per_shower": 1e3 * generate_s / len(reference_showers),
                    "geometric_mean": result["geometric_mean"], "geometric_mean_std": result["geometric_mean_std"],
                    "geometric_mean_floor": result.get("geometric_mean_floor"),
                    "geometric_mean_floor_std": result.get("geometric_mean_floor_std"),
                    "ratio_to_floor": result.get("ratio_to_floor"), "auc_low_level": result.get("auc_low_level"),
                    "auc_low_level_floor": ((metrics.get("floor") or {}).get("summary") or {}).get("auc_low_level")}

        if settings.teachers:
            rows.append(scored(TEACHER, name, model, sampler.with_steps(settings.sampler_steps)))
        # the adapted models start their students from the shipped student; scratch has none and starts
        # from its own network
        init = None if method.name == "scratch" else shipped_student(pretrained)
        start = "init" if init is not None else "teacher" if method.name == "scratch" else "fresh"
        distill_config = one_step_config(replace(config, occupancy_showers=settings.occupancy_showers), start,
                                         settings.one_step_steps)
        log(f"[{text}] distilling its one-step student ({distill_config.steps} steps from "
            + (f"{init.stem})" if init is not None else f"{'its own network' if start == 'teacher' else 'scratch'})"))
        t0 = time.perf_counter()
        one_step_student(run_dir / "model.pt", target, geometry, run_dir / "model-1step.pt", distill_config,
                         init=init, resume=True, progress=True)
        trained["distill_s"] = time.perf_counter() - t0
        rows.append(scored(ONE_STEP, f"{name}-1step", *load_model(run_dir / "model-1step.pt")))
    for row in rows:
        for key, baseline in (("improvement_over_scratch", "scratch"),
                              ("improvement_over_scratch_converged", SCRATCH_CONVERGED)):
            other = next((r["geometric_mean"] for r in rows if r["method"] == baseline and r["kind"] == row["kind"]),
                         None)
            row[key] = None if other is None or row["method"] == baseline else 1 - row["geometric_mean"] / other
    _write_outputs(out, rows, settings, target, reference, floor, time.perf_counter() - started, quick)
    log(format_table(rows))
    log(f"demo finished in {time.perf_counter() - started:.0f} s; report: {out / 'report.md'}")
    return rows


def _sampler_words(sampler) -> str:
    return "one step" if sampler.distilled and sampler.steps == 1 else f"{sampler.steps} {sampler.kind} steps"


def _directory_name(text: str) -> str:
    return text.replace(":", "_").replace(",", "_").replace("=", "")


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:+.1f} %"


def _label(row: dict) -> str:
    """A row's name: the method, and for a one-step student the words saying so."""
    return f"{row['method']}, one step" if row["kind"] == ONE_STEP else row["method"]


def format_table(rows: list[dict]) -> str:
    """The printed table: generator (method; one-step student or the adapted model itself), trainable
    parameters of the whole model (point network + flow), steps trained, training time, milliseconds per
    generated shower, G with its bootstrap spread, G / G_floor and the gain over scratch (of the same kind)."""
    converged = any(r["improvement_over_scratch_converged"] is not None for r in rows)
    width = max(10, *(len(_label(r)) for r in rows))
    lines = [f"{'generator':<{width}} {'trainable (net+flow)':>22} {'steps':>6} {'train [s]':>9} {'ms/shower':>9} "
             f"{'G (W1)':>14} {'G/G_floor':>9} {'vs scratch':>10}" + (f" {'vs converged':>12}" if converged else "")]
    for r in rows:
        params = f"{r['trainable_all']:,} ({r['percent_all']:.1f} %)" if r["percent_all"] >= 0.1 \
            else f"{r['trainable_all']:,} ({r['percent_all']:.2f} %)"
        ratio = "" if r.get("ratio_to_floor") is None else f"{r['ratio_to_floor']:.2f}"
        lines.append(f"{_label(r):<{width}} {params:>22} {r['steps']:>6} {r['train_s']:>9.0f} "
                     f"{r['ms_per_shower']:>9.1f} {r['geometric_mean']:>8.3f}+-{r['geometric_mean_std']:<5.3f} "
                     f"{ratio:>9} {_pct(r['improvement_over_scratch']):>10}"
                     + (f" {_pct(r['improvement_over_scratch_converged']):>12}" if converged else ""))
    floor = next((r for r in rows if r.get("geometric_mean_floor") is not None), None)
    if floor is not None:
        lines.append(f"floor (a second sample of the reference source): G_floor = "
                     f"{floor['geometric_mean_floor']:.3f}+-{floor['geometric_mean_floor_std']:.3f}")
    return "\n".join(lines)


def _write_outputs(out: Path, rows: list[dict], settings: DemoSettings, target: Path, reference: Path,
                   floor: Path | None, wall_s: float, quick: bool) -> None:
    metrics = {"settings": asdict(settings), "quick": quick, "target_data": str(target),
               "reference_data": str(reference), "floor_data": None if floor is None else str(floor),
               "wall_s": wall_s, "methods": rows}
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(to_jsonable(metrics, nan_as_null=False), indent=2))
    doc = Document()
    doc.heading(1, "caloadapt demo")
    doc.paragraph(f"Pre-trained model (ILD-like photons) adapted to {settings.n_adapt} CaloChallenge-dataset-3-like "
                  f"electron showers ({settings.energy_gev[0]:g}-{settings.energy_gev[1]:g} GeV, log-uniform) "
                  f"with {settings.steps} training steps per method (the same budget for all; scratch-converged: "
                  f"early stopping, patience {settings.patience} validations every {max(1, settings.steps // 5)} "
                  f"steps, at most {converged_max_steps(settings.steps, settings.max_steps)} steps), each "
                  "distilled into its one-step student (from the pre-trained model's shipped student; the scratch "
                  "baseline's from its own network), evaluated on "
                  f"{settings.n_reference} held-out showers. Wall time {wall_s:.0f} s.")
    if quick:
        doc.paragraph("Quick mode: reduced sizes; the numbers only show that the pipeline runs.")
    floor_row = next((r for r in rows if r.get("geometric_mean_floor") is not None), None)
    if floor_row is not None:
        doc.paragraph(f"Floor: a second sample of the reference source ({floor}), evaluated against the reference "
                      f"like the generated showers: G_floor = {floor_row['geometric_mean_floor']:.4f} ± "
                      f"{floor_row['geometric_mean_floor_std']:.4f} is what a perfect simulator scores at this "
                      "sample size; G / G_floor = 1 would be as good as it gets.")
    else:
        doc.paragraph("No floor (real data without --floor-data): G cannot be compared with what a perfect "
                      "simulator would score at this sample size.")
    doc.table(["generator", "trainable (point net + flow)", "of which point net", "steps trained", "training [s]",
               "sampler", "ms per shower", "G (geometric mean of normalised W1)", "G / G_floor", "classifier AUC (floor)",
               "vs scratch", "vs scratch-converged", "details"],
              [[_label(r), f"{r['trainable_all']:,} / {r['total_all']:,} ({r['percent_all']:.2f} %)",
                f"{r['trainable_net']:,} / {r['total_net']:,}",
                f"{r['steps']}" + (" (stopped early)" if r["stopped_early"] else ""),
                f"{r['train_s']:.0f}", r["sampler"], f"{r['ms_per_shower']:.1f}",
                f"{r['geometric_mean']:.4f} ± {r['geometric_mean_std']:.4f}",
                "" if r.get("ratio_to_floor") is None else f"{r['ratio_to_floor']:.2f}",
                "" if r.get("auc_low_level") is None else
                f"{r['auc_low_level']:.3f} ({_number(r.get('auc_low_level_floor'))})",
                _pct(r["improvement_over_scratch"]), _pct(r["improvement_over_scratch_converged"]),
                f"evaluation/{r['directory']}/report.md"] for r in rows])
    doc.paragraph("G is the geometric mean of the normalised Wasserstein-1 distances of the six CaloTransfer "
                  "observables (lower is better; arXiv:2512.00187, with the published quirks fixed); ± is its "
                  "bootstrap spread. Trainable parameters count the point network and the flow together; "
                  "milliseconds per shower are the whole generation of the held-out sample (flow, points, "
                  "calibrations, digitisation, file) divided by its showers, on this machine's threads. "
                  "Each method's full evaluation (all observables beside the floor, CaloChallenge metrics, "
                  "plots) is in evaluation/METHOD/. At this sample size the classifier trains on a few "
                  "optimiser steps and its floor AUC is not 0.5: compare it with the floor, not with 0.5; "
                  "FPD/KPD are skipped below 10000 showers per sample (docs/evaluation.md).")
    for r in rows:
        for plot in ("profile_longitudinal", "hist_n_hits"):
            if (out / "evaluation" / r["directory"] / "plots" / f"{plot}.png").exists():
                doc.image(f"{_label(r)}: {plot.replace('_', ' ')}",
                          f"evaluation/{r['directory']}/plots/{plot}.png")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(doc.markdown())
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(doc.html("caloadapt demo"))


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
