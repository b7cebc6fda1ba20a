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

Only the point network is distilled; the shower flow is kept from the teacher unchanged. A
distilled checkpoint is an ordinary caloadapt checkpoint (the student's weights in
``denoiser.net``) with the ``consistency`` marker (noise range, grid, teacher) and the
consistency :class:`~caloadapt.models.sampling.Sampler` of its noise range.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.io import count_showers, read_showers
from ..errors import CheckpointError, InputError
from ..geometry import Geometry
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.consistency import CONSISTENCY_KEY, ConsistencyPrecond, multistep_sigmas, sample_consistency
from ..models.edm import karras_sigmas, sample_heun
from ..models.fused import FusedDenoiser
from ..models.sampling import Sampler
from ..models.shower_model import ShowerModel
from .data import ShowerSubset, make_batch, split_indices
from .loop import check_run_options, resolve_device

__all__ = ["DistillConfig", "distill"]


@dataclass
class DistillConfig:
    """Options of one consistency distillation (recorded in its checkpoints as ``train_config``).

    Attributes:
        steps: optimiser steps (the CaloClouds II consistency model was trained for about 1M).
        batch_size: showers per step.
        lr: learning rate (1e-4, constant).
        optimizer: ``radam`` (CaloClouds II) or ``adam``.
        grad_clip: maximum gradient norm (10).
        target_ema: EMA decay mu of the target network (0.95).
        ema_decay: decay of the EMA of the student used for sampling (with the usual warm-up).
        n_grid: Karras grid size n of the distillation (18); i is drawn from {0 .. n-2}.
        sigma_min, sigma_max, rho: noise range and schedule (0.002, 80, 7).
        max_points: points per shower per step.
        n_samples, val_fraction, data_seed: the shower subset and split (as in training).
        val_max_showers, val_max_points: size of the validation set; its ``one_step`` score is the
            mean squared difference between the one-step sample and the teacher's Heun ODE
            solution (``val_teacher_steps`` steps) from the same noise (the distillation target).
        val_every, checkpoint_every: steps between validations / checkpoints.
        seed: seed of the training noise.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4
    optimizer: str = "radam"
    grad_clip: float = 10.0
    target_ema: float = 0.95
    ema_decay: float = 0.999
    n_grid: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    max_points: int = 1024
    n_samples: int | None = None
    val_fraction: float = 0.1
    val_max_showers: int = 256
    val_max_points: int = 256
    val_teacher_steps: int = 18
    val_every: int = 200
    checkpoint_every: int = 200
    seed: int = 0
    data_seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        check_run_options(self)
        if self.n_grid < 2:
            raise InputError("the distillation grid needs at least 2 noise levels")
        if not 0 < self.sigma_min < self.sigma_max:
            raise InputError("need 0 < sigma_min < sigma_max")
        if not 0 <= self.target_ema < 1:
            raise InputError(f"target_ema must be in [0, 1), got {self.target_ema!r}")
        for name in ("val_max_points", "val_teacher_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


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


@torch.no_grad()
def _lerp_module(ema: nn.Module, model: nn.Module, weight: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), weight)


def _net_of(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The point-network entries of a ShowerModel state dict, without the ``denoiser.net.`` prefix."""
    prefix = "denoiser.net."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def distill(teacher: ShowerModel, data_path: str | os.PathLike[str], geometry: Geometry,
            out_dir: str | os.PathLike[str], config: DistillConfig = DistillConfig(), *, resume: bool = False,
            checkpoint_parts: dict | None = None, stop_after_steps: int | None = None,
            progress: bool = True) -> dict:
    """Distil the teacher's point diffusion model into a consistency model (see the module docstring).

    Writes ``last.pt`` (everything to resume), ``best.pt`` (the student EMA weights with the best
    validation ``one_step`` score; what ``caloadapt generate`` should load) and ``metrics.csv`` into
    ``out_dir``. Both checkpoints load as a :class:`ShowerModel` (student network, the teacher's
    flow and normalisation) and carry the ``consistency`` marker.

    Arguments:
        teacher: the trained diffusion model, with its EMA weights loaded (e.g. from
            :func:`caloadapt.models.checkpoint.load_model`); it is not modified.
        data_path, geometry: showers to noise (any file the teacher can read; usually its
            training or adaptation data).
        out_dir: run directory.
        config: :class:`DistillConfig`.
        resume: continue from ``out_dir/last.pt`` (same options required).
        checkpoint_parts: extra entries for every checkpoint (e.g. ``command``, ``teacher``).
        stop_after_steps: end this call after that many steps (with a checkpoint).
        progress: show a progress bar.

    Returns:
        Summary: ``steps``, ``best`` (validation scores), ``best_step``, ``final`` (last
        validation), ``wall_s``, ``checkpoint`` (path of ``best.pt``).
    """
    device = resolve_device(config.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    # data, as in training: the subset and split depend only on the data seed
    train_idx, val_idx = split_indices(count_showers(data_path), config.n_samples, config.val_fraction,
                                       config.data_seed)
    subset = ShowerSubset(data_path, geometry, train_idx)
    val_showers = read_showers(data_path, geometry, indices=val_idx[: config.val_max_showers])
    val_rng = np.random.default_rng([config.data_seed, 1])
    val = [make_batch(chunk, geometry, teacher.config, val_rng, config.val_max_points).to(device)
           for chunk in val_showers.chunks(64)]

    # networks: frozen teacher; student, its EMA and the target all start from the teacher's weights
    base = copy.deepcopy(teacher).to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    edm = base.denoiser
    student = ConsistencyPrecond.from_edm(edm, config.sigma_min, copy_net=True).train()
    for p in student.parameters():
        p.requires_grad_(True)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    student_ema = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = (torch.optim.RAdam if config.optimizer == "radam" else torch.optim.Adam)(
        student.parameters(), lr=config.lr)
    grid_sigmas = karras_sigmas(config.n_grid, config.sigma_min, config.sigma_max, config.rho)[:-1]
    grid_sigmas = grid_sigmas.to(device=device, dtype=torch.float32)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "best": {"one_step": math.inf, "loss": math.inf},
                             "best_step": 0, "final": {}, "wall_s": 0.0}

    last, best = out_dir / "last.pt", out_dir / "best.pt"
    if resume and last.exists():
        payload = load_checkpoint(last)
        if payload.get("train_config") != asdict(config):
            raise CheckpointError(f"{last}: was written with other distillation options; resume with the same ones")
        student.net.load_state_dict(_net_of(payload["model"]))
        student_ema.net.load_state_dict(_net_of(payload["ema"]))
        target.net.load_state_dict(payload["target"])
        optimizer.load_state_dict(payload["optimizer"])
        state = payload["train_state"]
        best_ema = _net_of(load_checkpoint(best)["ema"]) if best.exists() else None
    else:
        best_ema = None
    best_ema = best_ema or {k: v.clone() for k, v in student_ema.net.state_dict().items()}

    settings = {"sigma_min": config.sigma_min, "sigma_max": config.sigma_max, "rho": config.rho,
                "steps": [1, 2], "sigmas": multistep_sigmas(2, config.sigma_min, config.sigma_max, config.rho),
                "n_grid": config.n_grid, "teacher": (checkpoint_parts or {}).get("teacher")}
    # the student is sampled in one step on the noise range it was distilled on
    sampler = Sampler("consistency", 1, config.sigma_min, config.sigma_max, config.rho)
    parts = {"train_config": asdict(config), "geometry": {"name": geometry.name, "spec": geometry.spec},
             CONSISTENCY_KEY: settings, "sampler": sampler.to_dict(), **(checkpoint_parts or {})}
    teacher_state = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}
    skeleton = copy.deepcopy(base).cpu()  # the saved model: the teacher's flow and buffers, the student's net

    def write(path: Path, ema_net: dict[str, Tensor], full: bool) -> None:
        skeleton.denoiser.net.load_state_dict({k: v.detach().cpu() for k, v in student.net.state_dict().items()})
        model = skeleton
        ema = {**teacher_state, **{f"denoiser.net.{k}": v.detach().cpu().clone() for k, v in ema_net.items()}}
        extra = {"target": {k: v.detach().cpu() for k, v in target.net.state_dict().items()},
                 "optimizer": optimizer.state_dict()} if full else {}
        save_checkpoint(path, model, ema=ema, train_state=state, **extra, **parts)

    # validation: fixed noise; the teacher's ODE solutions are computed once
    val_gen = torch.Generator(device).manual_seed(12345)
    val_noise = [torch.randn(b.points.shape, generator=val_gen, device=device) for b in val]
    with torch.inference_mode():
        reference = [sample_heun(FusedDenoiser(edm), b.condition, mask=b.mask,
                                 n_steps=config.val_teacher_steps,
                                 sigma_min=config.sigma_min, sigma_max=config.sigma_max, rho=config.rho, noise=z)
                     for b, z in zip(val, val_noise)]

    def validate() -> dict[str, float]:
        gen = torch.Generator(device).manual_seed(54321)
        one_step, loss, n = 0.0, 0.0, 0
        with torch.inference_mode():
            for b, z, ref in zip(val, val_noise, reference):
                x1 = sample_consistency(student_ema, b.condition, mask=b.mask, sigma_min=config.sigma_min,
                                        sigma_max=config.sigma_max, noise=z)
                one_step += float(_masked_mse(x1, ref, b.mask)) * len(b)
                loss += float(_step_loss(b, gen, student_ema)) * len(b)
                n += len(b)
        return {"one_step": one_step / max(n, 1), "loss": loss / max(n, 1)}

    def _step_loss(b, gen: torch.Generator, online: nn.Module) -> Tensor:
        x = (b.points - base.point_mean) / base.point_std
        x = torch.where(b.mask[..., None], x, x.new_zeros(()))
        index = torch.randint(0, config.n_grid - 1, (len(b),), generator=gen, device=device)
        sigma, sigma_next = grid_sigmas[index], grid_sigmas[index + 1]
        x_cur = x + sigma[:, None, None] * torch.randn(x.shape, generator=gen, device=device)
        with torch.no_grad():
            x_next = _teacher_heun_step(edm, x_cur, sigma, sigma_next, b.condition, b.mask)
            goal = target(x_next, sigma_next, b.condition, b.mask)
        return _masked_mse(online(x_cur, sigma, b.condition, b.mask), goal, b.mask)

    metrics_path = out_dir / "metrics.csv"
    if not (resume and metrics_path.exists()):
        with open(metrics_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "epoch", "train_loss", "val_loss", "val_one_step", "wall_s"])
        if state["step"] == 0:  # the starting point: the teacher's network under the consistency scalings
            state["final"] = validate()
            state["best"] = dict(state["final"])
            with open(metrics_path, "a", newline="") as f:
                csv.writer(f).writerow([0, 0, "", state["final"]["loss"], state["final"]["one_step"], 0.0])

    bar = tqdm(total=config.steps, initial=state["step"], disable=not progress, desc="distill", unit="step")
    started = time.perf_counter() - state["wall_s"]
    running, n_running = 0.0, 0
    stop = False
    while state["step"] < config.steps and not stop:
        for showers in subset.batches(config.batch_size, config.data_seed, state["epoch"], skip=state["position"]):
            step = state["step"]
            batch = make_batch(showers, geometry, teacher.config, np.random.default_rng([config.seed, step]),
                               config.max_points).to(device)
            gen = torch.Generator(device).manual_seed(config.seed * 1_000_003 + step * 101)
            loss = _step_loss(batch, gen, student)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite distillation loss at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()
            _lerp_module(target, student, 1 - config.target_ema)
            _lerp_module(student_ema, student, 1 - min(config.ema_decay, (1 + step) / (10 + step)))
            state["step"] += 1
            state["position"] += 1
            running += float(loss.detach())
            n_running += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / n_running:.4f}")

            step = state["step"]
            if stop_after_steps is not None and step >= stop_after_steps:
                stop = True
            if step % config.val_every == 0 or step == config.steps:
                scores = validate()
                state["final"] = scores
                if scores["one_step"] < state["best"]["one_step"]:
                    state["best"], state["best_step"] = dict(scores), step
                    best_ema = {k: v.clone() for k, v in student_ema.net.state_dict().items()}
                with open(metrics_path, "a", newline="") as f:
                    csv.writer(f).writerow([step, state["epoch"], running / max(n_running, 1), scores["loss"],
                                            scores["one_step"], round(time.perf_counter() - started, 2)])
                running, n_running = 0.0, 0
                write(best, best_ema, full=False)
            if step % config.checkpoint_every == 0 or step == config.steps or stop:
                state["wall_s"] = time.perf_counter() - started
                write(last, student_ema.net.state_dict(), full=True)
            if step >= config.steps or stop:
                break
        else:
            state["epoch"] += 1
            state["position"] = 0
    bar.close()
    if not best.exists():  # stopped before the first validation
        write(best, best_ema, full=False)
    return {"steps": state["step"], "best": state["best"], "best_step": state["best_step"],
            "final": state["final"], "wall_s": time.perf_counter() - started, "checkpoint": str(best)}
