"""DDML's embedded-Python backend for an exported caloadapt generator (docs/geant4.md).

key4hep/DDML's ``PyTorchEmbeddedInference`` imports a Python module and calls
``run_inference(inputs: list[np.ndarray]) -> np.ndarray`` with the three float32 arrays the C++
side fills (energy in GeV, local theta and phi in degrees) and copies the flat float32 result into
its pre-allocated output (``python/examples/cc3_sf_2a_wrapper.py`` there shows the contract).

This file needs numpy and torch only: copy it next to the exported file (``caloadapt export
--format torchscript``) or point ``CALOADAPT_TORCHSCRIPT`` at that file. The model is loaded at the
first call, on the CPU, with one intra-op thread unless ``CALOADAPT_THREADS`` says otherwise.
"""

import os

import numpy as np
import torch

__all__ = ["run_inference", "model_path", "output_size"]

_model = None


def model_path() -> str:
    """The exported file: ``$CALOADAPT_TORCHSCRIPT``, else ``model.pt`` beside this module."""
    return os.environ.get("CALOADAPT_TORCHSCRIPT") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                   "model.pt")


def _load():
    global _model
    if _model is None:
        torch.set_num_threads(int(os.environ.get("CALOADAPT_THREADS", "1")))
        _model = torch.jit.load(model_path(), map_location="cpu").eval()
    return _model


def output_size() -> int:
    """Floats in every result (4 x max_points of the exported file)."""
    return int(_load().max_points) * 4


@torch.inference_mode()
def run_inference(inputs):
    """One shower: ``inputs`` = [energy_gev, theta_deg, phi_deg] (float32 arrays of one value each, not
    modified); returns a contiguous flat float32 array of exactly :func:`output_size` values."""
    model = _load()
    tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(-1)[:1].copy()) for a in inputs]
    out = model(*tensors)
    return np.ascontiguousarray(out.numpy(), dtype=np.float32).ravel()
