"""The pre-trained model shipped with the package (ILD-like Si-W ECAL photons, 10-90 GeV).

How it was made (command, data, training cost) is recorded in the README and inside the
checkpoint (``command``, ``train_config``, ``train_state``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import CheckpointError

__all__ = ["PRETRAINED_NAME", "default_checkpoint"]

PRETRAINED_NAME = "ild-photons.pt"


def default_checkpoint() -> Path:
    """Path of the shipped pre-trained checkpoint."""
    path = Path(str(resources.files("caloadapt.pretrained") / PRETRAINED_NAME))
    if not path.is_file():
        raise CheckpointError(f"the shipped pre-trained model {PRETRAINED_NAME} is missing from this installation; "
                              "give --checkpoint")
    return path
