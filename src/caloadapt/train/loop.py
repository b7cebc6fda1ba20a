"""The training loop of every run: pre-training, training from scratch, adaptation and distillation.

Read top to bottom: data subset and split, normalisation, optimiser over the trainable
parameters only, then the loop (batch, losses, backward, clip, step, EMA, validate, checkpoint).
What is learnt is an :class:`Objective`: the losses of one batch, the validation scores and
which parameters each score picks for ``best.pt``. :class:`ModelLosses` (the model's own
diffusion and flow losses) is the default; consistency distillation is
:class:`caloadapt.train.distill.ConsistencyObjective`.
Distributed training is plain torchrun + DistributedDataParallel; a few ``if ddp`` lines.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .._signals import Terminated, deferred_termination, pending_termination
from .._memory import check_memory
from ..data.io import count_showers, max_points_per_shower, read_showers
from ..errors import CheckpointError, InputError, TrainingError
from ..geometry import Geometry
from ..models.adapters import merge
from ..models.checkpoint import load_checkpoint, load_weights, save_checkpoint, stored_config
from ..models.representation import shower_statistics
from ..models.sampling import Sampler
from ..models.shower_model import ShowerModel
from .calibrate import calibrate_occupancy
from .data import Batch, BatchStream, DataSource, ShowerSubset, make_batch, split_indices, training_points
from .rundir import run_lock

__all__ = ["TrainConfig", "train", "resolve_device", "Objective", "ModelLosses"]


@dataclass
class TrainConfig:
    """Options of one training run (all recorded in its checkpoints).

    Attributes:
        steps: optimiser steps.
        batch_size: showers per step (over all processes).
        lr, flow_lr: peak learning rates of the point network and of the flow.
        optimizer: ``adam`` or ``radam``.
        schedule: ``cosine`` (to 1 % of the peak) or ``constant``, after ``warmup_steps``.
        ema_decay: decay of the exponential moving average of the weights.
        grad_clip: maximum gradient norm (10, as CaloClouds II).
        max_points: points per shower per step.
        n_samples: showers drawn from the file (None: all), ``data_seed`` picks them.
        val_fraction: share of those showers held out for validation and checkpoint choice.
        val_max_showers, val_max_points: showers and points per shower of the validation set
            (``val_max_points`` None: ``max_points``).
        val_every, checkpoint_every: steps between validations / checkpoints.
        patience: stop after this many validations without improvement (None: never).
        seed: seed of the initialisation and of the training noise.
        data_seed: seed of the data subset, split and order.
        occupancy_showers: training showers per detector the occupancy calibration is fitted on
            once training ends (:func:`caloadapt.models.occupancy.fit_occupancy`); 0: none.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    flow_lr: float = 1e-3
    optimizer: str = "radam"
    schedule: str = "cosine"
    warmup_steps: int = 50
    ema_decay: float = 0.999
    grad_clip: float = 10.0
    max_points: int = 1024
    n_samples: int | None = None
    val_fraction: float = 0.1
    val_max_showers: int = 1000
    val_max_points: int | None = None
    val_every: int = 100
    checkpoint_every: int = 100
    patience: int | None = None
    seed: int = 0
    data_seed: int = 0
    occupancy_showers: int = 128
    device: str = "auto"

    def __post_init__(self) -> None:
        """One-line errors for options out of range (the command line and the Python API alike)."""
        if self.optimizer not in {"adam", "radam"}:
            raise InputError(f"unknown optimizer {self.optimizer!r}; expected adam or radam")
        if self.schedule not in {"cosine", "constant"}:
            raise InputError(f"unknown schedule {self.schedule!r}; expected cosine or constant")
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("steps and batch size must be positive")
        for name in ("lr", "flow_lr", "grad_clip"):
            _check_positive(self, name)
        if self.warmup_steps < 0:
            raise InputError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"val-fraction must be in [0, 1) (the share held out), got {self.val_fraction!r}")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        for name in ("max_points", "val_max_showers", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.val_max_points is not None and self.val_max_points < 1:
            raise InputError(f"val-max-points must be at least 1, got {self.val_max_points}")
        if self.n_samples is not None and self.n_samples < 2:
            raise InputError(f"n-samples must be at least 2 (training and validation), got {self.n_samples}")
        if self.patience is not None and self.patience < 1:
            raise InputError(f"patience must be at least 1 validation, got {self.patience}")
        for name in ("seed", "data_seed"):
            if not 0 <= getattr(self, name) < 2**32:
                raise InputError(f"{name.replace('_', '-')} must be in 0..{2**32 - 1}, got {getattr(self, name)}")
        if self.occupancy_showers < 0:
            raise InputError("occupancy_showers must be >= 0 (0: no occupancy calibration)")
        check_device_name(self.device)


def _check_positive(config, name: str) -> None:
    value = getattr(config, name)
    if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value) and value > 0):
        raise InputError(f"{name.replace('_', '-')} must be a positive number, got {value!r}")


