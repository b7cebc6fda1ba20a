"""ONNX export of the point network and generation through onnxruntime.

What is exported is the per-point function the samplers call, ``(x, sigma, context) -> out``:

- for a diffusion checkpoint the EDM denoiser ``D(x; sigma, context)`` (used by Heun/Euler);
- for a distilled checkpoint (with a ``consistency`` marker) the consistency function
  ``f(x; sigma, context)`` (used by the one-step sampler).

Inputs ``x`` float32 ``(batch, points, 4)``, ``sigma`` float32 ``(batch,)``, ``context`` float32
``(batch, C)`` (C = 2, + 1 with the shower-depth condition, + the descriptor size for a
geometry-conditioned model), and for the
transformer backbone ``mask`` bool ``(batch, points)`` (True for real points); output ``out``
float32 ``(batch, points, 4)``; ``batch`` and ``points`` are dynamic.
The kind and noise range are stored in the model's metadata (``caloadapt.kind``, ...), so
:class:`OnnxDenoiser` and :func:`parity_check` know what the file holds; the occupancy
calibrations of the model (``caloadapt.occupancy``, JSON: geometry name -> calibration) travel
with it. The shower flow and
the post-processing stay in PyTorch/NumPy (they are cheap next to the point network).

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, default since
PyTorch 2.9; with onnxscript) with ``dynamic_shapes``; the legacy TorchScript exporter
(``dynamo=False``, deprecated) is the fallback if that fails.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from .._atomic import atomic_path
from .._inputs import input_file, wrong_kind
from ..errors import CaloadaptError, CheckpointError
from ..models.checkpoint import load_checkpoint, load_model
from ..models.consistency import CONSISTENCY_KEY, ConsistencyPrecond
from ..models.edm import EDMPrecond
from ..models.transformer import PointTransformer

if TYPE_CHECKING:
    from ..models.shower_model import ShowerModel

__all__ = ["INPUT_NAMES", "OUTPUT_NAME", "PARITY_TOLERANCE", "export_onnx", "export_checkpoint_onnx",
           "onnx_metadata", "parity_check", "OnnxDenoiser", "onnx_model"]

INPUT_NAMES = ("x", "sigma", "context")
OUTPUT_NAME = "out"
#: the largest accepted max-abs difference between onnxruntime and PyTorch outputs
PARITY_TOLERANCE = 1e-4
_META_PREFIX = "caloadapt."


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:  # optional dependencies
        raise CaloadaptError(f"ONNX export and the onnxruntime engine need the packages onnx, onnxscript and "
                             f"onnxruntime ({err.name} is missing)") from None
    return onnx, onnxruntime


def _exported_module(model: ShowerModel | nn.Module, consistency: dict | None) -> tuple[nn.Module, dict[str, str]]:
    """The module to export (a CPU float32 copy in eval mode) and its metadata."""
    denoiser = getattr(model, "denoiser", model)
    if isinstance(denoiser, ConsistencyPrecond):
        module, kind, sigma_min = denoiser, "consistency", denoiser.sigma_min
    elif consistency is not None:
        if not isinstance(denoiser, EDMPrecond):
            raise TypeError(f"cannot export a consistency function from {type(denoiser).__name__}")
        sigma_min = float(consistency.get("sigma_min", 0.002))
        module, kind = ConsistencyPrecond.from_edm(denoiser, sigma_min), "consistency"
    elif isinstance(denoiser, EDMPrecond):
        module, kind, sigma_min = denoiser, "edm", 0.002
    else:
        raise TypeError(f"expected a ShowerModel, EDMPrecond or ConsistencyPrecond, got {type(model).__name__}")
    module = copy.deepcopy(module).cpu().float().eval()
    consistency = consistency or {}
    meta = {"kind": kind, "sigma_min": repr(float(consistency.get("sigma_min", sigma_min))),
            "sigma_max": repr(float(consistency.get("sigma_max", 80.0))),
            "rho": repr(float(consistency.get("rho", 7.0))),
            "sigma_data": ",".join(repr(v) for v in module.sigma_data_values),
            "point_dim": str(module.net.point_dim), "context_dim": str(module.net.context_dim),
            "mask": str(int(_takes_mask(module))),
            # features that are conditions (the layer's depth of a depth-given model), not generated
            "given_channels": ",".join(str(c) for c in getattr(module, "given_channels", ())),
            "caloadapt_version": __version__, "torch_version": torch.__version__}
    if consistency.get("sigmas"):
        meta["sigmas"] = ",".join(repr(float(s)) for s in consistency["sigmas"])
    occupancy = getattr(model, "occupancy", None)
    if occupancy:  # a user of the file alone (e.g. a Geant4 plug-in) needs the points per hit too
        meta["occupancy"] = json.dumps({name: c.to_dict() for name, c in occupancy.items()})
    return module, meta


@contextlib.contextmanager
def _quiet() -> None:
    """Silence the exporters' progress prints, warnings and log lines."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript",
                                                    "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        # stderr too: when the torch.export path meets a data-dependent shape it prints its whole graph there
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _takes_mask(module: nn.Module) -> bool:
    """True when the network attends between points: its export takes the padding mask as a fourth input."""
    return isinstance(module.net, PointTransformer)


