"""The recipe of one adaptation run, written once: the options of one method on a target subset, its
training, and the model and sampler it leaves.

``caloadapt finetune``, the demo (:mod:`caloadapt.demo`) and every run of a sweep
(:func:`caloadapt.sweep.runner.run_one`) build their :class:`~caloadapt.train.TrainConfig` with
:func:`adaptation_config` (learning rates from the table of :mod:`caloadapt.adapt.defaults`) and
train with :func:`adapt_model`; they then generate with the model's own sampler and score.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..adapt import AdaptMethod, finetune
from ..adapt.defaults import adaptation_learning_rates
from ..errors import InputError
from ..geometry import Geometry
from ..models.checkpoint import load_model
from ..models.sampling import Sampler
from ..models.shower_model import ShowerModel
from ..train import TrainConfig

__all__ = ["adaptation_config", "adapt_model", "parse_method", "is_converged", "converged_max_steps",
           "whole_model_parameters", "ZERO_SHOT", "SCRATCH_CONVERGED", "PSEUDO_METHODS", "CONVERGED_STEP_FACTOR"]

#: the pseudo-method that generates with the pre-trained model as it is (no target showers: D = 0);
#: a geometry-conditioned model is told the target detector by its descriptor alone
ZERO_SHOT = "zero-shot"
#: the from-scratch baseline trained to convergence: early stopping on its validation split after
#: ``patience`` validations without improvement, at most ``max_steps`` steps (default 10 x ``steps``),
#: so that the gain over scratch is not just the training the same-budget baseline did not get
SCRATCH_CONVERGED = "scratch-converged"
#: method names that are not :data:`caloadapt.adapt.METHODS`
PSEUDO_METHODS = (ZERO_SHOT, SCRATCH_CONVERGED)
#: default cap of ``scratch-converged``: this many times the fixed budget ``steps``
CONVERGED_STEP_FACTOR = 10



def is_converged(text: str) -> bool:
    """True for the ``scratch-converged`` baseline (trained with early stopping)."""
    return text.partition(":")[0].strip() == SCRATCH_CONVERGED


def converged_max_steps(steps: int, max_steps: int | None) -> int:
    """The step cap of ``scratch-converged``: ``max_steps``, or ``CONVERGED_STEP_FACTOR`` x ``steps``."""
    cap = CONVERGED_STEP_FACTOR * steps if max_steps is None else int(max_steps)
    if cap < 1:
        raise InputError(f"max_steps must be positive, got {max_steps}")
    return cap


def whole_model_parameters(groups: list[dict]) -> dict:
    """Trainable and total parameters of the point network and of the whole model (network + flow)
    from the rows of :func:`~caloadapt.adapt.parameter_report` (zeros without rows: zero-shot)."""
    rows = {r["group"]: r for r in groups}
    net, every = rows.get("net", {}), rows.get("all", {})
    out = {"trainable_net": int(net.get("trainable", 0)), "total_net": int(net.get("total", 0)),
           "trainable_flow": int(rows.get("flow", {}).get("trainable", 0)),
           "trainable_all": int(every.get("trainable", 0)), "total_all": int(every.get("total", 0))}
    out["percent_all"] = 100.0 * out["trainable_all"] / out["total_all"] if out["total_all"] else 0.0
    return out


def parse_method(text: str):
    """``name`` or ``name:key=value,...`` -> :class:`~caloadapt.adapt.AdaptMethod`.

    Options are the fields of :class:`~caloadapt.adapt.AdaptMethod`, e.g. ``lora:rank=16,alpha=16``
    or ``bitfit:flow=frozen`` (the flow's adaptation: ``full``, ``bitfit``, ``lora`` or ``frozen``).
    ``scratch-converged`` is the scratch method (trained with early stopping, see :func:`is_converged`).
    """
    from ..adapt import AdaptMethod

    name, _, options = text.partition(":")
    if name.strip() == SCRATCH_CONVERGED:
        if options:
            raise InputError(f"{SCRATCH_CONVERGED} takes no options ({text!r}); --patience and --max-steps set it")
        return AdaptMethod(name="scratch")
    values: dict = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"method option {item!r} in {text!r} is not key=value")
        values[key] = float(value) if key == "alpha" else int(value) if key in {"k", "rank"} else value
    try:
        return AdaptMethod(name=name, **values)
    except TypeError:
        raise InputError(f"unknown option in method {text!r}") from None


def adaptation_config(method: str, n_target: int, *, val_every: int, lr: float | None = None,
                      flow_lr: float | None = None, lr_by_size: bool = True, flow: str = "full",
                      **options) -> TrainConfig:
    """The training options of one adaptation run, with a checkpoint at every validation.

    Arguments:
        method: the method's name (``scratch``, ``full``, ``lora``, ...): it picks the learning rates.
        n_target: target showers the run trains on (train + validation): the data size of the table.
        val_every: steps between validations (and checkpoints).
        lr, flow_lr: peak learning rates; None takes them from the table
            (:func:`~caloadapt.adapt.defaults.adaptation_learning_rates`).
        lr_by_size, flow: as for :func:`~caloadapt.adapt.defaults.adaptation_learning_rates` (``flow``: the
            method's flow adaptation, :attr:`~caloadapt.adapt.AdaptMethod.flow`).
        options: the other fields of :class:`~caloadapt.train.TrainConfig`.
    """
    default_lr, default_flow_lr = adaptation_learning_rates(method, n_target, lr_by_size, flow)
    return TrainConfig(lr=default_lr if lr is None else lr, flow_lr=default_flow_lr if flow_lr is None else flow_lr,
                       val_every=val_every, checkpoint_every=val_every, **options)


def adapt_model(pretrained: str | os.PathLike[str], data: str | os.PathLike[str], geometry: Geometry,
                run_dir: str | os.PathLike[str], method: AdaptMethod, config: TrainConfig, *,
                progress: bool = False) -> tuple[dict, ShowerModel, Sampler]:
    """Train ``method`` (resuming a run begun in ``run_dir``) and load what it leaves.

    Returns the training summary of :func:`~caloadapt.adapt.finetune`, the merged model of
    ``run_dir/model.pt`` and its sampler.
    """
    summary = finetune(pretrained, data, geometry, run_dir, method, config, resume=True, progress=progress,
                       log=lambda *_: None)
    model, sampler = load_model(Path(run_dir) / "model.pt")
    return summary, model, sampler
