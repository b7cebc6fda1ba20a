"""Fast inference evaluation of a preconditioned point network (EDM denoiser or consistency function).

The per-point network is memory-bound on CPUs: :class:`FusedDenoiser` folds each layer's gate
and context bias into fewer passes over the activations and evaluates cache-sized chunks of
showers, skipping padding. It gives the same values as the wrapped module up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .pointwise import ConcatSquashLinear, PointwiseNet, TimeEmbedding

__all__ = ["FusedDenoiser", "CPU_CHUNK_POINTS"]

#: points per network call on the CPU: a few showers of a few thousand points, whose activations
#: still fit a core's cache; fewer calls share the cost of each call's small per-shower work
CPU_CHUNK_POINTS = 16384


def _fusable(net: nn.Module) -> bool:
    """True for a plain :class:`~caloadapt.models.pointwise.PointwiseNet` (no adapter wrappers)."""
    return (type(net) is PointwiseNet and type(net.time_embedding) is TimeEmbedding
            and all(type(layer) is ConcatSquashLinear and type(layer.linear) is nn.Linear
                    and type(layer.gate) is nn.Linear and type(layer.context_bias) is nn.Linear
                    for layer in net.layers))


def _shower_constants(net: nn.Module, c_noise: Tensor, context: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per shower and layer of a ``PointwiseNet``: the gate ``g = sigmoid(G ctx + g0)`` and the
    output shift ``b * g + H ctx``, each ``(S, out)``; computed once for all showers of a batch."""
    ctx = torch.cat([net.time_embedding(c_noise), context.to(c_noise.dtype)], dim=-1)  # (S, C)
    constants = []
    for layer in net.layers:
        gate = torch.sigmoid(layer.gate(ctx))
        constants.append((gate, torch.addcmul(layer.context_bias(ctx), layer.linear.bias, gate)))
    return constants


def _fused_pointwise(net: nn.Module, h: Tensor, constants: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``PointwiseNet.forward`` of points ``h`` (S, M, in) with fewer passes over the activations
    (memory-bound on CPU), given the showers' :func:`_shower_constants`.

    Each layer computes ``(W h + b) * g + H ctx`` = ``(W h) * g + shift``:

    - showers with at least as many points as the layer has inputs: the gate is folded into
      per-shower weights, ``h (W^T * g) + shift``, one ``baddbmm``;
    - smaller showers (where building per-shower weights would cost more than it saves):
      ``addcmul(shift, W h, g)``;

    followed by an in-place leaky-ReLU. Same values up to float rounding.
    """
    points = h.shape[1]
    last = len(net.layers) - 1
    for i, (layer, (gate, shift)) in enumerate(zip(net.layers, constants)):
        if points >= layer.linear.in_features:
            weight = layer.linear.weight.t().unsqueeze(0) * gate.unsqueeze(1)  # (S, in, out)
            h = torch.baddbmm(shift.unsqueeze(1), h, weight)
        else:
            h = torch.addcmul(shift.unsqueeze(1), torch.nn.functional.linear(h, layer.linear.weight),
                              gate.unsqueeze(1))
        if i < last:
            h = torch.nn.functional.leaky_relu_(h, net.negative_slope)
    return h


class FusedDenoiser(nn.Module):
    """Fast inference evaluation of an ``EDMPrecond`` or ``ConsistencyPrecond`` (same interface).

    - On CPU the point network runs with fused layers (:func:`_fused_pointwise`) when it is a
      plain ``PointwiseNet``; otherwise (and on GPUs) the wrapped module is called as is.
    - Showers are evaluated in chunks of about ``chunk_points`` points, so the activations stay
      in the CPU cache; with a ``mask`` whose real points are a prefix of each shower (as in
      ``ShowerModel.generate``), showers are sorted by size and each chunk is cut to its largest
      shower, so padding costs almost nothing. Padded points of the output are 0.
    - Under autograd (training) it simply calls the wrapped module.

    Arguments:
        denoiser: the module to evaluate (must have ``scalings(sigma)`` and ``net`` for fusion).
        chunk_points: points per network call (default ``CPU_CHUNK_POINTS`` on CPU, 2^21 on CUDA).
    """

    def __init__(self, denoiser: nn.Module, chunk_points: int | None = None) -> None:
        super().__init__()
        self.inner = denoiser
        self.chunk_points = chunk_points
        self.fusable = hasattr(denoiser, "scalings") and _fusable(getattr(denoiser, "net", None))
        self.kind = getattr(denoiser, "kind", "edm")

    def _showers(self, sigma: Tensor, context: Tensor) -> Callable[[Tensor, Tensor], Tensor] | None:
        """What the showers of one call share, computed once (the preconditioning's scalings and the
        layers' gates and shifts), as a function evaluating the points of the showers ``index``
        (``x`` of shape (len(index), M, D)); None where the wrapped module must be called."""
        if not self.fusable or sigma.device.type != "cpu":  # GPUs: the plain network (bandwidth is ample)
            return None
        c_skip, c_out, c_in, c_noise = self.inner.scalings(sigma)  # (S, 1, D) or (S, 1, 1) each
        constants = _shower_constants(self.inner.net, c_noise, context)

        def evaluate(x: Tensor, index: Tensor) -> Tensor:
            chunk = [(gate[index], shift[index]) for gate, shift in constants]
            network = _fused_pointwise(self.inner.net, c_in[index] * x, chunk)
            return torch.addcmul(c_skip[index] * x, c_out[index], network)
        return evaluate

    def forward(self, x: Tensor, sigma: Tensor | float, context: Tensor, mask: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        batch, width = x.shape[:2]
        mask = mask if mask is not None and mask.shape == (batch, width) else None
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return self.inner(x, sigma, context, mask)
        chunk = self.chunk_points or (2**21 if x.device.type == "cuda" else CPU_CHUNK_POINTS)
        if mask is not None:
            counts = mask.sum(dim=1)
            prefix = torch.arange(width, device=x.device)[None, :] < counts[:, None]
            if not torch.equal(prefix, mask):
                counts = None
        else:
            counts = None
        evaluate = self._showers(sigma, context)
        if evaluate is None:
            def evaluate(x_part: Tensor, index: Tensor) -> Tensor:
                part_mask = None if mask is None else mask[index, :x_part.shape[1]]
                return self.inner(x_part, sigma[index], context[index], part_mask)
        if counts is None:  # no usable mask: equal-width chunks of whole showers
            step = max(1, chunk // max(width, 1))
            return torch.cat([evaluate(x[i:i + step], torch.arange(i, min(i + step, batch), device=x.device))
                              for i in range(0, batch, step)])
        order = counts.argsort(descending=True)
        sorted_counts = counts[order]
        # consecutive showers (largest first) in groups of about `chunk` real points
        group = torch.div(sorted_counts.cumsum(0) - sorted_counts, chunk, rounding_mode="floor")
        boundaries = torch.nonzero(group[1:] != group[:-1]).flatten().add(1).tolist()
        out = torch.zeros_like(x)
        widths = sorted_counts.tolist()
        for start, stop in zip([0, *boundaries], [*boundaries, batch]):
            m = widths[start]
            if m == 0:
                continue
            index = order[start:stop]
            out[index, :m] = evaluate(x[index, :m], index)
        return out.masked_fill_(~mask[..., None], 0.0)
