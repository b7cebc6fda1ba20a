"""Consistency distillation of a trained point diffusion model into a one-step (or few-step) sampler.

The recipe of CaloClouds II (Buhmann et al. 2023, arXiv:2309.05704, its consistency model), which follows
Y. Song, P. Dhariwal, M. Chen, I. Sutskever, *Consistency Models*, ICML 2023, arXiv:2303.01469
(consistency distillation, Algorithm 2): student, EMA target and frozen teacher all start from
the teacher's (EMA) weights; each step draws an index ``i`` uniformly from ``{0 .. n-2}`` on the
Karras grid (n = 18), noises the data to ``sigma_i``, takes one deterministic Heun step of the
teacher's probability-flow ODE to ``sigma_{i+1}`` and minimises
``|| f_student(x_{sigma_i}, sigma_i) - f_target(x_hat_{sigma_{i+1}}, sigma_{i+1}) ||^2`` (uniform
weights), averaged over the real points; the target follows the student by an EMA with
mu = 0.95; RAdam, lr 1e-4, no scheduler, gradient clip 10. The consistency function itself is
:class:`caloadapt.models.consistency.ConsistencyPrecond`.

The point network is distilled; the shower flow is the teacher's, unless the student has a flow of
its own (below). The student may be smaller than the teacher (``student_widths`` for the pointwise network,
``student_dim`` / ``student_depth`` for the transformer): the teacher's widths are a choice, and
a one-step sampler's cost is one evaluation of the student. A student of the teacher's size starts
from the teacher's weights (Song et al. 2023); a smaller one cannot and starts from a fresh
initialisation, so it needs more steps. At small batches the flow costs more than a small point
network, so the student can have a smaller flow too (``student_flow_transforms``,
``student_flow_hidden``): it is trained from a fresh initialisation by maximum likelihood on the
same showers, beside the distillation (the teacher's flow is a density, not a map to imitate), and
the occupancy calibration is fitted again at the end for it. The student is the distilled model's
own point network, so the run is an ordinary run of the training loop
(:func:`caloadapt.train.loop.train`) with :class:`ConsistencyObjective` as what is learnt: the same
batches, EMA, validation schedule, ``best.pt`` / ``last.pt`` / ``metrics.csv``, resume, run lock and
signal handling as any training. A distilled checkpoint is an ordinary caloadapt checkpoint (the
student's weights in ``denoiser.net``) with the ``consistency`` marker (noise range, grid,
teacher), the consistency :class:`~caloadapt.models.sampling.Sampler` of its noise range and the
target network (``target``, to resume).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, InputError
from ..geometry import Geometry
from ..models.checkpoint import load_weights
from ..models.consistency import CONSISTENCY_KEY, ConsistencyPrecond, multistep_sigmas, sample_consistency
from ..models.edm import given_features, karras_sigmas, sample_heun
from ..models.fused import FusedDenoiser
from ..models.sampling import Sampler
from ..models.shower_model import ModelConfig, ShowerModel
from .data import Batch
from .loop import Objective, TrainConfig, resolve_device, train

__all__ = ["DistillConfig", "ConsistencyObjective", "distill", "student_model", "DEFAULT_STUDENT_WIDTHS",
           "FRESH_STUDENT_LR", "default_student_widths"]

#: training showers per detector the occupancy calibration of a student with its own flow is fitted on
STUDENT_FLOW_OCCUPANCY_SHOWERS = 128
#: widths of a pointwise student when none is asked for, and the learning rate of a student that starts
#: from a fresh initialisation: distilled from the shipped ILD model in 4,000 steps, this student (with the
#: teacher's flow) is as good as the teacher with 13 Heun steps, and as a 64-64 student at about half the
#: network's cost (docs/speed.md, "Students tried")
DEFAULT_STUDENT_WIDTHS = (32, 32)
FRESH_STUDENT_LR = 5e-4


def _multiply_adds_per_point(widths: tuple[int, ...], point_dim: int = 4) -> int:
    sizes = (point_dim, *widths, point_dim)
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def default_student_widths(teacher: ModelConfig) -> tuple[int, ...] | None:
    """The pointwise student's widths when none is asked for: :data:`DEFAULT_STUDENT_WIDTHS` where it
    costs less per point than the teacher, else None (the teacher's size, starting from its weights)."""
    if teacher.backbone != "pointwise":
        return None
    cheaper = _multiply_adds_per_point(DEFAULT_STUDENT_WIDTHS) < _multiply_adds_per_point(tuple(teacher.widths))
    return DEFAULT_STUDENT_WIDTHS if cheaper else None


@dataclass
class DistillConfig(TrainConfig):
    """Options of one consistency distillation (recorded in its checkpoints as ``train_config``).

    The options of :class:`~caloadapt.train.loop.TrainConfig` with the defaults of the CaloClouds II
    consistency model, and:

    Attributes:
        steps: optimiser steps (the CaloClouds II consistency model was trained for about 1M).
        lr: learning rate (1e-4, constant: ``schedule`` constant, no warm-up).
        target_ema: EMA decay mu of the target network (0.95).
        ema_decay: decay of the EMA of the student used for sampling (with the usual warm-up).
        n_grid: Karras grid size n of the distillation (18); i is drawn from {0 .. n-2}.
        sigma_min, sigma_max, rho: noise range and schedule (0.002, 80, 7).
        val_max_showers, val_max_points: size of the validation set; its ``one_step`` score is the
            mean squared difference between the one-step sample and the teacher's Heun ODE
            solution (``val_teacher_steps`` steps) from the same noise (the distillation target);
            ``best.pt`` holds the student with the lowest one.
        occupancy_showers: 0 keeps the teacher's occupancy calibration; a student with a flow of its own
            is calibrated again on ``STUDENT_FLOW_OCCUPANCY_SHOWERS`` showers then.
        student_widths: hidden widths of a pointwise student (None: the teacher's).
        student_dim, student_depth: width and blocks of a transformer student (None: the teacher's).
        student_flow_transforms, student_flow_hidden: coupling transforms and hyper-network widths of
            a student flow trained beside the distillation (None: the teacher's flow, kept).
    """

    lr: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    val_max_showers: int = 256
    val_max_points: int | None = 256
    val_every: int = 200
    checkpoint_every: int = 200
    occupancy_showers: int = 0
    target_ema: float = 0.95
    n_grid: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    val_teacher_steps: int = 18
    student_widths: tuple[int, ...] | None = None
    student_dim: int | None = None
    student_depth: int | None = None
    student_flow_transforms: int | None = None
    student_flow_hidden: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 2:
            raise InputError("the distillation grid needs at least 2 noise levels")
        if not 0 < self.sigma_min < self.sigma_max:
            raise InputError("need 0 < sigma_min < sigma_max")
        if not 0 <= self.target_ema < 1:
            raise InputError(f"target_ema must be in [0, 1), got {self.target_ema!r}")
        if self.val_teacher_steps < 1:
            raise InputError(f"val-teacher-steps must be at least 1, got {self.val_teacher_steps}")
        sizes = [*(self.student_widths or ()), self.student_dim or 1, self.student_depth or 1,
                 *(self.student_flow_hidden or ()), self.student_flow_transforms or 1]
        if self.student_widths == () or self.student_flow_hidden == () or any(int(n) < 1 for n in sizes):
            raise InputError("the student's widths, width, depth and flow sizes must be positive integers")

    def student_config(self, teacher: ModelConfig) -> ModelConfig:
        """The model settings of the student: the teacher's, with the point network's and the flow's
        sizes asked for."""
        if teacher.backbone == "pointwise" and (self.student_dim or self.student_depth):
            raise InputError("--student-dim/--student-depth size a transformer student; the teacher is pointwise "
                             "(use --student-widths)")
        if teacher.backbone == "transformer" and self.student_widths:
            raise InputError("--student-widths sizes a pointwise student; the teacher is a transformer "
                             "(use --student-dim/--student-depth)")
        return replace(teacher, widths=tuple(self.student_widths or teacher.widths),
                       transformer_dim=self.student_dim or teacher.transformer_dim,
                       transformer_depth=self.student_depth or teacher.transformer_depth,
                       flow_transforms=self.student_flow_transforms or teacher.flow_transforms,
                       flow_hidden=tuple(self.student_flow_hidden or teacher.flow_hidden))

    def trains_flow(self, teacher: ModelConfig) -> bool:
        """Whether the student has a flow of its own (another size than the teacher's)."""
        student = self.student_config(teacher)
        return (student.flow_transforms, student.flow_hidden) != (teacher.flow_transforms, teacher.flow_hidden)


def _masked_mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Mean squared difference over the real points (``mask`` True) and the features."""
    squared = torch.where(mask[..., None], (a - b) ** 2, a.new_zeros(()))
    return squared.sum() / (mask.sum() * a.shape[-1]).clamp_min(1)


def _teacher_heun_step(teacher: nn.Module, x: Tensor, sigma: Tensor, sigma_next: Tensor, context: Tensor,
                       mask: Tensor) -> Tensor:
    """One deterministic Heun step of the probability-flow ODE from ``sigma`` to ``sigma_next`` (both (B,), > 0)."""
    s, s_next = sigma[:, None, None], sigma_next[:, None, None]
    d = (x - teacher(x, sigma, context, mask)) / s
    x_euler = x + (s_next - s) * d
    d_next = (x_euler - teacher(x_euler, sigma_next, context, mask)) / s_next
    return x + (s_next - s) * (0.5 * d + 0.5 * d_next)


class ConsistencyObjective(Objective):
    """The consistency-distillation loss of one batch (Song et al. 2023, Algorithm 2; module docstring).

    The student is ``model.denoiser.net`` under the consistency scalings; the frozen teacher
    (an EDM denoiser) and the target network (the student's slow EMA, ``target_ema``) are held
    here. Validation scores the model's (EMA) student: ``one_step`` against the teacher's ODE
    solutions (computed once per validation batch) and ``loss``, the distillation loss with fixed noise.
    A student flow of its own adds its negative log-likelihood ``flow``, trained and kept at its best
    validation value as in any training.
    """

    train_keys = ("loss",)
    val_keys = ("loss", "one_step")
    best = {"one_step": "denoiser."}
    validate_start = True  # the teacher under the consistency scalings is the baseline
    name = "distill"

    def __init__(self, teacher: ShowerModel, student: ShowerModel, config: DistillConfig, device: torch.device):
        self.config = config
        self.flow = config.trains_flow(teacher.config)
        if self.flow:
            self.train_keys, self.val_keys = ("loss", "flow"), ("loss", "one_step", "flow")
            self.best = {"one_step": "denoiser.", "flow": "flow."}
        self.teacher = copy.deepcopy(teacher.denoiser).to(device).eval().requires_grad_(False)
        self.target = ConsistencyPrecond.from_edm(student.denoiser, config.sigma_min, copy_net=True).to(device)
        self.grid = karras_sigmas(config.n_grid, config.sigma_min, config.sigma_max, config.rho)[:-1].to(
            device=device, dtype=torch.float32)
        self.references: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def _loss(self, model: ShowerModel, batch: Batch, generator: torch.Generator) -> Tensor:
        x = (batch.points - model.point_mean) / model.point_std
        x = torch.where(batch.mask[..., None], x, x.new_zeros(()))
        index = torch.randint(0, self.config.n_grid - 1, (len(batch),), generator=generator, device=x.device)
        sigma, sigma_next = self.grid[index], self.grid[index + 1]
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        # given channels (a known layer's depth) are conditions: never noised
        x_cur = x + sigma[:, None, None] * noise.masked_fill(model.denoiser.given.to(x.device), 0.0)
        with torch.no_grad():
            x_next = _teacher_heun_step(self.teacher, x_cur, sigma, sigma_next, batch.condition, batch.mask)
            goal = self.target(x_next, sigma_next, batch.condition, batch.mask)
        student = ConsistencyPrecond.from_edm(model.denoiser, self.config.sigma_min)
        return _masked_mse(student(x_cur, sigma, batch.condition, batch.mask), goal, batch.mask)

    def losses(self, model, batch, generator):
        losses = {"loss": self._loss(model, batch, generator)}
        if self.flow:
            losses["flow"] = model.flow_loss(batch.condition, batch.statistics)
        return losses

    @torch.no_grad()
    def after_step(self, model, step):
        for t, p in zip(self.target.net.parameters(), model.denoiser.net.parameters()):
            t.lerp_(p.detach(), 1 - self.config.target_ema)

    @torch.no_grad()
    def validate(self, model, batches, device):
        config = self.config
        noise_generator = torch.Generator(device).manual_seed(12345)  # same noise at every validation
        loss_generator = torch.Generator(device).manual_seed(54321)
        one_step, loss, flow = 0.0, 0.0, 0.0
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            noise = torch.randn(batch.points.shape, generator=noise_generator, device=device)
            given = given_features((batch.points - model.point_mean) / model.point_std, model.denoiser.given)
            key = (id(batches), i)  # the validation batches live as long as the run
            if key not in self.references:
                self.references[key] = sample_heun(FusedDenoiser(self.teacher), batch.condition, mask=batch.mask,
                                                   n_steps=config.val_teacher_steps, sigma_min=config.sigma_min,
                                                   sigma_max=config.sigma_max, rho=config.rho, noise=noise,
                                                   given=given)
            sample = sample_consistency(model.denoiser, batch.condition, mask=batch.mask, sigma_min=config.sigma_min,
                                        sigma_max=config.sigma_max, noise=noise, given=given)
            one_step += float(_masked_mse(sample, self.references[key], batch.mask)) * len(batch)
            loss += float(self._loss(model, batch, loss_generator)) * len(batch)
            if self.flow:
                flow += float(model.flow_loss(batch.condition, batch.statistics)) * len(batch)
        n = max(sum(len(b) for b in batches), 1)
        return {"loss": loss / n, "one_step": one_step / n, **({"flow": flow / n} if self.flow else {})}

    def checkpoint_entries(self):
        return {"target": {k: v.detach().cpu() for k, v in self.target.net.state_dict().items()}}

    def resume(self, payload, source):
        if "target" not in payload:
            raise CheckpointError(f"{source}: holds no target network; it is not a distillation run")
        if "scheduler" not in payload:  # the own loop distillation had before (caloadapt 0.1) kept another state
            raise CheckpointError(f"{source}: was written by an earlier caloadapt's distillation, which cannot be "
                                  "resumed; distil again without --resume (its best.pt still loads and generates)")
        load_weights(self.target.net, payload["target"], f"{source} (target network)")


def student_model(teacher: ShowerModel, config: DistillConfig, init: ShowerModel | None = None) -> ShowerModel:
    """The model to distil into: a copy of the teacher (flow, normalisation, calibration) whose point
    network is the teacher's own when the student has its size, and a fresh one of the student's size
    otherwise (same seed, same initialisation); the same for the flow.

    ``init``: a distilled model whose point network (of the student's size) the student starts from
    instead, e.g. the student of the model the teacher was adapted from: it already maps noise to
    showers in one step and has only the teacher's change to learn."""
    student = copy.deepcopy(teacher)
    settings = config.student_config(teacher.config)
    if settings != teacher.config:
        torch.manual_seed(config.seed)
        fresh = ShowerModel(settings).to(teacher.point_mean.device)
        student.config = settings
        if (settings.widths, settings.transformer_dim, settings.transformer_depth) != (
                teacher.config.widths, teacher.config.transformer_dim, teacher.config.transformer_depth):
            student.denoiser = fresh.denoiser
        if config.trains_flow(teacher.config):
            student.flow = fresh.flow
    if init is not None:
        load_weights(student.denoiser.net, init.denoiser.net.state_dict(), "the student's initial network")
    return student


def distill(teacher: ShowerModel, data_path: str | os.PathLike[str], geometry: Geometry,
            out_dir: str | os.PathLike[str], config: DistillConfig = DistillConfig(), *, resume: bool = False,
            checkpoint_parts: dict | None = None, stop_after_steps: int | None = None,
            student_init: ShowerModel | None = None, progress: bool = True) -> dict:
    """Distil the teacher's point diffusion model into a consistency model (see the module docstring).

    Writes ``last.pt`` (everything to resume), ``best.pt`` (the student EMA weights with the best
    validation ``one_step`` score; what ``caloadapt generate`` should load) and ``metrics.csv`` into
    ``out_dir``, as every training run does. Both checkpoints load as a :class:`ShowerModel`
    (student network, the teacher's flow, normalisation and occupancy calibration) and carry the
    ``consistency`` marker.

    Arguments:
        teacher: the trained diffusion model, with its EMA weights loaded (e.g. from
            :func:`caloadapt.models.checkpoint.load_model`); it is not modified.
        data_path, geometry: showers to noise (any file the teacher can read; usually its
            training or adaptation data).
        out_dir: run directory.
        config: :class:`DistillConfig`.
        resume, checkpoint_parts, stop_after_steps, progress: as for :func:`caloadapt.train.train`
            (``checkpoint_parts`` may name the ``teacher``).
        student_init: a distilled model the student's point network starts from (:func:`student_model`).

    Returns:
        The training summary (``steps``, ``best`` and ``best_step``: the best ``one_step`` score and
        its step, ``wall_s``) with ``checkpoint``, the path of ``best.pt``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("distillation runs in one process; start it without torchrun")
    device = resolve_device(config.device)
    model = student_model(teacher, config, student_init)
    objective = ConsistencyObjective(teacher, model, config, device)
    settings = {"sigma_min": config.sigma_min, "sigma_max": config.sigma_max, "rho": config.rho,
                "steps": [1, 2], "sigmas": multistep_sigmas(2, config.sigma_min, config.sigma_max, config.rho),
                "n_grid": config.n_grid, "teacher": (checkpoint_parts or {}).get("teacher"),
                **{f"{who}_{part}parameters": sum(p.numel() for p in getattr(m, module).parameters())
                   for who, m in (("teacher", teacher), ("student", model))
                   for part, module in (("", "denoiser"), ("flow_", "flow"))}}
    # the student is sampled in one step on the noise range it was distilled on
    sampler = Sampler("consistency", 1, config.sigma_min, config.sigma_max, config.rho)
    parts = {CONSISTENCY_KEY: settings, **(checkpoint_parts or {})}
    trained = ("denoiser.net.", "flow.") if objective.flow else ("denoiser.net.",)
    trainable = [name for name, _ in model.named_parameters() if name.startswith(trained)]
    if objective.flow and config.occupancy_showers == 0:
        # the calibration corrects the flow's own bias per layer: a new flow needs its own
        config = replace(config, occupancy_showers=STUDENT_FLOW_OCCUPANCY_SHOWERS)
    summary = train(model, data_path, geometry, out_dir, config, trainable=trainable, resume=resume,
                    fit_normalisation=False, checkpoint_parts=parts, stop_after_steps=stop_after_steps,
                    progress=progress, objective=objective, sampler=sampler)
    return {**summary, "checkpoint": str(Path(out_dir) / "best.pt")}
