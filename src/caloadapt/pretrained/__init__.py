"""The pre-trained models shipped with the package.

- ``ild-photons``: single-detector model, ILD-like Si-W ECAL photons 10-90 GeV (the default);
- ``multi-detector``: geometry-conditioned model pre-trained jointly on four detectors of the
  built-in family (``caloadapt.geometry.DETECTOR_FAMILY`` except ``pb-scintillator``, which is
  held out as the adaptation target of the sweep in docs/results/2026-12-readme-measurements.md);
- ``ild-photons-1step``: ``ild-photons`` distilled into a one-step student (a 32-32 point network,
  the teacher's flow), for fast generation (``caloadapt generate --checkpoint ild-photons-1step``);
- ``ild-photons-angular``: the ``ild-photons`` recipe with angle conditioning, on photons arriving at
  theta 40-140 and phi 0-360 degrees (``caloadapt generate --checkpoint ild-photons-angular --theta ...``).

How each was made (command, data, training cost) is recorded in
docs/results/2026-12-readme-measurements.md and inside the checkpoint (``command``, ``train_config``,
``train_state``). Wherever a checkpoint path is accepted, the shipped models can be named instead
(``--checkpoint multi-detector``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import CheckpointError

__all__ = ["PRETRAINED_NAME", "SHIPPED_CHECKPOINTS", "SHIPPED_STUDENTS", "default_checkpoint", "shipped_checkpoint",
           "resolve_checkpoint", "shipped_student"]

#: shipped models: name -> file in this package
SHIPPED_CHECKPOINTS = {"ild-photons": "ild-photons.pt", "multi-detector": "multi-detector.pt",
                       "ild-photons-1step": "ild-photons-1step.pt", "ild-photons-angular": "ild-photons-angular.pt"}
PRETRAINED_NAME = SHIPPED_CHECKPOINTS["ild-photons"]
#: shipped model -> its shipped one-step student (the start of the students of the models adapted from it)
SHIPPED_STUDENTS = {"ild-photons": "ild-photons-1step"}


def shipped_checkpoint(name: str) -> Path:
    """Path of a shipped checkpoint by name (see :data:`SHIPPED_CHECKPOINTS`)."""
    if name not in SHIPPED_CHECKPOINTS:
        raise CheckpointError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED_CHECKPOINTS)}")
    path = Path(str(resources.files("caloadapt.pretrained") / SHIPPED_CHECKPOINTS[name]))
    if not path.is_file():
        raise CheckpointError(f"the shipped pre-trained model {path.name} is missing from this installation; "
                              "give --checkpoint")
    return path


def default_checkpoint() -> Path:
    """Path of the shipped single-detector pre-trained checkpoint (``ild-photons``)."""
    return shipped_checkpoint("ild-photons")


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    """A checkpoint path as given, or the shipped checkpoint when a shipped name (and no such file) is given."""
    path = Path(path_or_name)
    if not path.exists() and str(path_or_name) in SHIPPED_CHECKPOINTS:
        return shipped_checkpoint(str(path_or_name))
    return path


def shipped_student(checkpoint: str | Path) -> Path | None:
    """The shipped one-step student of ``checkpoint`` when it is a shipped model that has one, else None."""
    path = resolve_checkpoint(checkpoint)
    for name, student in SHIPPED_STUDENTS.items():
        try:
            if path.is_file() and path.samefile(shipped_checkpoint(name)):
                return shipped_checkpoint(student)
        except (OSError, CheckpointError):
            continue
    return None