def check_device_name(name: str) -> None:
    """A one-line error unless ``name`` is auto, cpu, cuda or cuda:N (available or not)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; a one-line error for anything else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(name)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name} asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _learning_rate_factor(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


class _EMA:
    """Exponential moving average of the trainable weights, with the usual warm-up of the decay."""

    def __init__(self, model: ShowerModel, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: ShowerModel, step: int, names: list[str]) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        params = dict(model.named_parameters())
        for name in names:
            self.state[name].lerp_(params[name].detach(), 1 - decay)


def _setup_distributed() -> tuple[bool, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world > 1, int(os.environ.get("RANK", "0")), world


def _check_step_memory(model: ShowerModel, sources: list[DataSource], config: TrainConfig) -> None:
    """Refuse, before any data is read, a batch whose activations would not fit in memory: they grow with
    --batch-size and the points per shower (--max-points, or fewer where the showers hold fewer)."""
    points = min(config.max_points, max(max_points_per_shower(s.path) for s in sources))
    per_shower = 4 * model.config.floats_per_point() * max(points, 1)  # float32
    check_memory(config.batch_size * per_shower, f"a training step of {config.batch_size:,} showers of up to "
                 f"{points:,} points", "lower --batch-size or --max-points", per_item_bytes=per_shower,
                 items="showers per step")


def _fit_normalisation(model: ShowerModel, sources: list[DataSource], subsets: list[ShowerSubset],
                       seed: int) -> None:
    """Feature standardisation from up to 2000 training showers, shared among the detectors."""
    rng = np.random.default_rng(seed)
    features, statistics = [], []
    for source, subset in zip(sources, subsets):
        showers = subset.block(0)[: min(2000 // len(sources), len(subset.blocks[0]))]
        if showers.n_points.sum() == 0:
            raise InputError(f"{source.path}: the training showers hold no hits (every shower drawn is empty); "
                             "there is nothing to learn from")
        frame = model.config.point_frame(source.geometry)
        counted, moved = training_points(source.geometry, showers, model.config, rng)
        features.append(frame.to_features(moved))
        statistics.append(shower_statistics(source.geometry, counted, rng, model.config.grid))
    model.set_normalisation(np.concatenate(features), np.concatenate(statistics))
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and not bool(torch.isfinite(buffer).all()):
            raise InputError(f"{', '.join(str(s.path) for s in sources)}: the feature normalisation ({name}) is "
                             "not finite; the training showers have too few distinct hits")


class Objective:
    """What a run learns; the loop calls it and keeps everything else (data, optimiser, EMA,
    validation schedule, checkpoints, resume) to itself.

    Attributes:
        train_keys: names of the losses :meth:`losses` returns (logged as ``train_<key>``).
        val_keys: names of the scores :meth:`validate` returns (logged as ``val_<key>``).
        best: score name -> prefix of the parameters that score picks for ``best.pt`` (the best
            EMA weights of each prefix are kept separately).
        validate_start: validate once before the first step (the starting point may be the best).
        name: label of the progress bar.
    """

    train_keys: tuple[str, ...] = ()
    val_keys: tuple[str, ...] = ()
    best: dict[str, str] = {}
    validate_start = False
    name = "train"

    def losses(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The losses of one (training) batch; their sum is minimised."""
        raise NotImplementedError

    def after_step(self, model: ShowerModel, step: int) -> None:
        """Called after each optimiser step (e.g. to move a target network)."""

    def validate(self, model: ShowerModel, batches: list[Batch], device: torch.device) -> dict[str, float]:
        """Scores of ``model`` (holding the EMA weights) on one detector's validation batches."""
        raise NotImplementedError

    def checkpoint_entries(self) -> dict:
        """Entries of the objective's own state, written into every checkpoint and restored by :meth:`resume`."""
        return {}

    def resume(self, payload: dict, source: str) -> None:
        """Restore the state of :meth:`checkpoint_entries` from a checkpoint."""