def _example_inputs(module: nn.Module) -> tuple[Tensor, ...]:
    # sizes distinct from each other and from 0/1 so that no dimension is specialised by the trace
    batch, points = 3, 5
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(batch, points, module.net.point_dim, generator=gen), torch.rand(batch, generator=gen) + 0.5,
              torch.randn(batch, module.net.context_dim, generator=gen))
    if _takes_mask(module):
        mask = torch.arange(points)[None, :] < torch.tensor([[points], [points - 2], [1]])
        inputs = (*inputs, mask)
    return inputs


def _to_proto(module: nn.Module, opset: int, dynamo: bool | None):
    """Export ``module`` to an ONNX ModelProto; returns ``(proto, exporter name)``."""
    onnx, _ = _require_onnx()
    args = _example_inputs(module)
    names = [*INPUT_NAMES, "mask"][:len(args)]
    errors = []
    for use_dynamo in ([True, False] if dynamo is None else [dynamo]):
        try:
            with _quiet():
                if use_dynamo:
                    batch, points = torch.export.Dim("batch"), torch.export.Dim("points")
                    shapes = {"x": {0: batch, 1: points}, "sigma": {0: batch}, "context": {0: batch},
                              "mask": {0: batch, 1: points}}
                    program = torch.onnx.export(
                        module, args, input_names=names, output_names=[OUTPUT_NAME],
                        opset_version=opset, dynamo=True, verbose=False, optimize=True,
                        dynamic_shapes={name: shapes[name] for name in names})
                    return program.model_proto, "torch.onnx.export(dynamo=True)"
                buffer = io.BytesIO()
                torch.onnx.export(
                    module, args, buffer, input_names=names, output_names=[OUTPUT_NAME],
                    opset_version=opset, dynamo=False,
                    dynamic_axes={"x": {0: "batch", 1: "points"}, "sigma": {0: "batch"}, "context": {0: "batch"},
                                  "mask": {0: "batch", 1: "points"}, OUTPUT_NAME: {0: "batch", 1: "points"}})
                return onnx.load_from_string(buffer.getvalue()), "torch.onnx.export(dynamo=False)"
        except Exception as err:  # noqa: BLE001 - try the other exporter, then report both
            errors.append(f"dynamo={use_dynamo}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    raise CaloadaptError("ONNX export failed (" + "; ".join(errors) + ")")


def export_onnx(model: ShowerModel | nn.Module, path: str | os.PathLike[str], *, opset: int = 17,
                consistency: dict | None = None, dynamo: bool | None = None) -> Path:
    """Export the point network of ``model`` to an ONNX file (written atomically).

    Arguments:
        model: a :class:`~caloadapt.models.ShowerModel` (its EDM denoiser is exported) or the
            denoiser module itself (``EDMPrecond`` or ``ConsistencyPrecond``).
        path: output ``.onnx`` file.
        opset: ONNX opset (17; the dynamo exporter converts down from its native 18).
        consistency: the ``consistency`` marker of a distilled checkpoint: export the one-step
            consistency function instead of the EDM denoiser (see :func:`export_checkpoint_onnx`).
        dynamo: exporter (None: the torch.export-based one, else the legacy TorchScript one).

    Returns:
        The path written. Batch size and number of points are dynamic.
    """
    onnx, _ = _require_onnx()
    module, meta = _exported_module(model, consistency)
    proto, exporter = _to_proto(module, opset, dynamo)
    meta["exporter"] = exporter
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = _META_PREFIX + key, value
    d, c = meta["point_dim"], meta["context_dim"]
    proto.doc_string = (f"caloadapt {meta['kind']} point network: (x[batch, points, {d}], sigma[batch], "
                        f"context[batch, {c}]) -> out[batch, points, {d}]")
    onnx.checker.check_model(proto)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


def export_checkpoint_onnx(checkpoint: str | os.PathLike[str], path: str | os.PathLike[str], *,
                           opset: int = 17) -> tuple[Path, ShowerModel, dict | None]:
    """Export a checkpoint (diffusion: the EDM denoiser; distilled: the consistency function).

    Returns ``(path, model, consistency settings or None)``; pass the model to :func:`parity_check`.
    """
    payload = load_checkpoint(checkpoint)
    model = load_model(payload, source=str(checkpoint))[0].eval()
    settings = payload.get(CONSISTENCY_KEY)
    return export_onnx(model, path, opset=opset, consistency=settings), model, settings


def onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``caloadapt.*`` metadata of an exported file (without the prefix)."""
    onnx, _ = _require_onnx()
    model = onnx.load_model(str(path), load_external_data=False)
    return {p.key[len(_META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(_META_PREFIX)}


class OnnxDenoiser(nn.Module):
    """An exported point network run by onnxruntime on CPU, with the torch denoiser's interface.

    ``OnnxDenoiser(path)(x, sigma, context) -> Tensor`` like ``EDMPrecond`` (``kind == "edm"``)
    or ``ConsistencyPrecond`` (``kind == "consistency"``), so the samplers of
    :mod:`caloadapt.models.edm` and :func:`~caloadapt.models.consistency.sample_consistency`
    accept it. It is an ``nn.Module`` without parameters so that it can stand in for
    ``ShowerModel.denoiser`` (see :func:`onnx_model`). Results come back on the input's device.

    Arguments:
        path: the exported file.
        threads: onnxruntime intra-op threads (None: onnxruntime's default, all cores).
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        super().__init__()
        _, ort = _require_onnx()
        input_file(path, "ONNX file", CheckpointError)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        self.path = Path(path)
        self.threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) share no base
            raise CheckpointError(wrong_kind(path, "ONNX file") or f"{path}: not a valid ONNX model "
                                  f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k[len(_META_PREFIX):]: v for k, v in meta.items() if k.startswith(_META_PREFIX)}
        self.kind = self.metadata.get("kind", "edm")
        self.sigma_min = float(self.metadata.get("sigma_min", 0.002))
        self.sigma_max = float(self.metadata.get("sigma_max", 80.0))
        self.sigma_data_values = tuple(float(v) for v in self.metadata.get("sigma_data", "0.5").split(","))
        self.takes_mask = "mask" in {i.name for i in self.session.get_inputs()}

    def forward(self, x: Tensor, sigma: Tensor | float, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (True for real points) is fed to networks exported with one (attention between
        points); a per-point network has no use for it."""
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(batch)
        feeds = {"x": x.detach().to("cpu", torch.float32).contiguous().numpy(),
                 "sigma": sigma.detach().cpu().contiguous().numpy(),
                 "context": context.detach().to("cpu", torch.float32).contiguous().numpy()}
        if self.takes_mask:
            mask = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
            feeds["mask"] = mask.detach().to("cpu", torch.bool).contiguous().numpy()
        out = self.session.run([OUTPUT_NAME], feeds)[0]
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, kind={self.kind!r}, threads={self.threads}"


def onnx_model(model: ShowerModel, path: str | os.PathLike[str], *, threads: int | None = None) -> ShowerModel:
    """A view of ``model`` whose point network runs through onnxruntime (flow and buffers shared).

    ``ShowerModel.generate``, ``iter_generate`` and the samplers work unchanged on it; use the
    ``heun``/``euler`` samplers for an ``edm`` export and the consistency sampler for a
    ``consistency`` export (``onnx_model(...).denoiser.kind`` says which). CPU only.
    """
    view = copy.copy(model)
    view._modules = dict(model._modules)  # noqa: SLF001 - a shallow view; the original keeps its denoiser
    view.denoiser = OnnxDenoiser(path, threads=threads)
    return view


def _reference(model: ShowerModel | nn.Module, meta: dict[str, str]) -> nn.Module:
    denoiser = getattr(model, "denoiser", model)
    if meta.get("kind") == "consistency" and isinstance(denoiser, EDMPrecond):
        return ConsistencyPrecond.from_edm(denoiser, float(meta.get("sigma_min", 0.002)))
    return denoiser


#: (batch, points) of the parity trials, cycled
_PARITY_SHAPES = ((1, 1), (5, 137), (32, 1203), (2, 4000), (64, 17))


@torch.inference_mode()
def parity_check(model: ShowerModel | nn.Module, path: str | os.PathLike[str], n_trials: int = 3, *,
                 seed: int = 0) -> float:
    """Max abs difference between onnxruntime and PyTorch on random inputs (should be <= 1e-4).

    Trial ``k`` uses the ``(batch, points)`` sizes ``(1, 1)``, ``(5, 137)``, ``(32, 1203)``,
    ``(2, 4000)``, ``(64, 17)`` (cycled), noise levels log-uniform in [sigma_min, sigma_max],
    points ``x ~ N(0, sigma^2 + sigma_data^2)`` and standard-normal contexts.

    Arguments:
        model: the model (or denoiser) that was exported; compared on CPU in float32.
        path: the ONNX file; its metadata says which function it holds.
        n_trials: number of random input sets.
    """
    session = OnnxDenoiser(path)
    reference = copy.deepcopy(_reference(model, session.metadata)).cpu().float().eval()
    gen = torch.Generator().manual_seed(seed)
    low, high = np.log(session.sigma_min), np.log(session.sigma_max)
    sigma_data = float(max(session.sigma_data_values))
    worst = 0.0
    for k in range(n_trials):
        batch, points = _PARITY_SHAPES[k % len(_PARITY_SHAPES)]
        sigma = (low + (high - low) * torch.rand(batch, generator=gen)).exp()
        scale = (sigma**2 + sigma_data**2).sqrt()[:, None, None]
        x = torch.randn(batch, points, reference.net.point_dim, generator=gen) * scale
        context = torch.randn(batch, reference.net.context_dim, generator=gen)
        # random numbers of real points per shower (a prefix, as in generation); at least one
        counts = torch.randint(1, points + 1, (batch, 1), generator=gen)
        mask = torch.arange(points)[None, :] < counts if session.takes_mask else None
        expected = reference(x, sigma, context, mask)
        got = session(x, sigma, context, mask)
        if got.shape != expected.shape:
            raise CaloadaptError(f"ONNX output shape {tuple(got.shape)} differs from PyTorch {tuple(expected.shape)}")
        worst = max(worst, float((got - expected).abs().max()))
    return worst
