"""Exporting trained models: ONNX (point network) for onnxruntime inference."""

from __future__ import annotations

__all__ = ["export_onnx", "export_checkpoint_onnx", "onnx_metadata", "parity_check", "OnnxDenoiser", "onnx_model",
           "PARITY_TOLERANCE"]


def __getattr__(name: str):
    # lazy: importing caloadapt.export must not need onnx/onnxruntime (optional dependencies)
    if name in __all__:
        from . import onnx as _onnx

        return getattr(_onnx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