class ModelLosses(Objective):
    """Pre-training, training from scratch and adaptation: the model's diffusion and flow losses;
    the point network and the flow are each kept at their best validation loss."""

    train_keys = val_keys = ("diffusion", "flow")
    best = {"diffusion": "denoiser.", "flow": "flow."}

    def losses(self, model, batch, generator):
        return model(batch.points, batch.mask, batch.condition, batch.statistics, generator)

    @torch.no_grad()
    def validate(self, model, batches, device):
        generator = torch.Generator(device).manual_seed(12345)  # same noise at every validation
        totals = dict.fromkeys(self.val_keys, 0.0)
        for batch in batches:
            batch = batch.to(device)
            losses = model(batch.points, batch.mask, batch.condition, batch.statistics, generator)
            for key in totals:
                totals[key] += float(losses[key]) * len(batch)
        n = sum(len(b) for b in batches)
        return {key: value / n for key, value in totals.items()}


def _sources(data: str | Path | Sequence[DataSource], geometry: Geometry | None) -> list[DataSource]:
    if isinstance(data, (str, Path)):
        if geometry is None:
            raise InputError("a single training file needs its geometry")
        return [DataSource(Path(data), geometry)]
    sources = list(data)
    if not sources:
        raise InputError("no training data given")
    names = [s.geometry.name for s in sources]
    if len(set(names)) != len(names):
        raise InputError(f"each detector may appear once in joint training, got {names}")
    return sources


