"""The one-step student of an adapted model (``caloadapt finetune --one-step``).

An adapted model samples with its pre-trained model's sampler (for the shipped model 30 Heun steps, 59
network evaluations over thousands of points: seconds per shower), which is no faster than the
simulation it replaces. Its one-step student is made by consistency distillation from the adapted
teacher (:func:`caloadapt.train.distill.distill`), starting from the student of the model the teacher
was adapted from when there is one (for the shipped ``ild-photons``, ``ild-photons-1step``): that
network already maps noise to showers in one step, in the same features and on the same noise range,
and has only what adaptation changed to learn, so a few hundred steps do what a fresh student needs
thousands for. The student keeps the teacher's flow and gets an occupancy calibration of its own,
fitted for its one-step sampler on the target's training showers (docs/fidelity.md, "One step after
adaptation").
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from .._atomic import atomic_path
from ..errors import InputError
from ..geometry import Geometry
from ..models.checkpoint import load_checkpoint, load_model
from ..models.consistency import CONSISTENCY_KEY
from ..pretrained import resolve_checkpoint, shipped_student
from ..train.distill import DEFAULT_STUDENT_WIDTHS, FRESH_STUDENT_LR, DistillConfig, distill
from ..train.loop import TrainConfig

__all__ = ["one_step_student", "one_step_config", "student_init_config", "student_start", "WARM_STEPS", "FRESH_STEPS",
           "STARTS", "GRID_LEVELS"]

#: distillation steps of a student that starts from the pre-trained model's student, and of a fresh one
#: (docs/fidelity.md, "One step after adaptation")
WARM_STEPS = 300
FRESH_STEPS = 2000
#: noise levels of the distillation grid: the teacher's ODE is followed one Heun step per interval, so an
#: 18-level grid (the CaloClouds II recipe) distils a 17-step teacher, whose core is wider than that of the
#: 30 steps the adapted model samples with (docs/fidelity.md, "One step after adaptation")
GRID_LEVELS = 61
#: where a student starts (:func:`one_step_config`)
STARTS = ("init", "teacher", "fresh")


def student_start(pretrained: str | os.PathLike[str], init: str | None) -> Path | None:
    """The checkpoint the student starts from: ``init`` (a path or shipped name; ``fresh``: none), or by
    default the shipped student of ``pretrained`` where there is one."""
    if init is None:
        return shipped_student(pretrained)
    if init.strip().lower() == "fresh":
        return None
    path = resolve_checkpoint(init)
    if CONSISTENCY_KEY not in load_checkpoint(path):
        raise InputError(f"--student-init {init}: not a one-step (distilled) checkpoint")
    return path


def one_step_config(adaptation: TrainConfig, start: str = "init", steps: int | None = None) -> DistillConfig:
    """The distillation options of an adapted model's student: the adaptation's data, seeds, batches,
    device and occupancy calibration showers, and by where the student starts (:data:`STARTS`):

    - ``init``: from a distilled model's network (:func:`one_step_student`'s ``init``), :data:`WARM_STEPS`;
    - ``teacher``: a copy of the teacher's network (the CaloClouds II recipe; for a teacher with no
      student to start from, e.g. the scratch baseline), :data:`WARM_STEPS`;
    - ``fresh``: a new network of :data:`~caloadapt.train.distill.DEFAULT_STUDENT_WIDTHS`, :data:`FRESH_STEPS`
      at the higher learning rate of a fresh student;

    on a grid of :data:`GRID_LEVELS` noise levels.
    """
    if start not in STARTS:
        raise InputError(f"unknown start of the student {start!r}; expected one of {', '.join(STARTS)}")
    fresh = start == "fresh"
    steps = steps or (FRESH_STEPS if fresh else WARM_STEPS)
    every = max(1, steps // 3)
    return DistillConfig(steps=steps, batch_size=adaptation.batch_size, max_points=adaptation.max_points,
                         lr=FRESH_STUDENT_LR if fresh else DistillConfig.lr, n_samples=adaptation.n_samples,
                         val_fraction=adaptation.val_fraction, val_every=every, checkpoint_every=every,
                         seed=adaptation.seed, data_seed=adaptation.data_seed, device=adaptation.device,
                         occupancy_showers=adaptation.occupancy_showers, n_grid=GRID_LEVELS,
                         student_widths=DEFAULT_STUDENT_WIDTHS if fresh else None)


def student_init_config(init_payload: dict, config: DistillConfig) -> DistillConfig:
    """``config`` with the size and noise range of the student ``init_payload`` starts from: the
    network's widths must be its widths, and it is distilled on the noise range it was distilled on."""
    settings = init_payload[CONSISTENCY_KEY]
    widths = tuple(init_payload["model_config"]["widths"])
    return replace(config, student_widths=widths, sigma_min=float(settings["sigma_min"]),
                   sigma_max=float(settings["sigma_max"]), rho=float(settings["rho"]))


def one_step_student(teacher_path: str | os.PathLike[str], data_path: str | os.PathLike[str], geometry: Geometry,
                     out_path: str | os.PathLike[str], config: DistillConfig, *,
                     init: str | os.PathLike[str] | None = None, resume: bool = False,
                     checkpoint_parts: dict | None = None, progress: bool = True) -> dict:
    """Distil the adapted model of ``teacher_path`` into a one-step student written to ``out_path``.

    Arguments:
        teacher_path: the adapted model (``RUN/model.pt``).
        data_path, geometry: the target showers the teacher was adapted on (the run's own split is
            drawn again from ``config.n_samples`` and ``config.data_seed``).
        out_path: the student checkpoint (``RUN/model-1step.pt``); the distillation run itself goes to
            ``RUN/model-1step/`` beside it (``best.pt``, ``last.pt``, ``metrics.csv``; ``resume`` continues it).
        config: the distillation's options; with ``init`` its student size and noise range are init's.
        init: a distilled checkpoint (path or shipped name) the student starts from (None: a fresh
            student of ``config.student_widths``).

    Returns the distillation summary with ``checkpoint`` (``out_path``).
    """
    out_path = Path(out_path)
    run_dir = out_path.with_suffix("")
    teacher, teacher_sampler = load_model(teacher_path)
    # a student learns the map from the noise level its teacher is sampled from (as ``caloadapt distill``)
    config = replace(config, sigma_max=teacher_sampler.sigma_max)
    student = None
    if init is not None:
        payload = load_checkpoint(init)
        config = student_init_config(payload, config)
        student, _ = load_model(payload, source=str(init))
    parts = {"teacher": str(teacher_path), **({"student_init": str(init)} if init is not None else {}),
             **(checkpoint_parts or {})}
    # a run resumed after the adaptation finished has no distillation to continue yet
    resume = resume and (run_dir / "last.pt").is_file()
    summary = distill(teacher, data_path, geometry, run_dir, config, resume=resume, checkpoint_parts=parts,
                      student_init=student, progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:
        with atomic_path(out_path) as tmp:
            shutil.copyfile(run_dir / "best.pt", tmp)
    return {**summary, "checkpoint": str(out_path)}
