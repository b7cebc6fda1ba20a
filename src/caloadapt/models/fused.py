"""Fast inference evaluation of a preconditioned point network (EDM denoiser or consistency function).

The per-point network is memory-bound on CPUs: :class:`FusedDenoiser` folds each layer's gate
and context bias into fewer passes over the activations and evaluates cache-sized chunks of
showers, skipping padding. It gives the same values as the wrapped module up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .pointwise import ConcatSquashLinear, PointwiseNet, TimeEmbedding

__all__ = ["FusedDenoiser"]


def _fusable(net: nn.Module) -> bool:
    """True for a plain :class:`~caloadapt.models.pointwise.PointwiseNet` (no adapter wrappers)."""
    return (type(net) is PointwiseNet and type(net.time_embedding) is TimeEmbedding
            and all(type(layer) is ConcatSquashLinear and type(layer.linear) is nn.Linear
                    and type(layer.gate) is nn.Linear and type(layer.context_bias) is nn.Linear
                    for layer in net.layers))


def _fused_pointwise(net: nn.Module, x: Tensor, c_noise: Tensor, context: Tensor) -> Tensor:
    """``PointwiseNet.forward`` with fewer passes over the activations (memory-bound on CPU).

    Each layer computes ``(W h + b) * g + H ctx`` with the per-shower gate ``g`` and context bias:

    - showers with at least as many points as the layer has inputs: the gate and bias are folded
      into per-shower weights, ``h (W^T * g) + (b * g + H ctx)``, one ``baddbmm``;
    - smaller showers (where building per-shower weights would cost more than it saves):
      ``addcmul(H ctx, W h + b, g)``;

    followed by an in-place leaky-ReLU. Same values up to float rounding.
    """
    ctx = torch.cat([net.time_embedding(c_noise), context.to(x.dtype)], dim=-1)  # (S, C)
    h = x
    points = x.shape[1]
    last = len(net.layers) - 1
    for i, layer in enumerate(net.layers):
        gate = torch.sigmoid(layer.gate(ctx))  # (S, out)
        shift = layer.context_bias(ctx)  # (S, out)
        if points >= layer.linear.in_features:
            weight = layer.linear.weight.t().unsqueeze(0) * gate.unsqueeze(1)  # (S, in, out)
            h = torch.baddbmm(torch.addcmul(shift, layer.linear.bias, gate).unsqueeze(1), h, weight)
        else:
            h = torch.addcmul(shift.unsqueeze(1), layer.linear(h), gate.unsqueeze(1))
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
        chunk_points: points per network call (default 2048 on CPU, 2^21 on CUDA).
    """

    def __init__(self, denoiser: nn.Module, chunk_points: int | None = None) -> None:
        super().__init__()
        self.inner = denoiser
        self.chunk_points = chunk_points
        self.fusable = hasattr(denoiser, "scalings") and _fusable(getattr(denoiser, "net", None))
        self.kind = getattr(denoiser, "kind", "edm")

    def _evaluate(self, x: Tensor, sigma: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        if not self.fusable or x.device.type != "cpu":  # GPUs: the plain network (bandwidth is ample there)
            return self.inner(x, sigma, context, mask)
        c_skip, c_out, c_in, c_noise = self.inner.scalings(sigma)
        return torch.addcmul(c_skip * x, c_out, _fused_pointwise(self.inner.net, c_in * x, c_noise, context))

    def forward(self, x: Tensor, sigma: Tensor | float, context: Tensor, mask: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        batch, width = x.shape[:2]
        mask = mask if mask is not None and mask.shape == (batch, width) else None
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return self.inner(x, sigma, context, mask)
        chunk = self.chunk_points or (2**21 if x.device.type == "cuda" else 2048)
        if mask is not None:
            counts = mask.sum(dim=1)
            prefix = torch.arange(width, device=x.device)[None, :] < counts[:, None]
            if not torch.equal(prefix, mask):
                counts = None
        else:
            counts = None
        if counts is None:  # no usable mask: equal-width chunks of whole showers
            if batch * width <= chunk:
                return self._evaluate(x, sigma, context, mask)
            step = max(1, chunk // max(width, 1))
            return torch.cat([self._evaluate(x[i:i + step], sigma[i:i + step], context[i:i + step],
                                             None if mask is None else mask[i:i + step])
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
            out[index, :m] = self._evaluate(x[index, :m], sigma[index], context[index], mask[index, :m])
        return out.masked_fill_(~mask[..., None], 0.0)