def train(model: ShowerModel, data: str | Path | Sequence[DataSource], geometry: Geometry | None,
          out_dir: str | Path, config: TrainConfig, *, trainable: list[str] | None = None, resume: bool = False,
          fit_normalisation: bool = True, checkpoint_parts: dict | None = None,
          stop_after_steps: int | None = None, progress: bool = True, objective: Objective | None = None,
          sampler: Sampler | None = None) -> dict:
    """Train ``model`` on showers of one or several detectors; write ``last.pt``, ``best.pt``, ``metrics.csv``.

    Arguments:
        model: the model (fresh, or loaded from a pre-trained checkpoint).
        data: training shower file of ``geometry``, or several :class:`DataSource` (file, detector,
            sampling weight; ``geometry`` None) for joint training: each step's batch comes from one
            detector, drawn with probability proportional to its weight; every detector has its own
            validation split, the losses are logged per detector and the checkpoint is chosen on
            their weighted mean.
        out_dir: run directory.
        trainable: names of the parameters to train (None: all); the others are frozen and the
            optimiser never sees them.
        resume: continue from ``out_dir/last.pt`` to the same result as an uninterrupted run.
        fit_normalisation: set the feature standardisation from the data (pre-training); False
            keeps the model's (fine-tuning never changes the meaning of the inputs).
        checkpoint_parts: extra entries written into every checkpoint (e.g. the adaptation method).
        stop_after_steps: end this call after that many steps (with a checkpoint), as a time-boxed
            job would; ``resume`` continues the run later.
        objective: what is learnt (default :class:`ModelLosses`).
        sampler: the sampler the trained model is to be generated with (default :class:`Sampler()`):
            stored in every checkpoint and used for the occupancy calibration, whose hit counts
            depend on it (a fine-tuned model keeps its pre-trained model's sampler).

    Returns:
        A summary: steps, best validation losses and their steps, wall time, and the distributed rank
        of this process (0 without DDP).

    The run folder is locked for the run (see :func:`caloadapt.train.rundir.run_lock`). Under the
    command line, SIGTERM / SIGHUP end the run after the current step with ``last.pt`` written
    (:class:`caloadapt._signals.Terminated` is raised then; ``resume`` continues).
    """
    lock = run_lock(out_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    with lock, deferred_termination(), contextlib.ExitStack() as on_exit:
        return _train(model, data, geometry, out_dir, config, on_exit, trainable=trainable, resume=resume,
                      fit_normalisation=fit_normalisation, checkpoint_parts=checkpoint_parts,
                      stop_after_steps=stop_after_steps, progress=progress, objective=objective or ModelLosses(),
                      sampler=sampler or Sampler())


def _train(model: ShowerModel, data, geometry: Geometry | None, out_dir: str | Path, config: TrainConfig,
           on_exit: contextlib.ExitStack, *,
           trainable: list[str] | None, resume: bool, fit_normalisation: bool, checkpoint_parts: dict | None,
           stop_after_steps: int | None, progress: bool, objective: Objective, sampler: Sampler) -> dict:
    ddp, rank, world = _setup_distributed()
    device = resolve_device(config.device)
    if ddp and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    sources = _sources(data, geometry)
    weights = np.array([s.weight for s in sources]) / sum(s.weight for s in sources)
    _check_step_memory(model, sources, config)

    def batch_of(showers, source: DataSource, rng, max_points: int) -> Batch:
        return make_batch(showers, source.geometry, model.config, rng, max_points)

    # data: per detector one subset per (n_samples, data seed), shared by the flow and the diffusion model
    subsets, val = [], []
    for source in sources:
        train_idx, val_idx = split_indices(count_showers(source.path), config.n_samples, config.val_fraction,
                                           config.data_seed)
        subsets.append(ShowerSubset(source.path, source.geometry, train_idx))
        val_showers = read_showers(source.path, source.geometry, indices=val_idx[: config.val_max_showers])
        val_rng = np.random.default_rng([config.data_seed, 1])
        val.append([batch_of(chunk, source, val_rng, config.val_max_points or config.max_points)
                    for chunk in val_showers.chunks(64)])

    # parameters: the optimiser sees only the trainable ones
    names = [n for n, _ in model.named_parameters()] if trainable is None else list(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    params = dict(model.named_parameters())
    flow_names = [n for n in names if n.startswith("flow.")]
    groups = [g for g in ({"params": [params[n] for n in names if n not in flow_names], "lr": config.lr},
                          {"params": [params[n] for n in flow_names], "lr": config.flow_lr}) if g["params"]]
    optimizer = (torch.optim.RAdam if config.optimizer == "radam" else torch.optim.Adam)(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _learning_rate_factor(config))
    state = {"step": 0, "cursors": [{"epoch": 0, "position": 0} for _ in sources],
             "best": dict.fromkeys(objective.best, math.inf), "best_step": dict.fromkeys(objective.best, 0),
             "stale": 0, "wall_s": 0.0}

    last = out_dir / "last.pt"
    if resume and last.exists():
        payload = load_checkpoint(last)
        stored, current = payload.get("train_config") or {}, asdict(config)
        # an option added since the run began (e.g. occupancy_showers) counts as given at its default
        added = {k for k in current if k not in stored and current[k] == getattr(type(config), k)}
        if {k: v for k, v in current.items() if k not in added} != stored:
            raise CheckpointError(f"{last}: was written with other training options; resume with the same ones")
        stored = stored_config(payload, str(last))
        if stored != model.config:
            differences = [f"{k}: run {v!r}, now {getattr(model.config, k)!r}" for k, v in stored.to_dict().items()
                           if getattr(model.config, k) != getattr(stored, k)]
            raise CheckpointError(f"{last}: was written for another model ({'; '.join(differences)}); resume with "
                                  "the same model options")
        objective.resume(payload, str(last))
        state = payload["train_state"]
        if "cursors" not in state:  # written by caloadapt 0.1 before joint training: one file, one cursor
            state["cursors"] = [{"epoch": state.pop("epoch"), "position": state.pop("position")}]
        if len(state["cursors"]) != len(sources):
            raise CheckpointError(f"{last}: was written for {len(state['cursors'])} training file(s), not "
                                  f"{len(sources)}; resume with the same files")
        load_weights(model, payload["model"], str(last))
        try:
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as err:
            raise CheckpointError(f"{last}: optimiser state does not fit this run ({str(err).splitlines()[0]}); "
                                  "resume with the same options and method") from None
        best_state = load_checkpoint(out_dir / "best.pt")["ema"] if (out_dir / "best.pt").exists() else None
    else:
        if fit_normalisation:
            _fit_normalisation(model, sources, subsets, config.data_seed)
        best_state = None
    model.to(device)
    ema = _EMA(model, config.ema_decay)
    if resume and last.exists():
        ema.state = {k: v.to(device) for k, v in payload["ema"].items()}
    best_state = best_state or {k: v.clone() for k, v in ema.state.items()}
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    streams = [BatchStream(subset, config.batch_size * world, config.data_seed, **cursor)
               for subset, cursor in zip(subsets, state["cursors"])]

    described = [{"name": s.geometry.name, "spec": s.geometry.spec} for s in sources]
    parts = {"train_config": asdict(config), "trainable": names, "geometry": described[0],
             **({"geometries": [{**d, "weight": float(w)} for d, w in zip(described, weights)]}
                if len(sources) > 1 else {}),
             **(checkpoint_parts or {})}
    metrics_path = out_dir / "metrics.csv"
    board = _tensorboard(out_dir) if rank == 0 else None
    detectors = [s.geometry.name for s in sources] if len(sources) > 1 else []
    if rank == 0 and not (resume and metrics_path.exists()):
        with open(metrics_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "epoch", "lr", *[f"train_{key}" for key in objective.train_keys],
                                    *[f"val_{key}" for key in objective.val_keys], "wall_s"]
                                   + [f"val_{key}[{name}]" for name in detectors for key in objective.val_keys])

    def save(path: Path, weights: dict) -> None:
        save_checkpoint(path, model, ema=weights, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), train_state=state, sampler=sampler,
                        **objective.checkpoint_entries(), **parts)

    def fresh_running() -> dict:
        return {**dict.fromkeys(objective.train_keys, 0.0), "n": 0}

    def validation_round() -> bool:
        return _validation_round(model, ema, val, weights, device, state, best_state, config, running, metrics_path,
                                 optimizer, time.perf_counter() - started, board, objective)

    # closed however the run ends, so that an error's line starts a line of its own
    bar = on_exit.enter_context(tqdm(total=config.steps, initial=state["step"], disable=not progress or rank != 0,
                                     desc=objective.name, unit="step"))
    started = time.perf_counter() - state["wall_s"]
    running = fresh_running()
    if objective.validate_start and state["step"] == 0 and rank == 0:
        validation_round()
        save(out_dir / "best.pt", best_state)
    converged = False  # early stop by patience: training is over, as at the last step
    watch = _DivergenceWatch(objective.train_keys)
    saved_step = state["step"] if resume and last.exists() else None  # the step last.pt holds

    def diverged(what: str, step: int) -> TrainingError:
        advice = "lower the learning rate (--lr, --flow-lr) and run again"
        if saved_step is not None:
            advice = (f"{last} holds step {saved_step}, the last checkpoint before it (--resume continues from it); "
                      f"{advice} with --overwrite")
        return TrainingError(f"training diverged at step {step}: {what}; {advice}")
    while state["step"] < config.steps:
        step = state["step"]
        k = 0 if len(sources) == 1 else int(np.random.default_rng([config.data_seed, step, 7]).choice(
            len(sources), p=weights))
        shard = streams[k].next()[rank::world]
        state["cursors"][k] = streams[k].cursor
        batch = batch_of(shard, sources[k], np.random.default_rng([config.seed, step, rank]),
                         config.max_points).to(device)
        generator = torch.Generator(device).manual_seed(config.seed * 1_000_003 + step * 101 + rank)
        model.train()
        losses = objective.losses(ddp_model, batch, generator)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise diverged(f"non-finite training loss {float(loss.detach())}", step)
        values = {key: float(losses[key].detach()) for key in objective.train_keys}
        exploded = watch.exploded(values)
        if exploded:
            raise diverged(exploded, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradient_norm = torch.nn.utils.clip_grad_norm_([params[n] for n in names], config.grad_clip)
        if not torch.isfinite(gradient_norm):  # clipping would turn it into NaN weights
            raise diverged("non-finite gradients", step)
        optimizer.step()
        scheduler.step()
        ema.update(model, step, names)
        objective.after_step(model, step)
        state["step"] = step = step + 1
        for key in objective.train_keys:
            running[key] += values[key]
        running["n"] += 1
        bar.update(1)
        bar.set_postfix({key: f"{running[key] / running['n']:.3f}" for key in objective.train_keys})

        stop = False
        if step % config.val_every == 0 or step == config.steps:
            if rank == 0:
                stop = converged = validation_round()
                save(out_dir / "best.pt", best_state)
            running = fresh_running()
        if stop_after_steps is not None and step >= stop_after_steps:
            stop = True
        terminated = pending_termination()
        stop = stop or terminated is not None
        if step % config.checkpoint_every == 0 or step == config.steps or stop:
            state["wall_s"] = time.perf_counter() - started
            if rank == 0:
                save(last, ema.state)
                saved_step = step
            if ddp:
                dist.barrier()
        if terminated is not None:
            bar.close()
            raise Terminated(terminated, f"{last} holds step {step} of {config.steps}; continue with --resume")
        if stop:
            break
    bar.close()
    if rank == 0 and config.occupancy_showers > 0 and (converged or state["step"] >= config.steps):
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)  # the weights that best.pt (and every copy of it) holds
        # fitted on the model with its adapters merged, as it is generated (peft's layers are not fused: several
        # times slower to sample); without the fit's check pass (a third of its time; `caloadapt calibrate` runs it)
        merged = merge(model)
        calibrate_occupancy(merged, sources, asdict(config), n_showers=config.occupancy_showers, seed=config.seed,
                            progress=progress, sampler=sampler, check=False)
        model.occupancy = merged.occupancy
        model.load_state_dict(raw)
        save(out_dir / "best.pt", best_state)
        save(last, ema.state)
    if ddp:
        dist.barrier()
    return {"steps": state["step"], "best": state["best"], "best_step": state["best_step"],
            "wall_s": time.perf_counter() - started, "rank": rank}


#: a training loss this many times above its lowest has diverged (a loss near 0 or below, as a flow's
#: negative log-likelihood can be, is measured against 1 instead)
DIVERGENCE_FACTOR = 1e4
#: steps averaged into each candidate for the lowest loss (one lucky batch does not set it)
DIVERGENCE_BLOCK_STEPS = 10


class _DivergenceWatch:
    """Tells when a training loss exploded: ``DIVERGENCE_FACTOR`` times above the lowest mean of
    ``DIVERGENCE_BLOCK_STEPS`` consecutive steps seen by this process (so that no checkpoint is written
    after it). It keeps nothing in checkpoints: a resumed run watches again from its first block."""

    def __init__(self, keys: Sequence[str]):
        self.lowest = dict.fromkeys(keys, math.inf)
        self.block: dict[str, list[float]] = {key: [] for key in keys}

    def exploded(self, losses: dict[str, float]) -> str | None:
        """A description of the loss that exploded, or None; else ``losses`` join the current block."""
        for key, value in losses.items():
            lowest = self.lowest[key]
            scale = max(abs(lowest), 1.0)
            if value > lowest + DIVERGENCE_FACTOR * scale:
                return (f"the {key} loss rose to {value:.3g} from a lowest {DIVERGENCE_BLOCK_STEPS}-step mean of "
                        f"{lowest:.3g}")
        for key, value in losses.items():
            block = self.block[key]
            block.append(value)
            if len(block) == DIVERGENCE_BLOCK_STEPS:
                self.lowest[key] = min(self.lowest[key], sum(block) / len(block))
                block.clear()
        return None


def _tensorboard(out_dir: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None (CSV only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _validation_round(model, ema, val, weights, device, state, best_state, config, running, metrics_path,
                      optimizer, wall_s, board, objective: Objective) -> bool:
    """Validate the EMA weights on every detector, keep the best weights of each of the objective's
    parameter groups separately (on the weighted mean over detectors), log. True = stop."""
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema.state)
    model.eval()
    per_detector = [objective.validate(model, batches, device) for batches in val]
    model.load_state_dict(raw)
    scores = {key: float(sum(w * d[key] for w, d in zip(weights, per_detector))) for key in objective.val_keys}
    improved = False
    for key, prefix in objective.best.items():
        if scores[key] < state["best"][key]:
            state["best"][key], state["best_step"][key] = scores[key], state["step"]
            improved = True
            for name, value in ema.state.items():
                if name.startswith(prefix):
                    best_state[name] = value.clone()
    state["stale"] = 0 if improved else state["stale"] + 1
    n = max(running["n"], 1)
    detail = [d[key] for d in per_detector for key in objective.val_keys] if len(val) > 1 else []
    # before the first step there is no training loss to log
    train_losses = [running[key] / n if running["n"] else "" for key in objective.train_keys]
    with open(metrics_path, "a", newline="") as f:
        csv.writer(f).writerow([state["step"], state["cursors"][0]["epoch"], optimizer.param_groups[0]["lr"],
                                *train_losses, *[scores[key] for key in objective.val_keys], round(wall_s, 2),
                                *detail])
    if board is not None:
        for key in objective.val_keys:
            board.add_scalar(f"val/{key}", scores[key], state["step"])
        for key in objective.train_keys if running["n"] else ():
            board.add_scalar(f"train/{key}", running[key] / n, state["step"])
        board.flush()
    return config.patience is not None and state["stale"] >= config.patience
