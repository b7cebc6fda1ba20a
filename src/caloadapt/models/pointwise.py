"""Per-point denoising network of CaloClouds II (PointWise-Net), with named parameter groups.

Every point of a shower is processed independently; the only information shared between the
points of one shower is the per-shower context (the noise-level embedding and the shower
conditioning, e.g. incident energy and number of points). There is no attention or pooling.

Architecture (docs/model.md §1; Buhmann et al., CaloClouds II, arXiv:2309.05704):

- context ``ctx = [TimeEmbedding(c_noise), condition]``, dimension ``time_dim + context_dim``
  (64 + 2 = 66 by default);
- a stack of :class:`ConcatSquashLinear` layers, widths 4 -> 128 -> 256 -> 512 -> 256 -> 128 -> 4
  by default, leaky-ReLU (slope 0.01) between layers and none after the last.

Parameter groups (docs/model.md §6): fine-tuning strategies select parameters by
*group*, never by a substring of their names. :meth:`PointwiseNet.parameter_groups` returns

=================  ===============================================  ======================
group              tensors                                          count (default net)
=================  ===============================================  ======================
``weight``         main weights W of every layer                    328,704
``bias``           true bias vectors b of every layer               1,284
``context_bias``   context-to-bias maps H (no bias of their own)    84,744
``gate``           gate weights G **and gate bias vectors g**       86,028 (84,744 + 1,284)
``time_embedding`` Linear(64, 64) of the time embedding (W and b)   4,160
=================  ===============================================  ======================

The gate bias g counts as ``gate``: it is the offset of the sigmoid gate, part of the
multiplicative pathway, not an additive bias of the output. The honest "true bias vectors" of
BitFit (b, g and the time-embedding bias: 2,632 parameters, 0.52 %) are given by
:meth:`PointwiseNet.bias_vectors`.

Submodule names versus the reference implementation (for checkpoint conversion):
``layers.i.linear`` = ``layers.i._layer``, ``layers.i.gate`` = ``layers.i._hyper_gate``,
``layers.i.context_bias`` = ``layers.i._hyper_bias``, ``time_embedding.fourier.frequencies``
= ``timestep_embed.0.weight`` (flattened from shape (32, 1)), ``time_embedding.linear`` =
``timestep_embed.1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "PARAMETER_GROUPS",
    "ConcatSquashLinear",
    "FourierFeatures",
    "TimeEmbedding",
    "PointwiseNet",
]

#: names of the parameter groups of :class:`PointwiseNet`, in a fixed order
PARAMETER_GROUPS: tuple[str, ...] = ("weight", "bias", "context_bias", "gate", "time_embedding")


class ConcatSquashLinear(nn.Module):
    """Context-gated linear layer: ``out = (W h + b) * sigmoid(G ctx + g) + H ctx``.

    References:
        | FFJORD (Grathwohl et al., 2019), https://arxiv.org/abs/1810.01367 (ConcatSquash);
        | CaloClouds II (Buhmann et al., 2024), https://arxiv.org/abs/2309.05704, docs/model.md §1.

    Submodules: ``linear`` (W, b), ``gate`` (G, g) and ``context_bias`` (H, no bias).

    Arguments:
        in_features: width of the per-point input ``h``.
        out_features: width of the output.
        context_features: width of the per-shower context ``ctx``.
    """

    def __init__(self, in_features: int, out_features: int, context_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(context_features, out_features)
        self.context_bias = nn.Linear(context_features, out_features, bias=False)

    def forward(self, h: Tensor, ctx: Tensor) -> Tensor:
        """Apply the layer.

        Arguments:
            h: per-point input, shape ``(..., M, in_features)``.
            ctx: per-shower context, shape ``(..., 1, context_features)`` (broadcast over the M
                points, so the gate and the context bias are computed once per shower).

        Returns:
            Tensor of shape ``(..., M, out_features)``.
        """
        return self.linear(h) * torch.sigmoid(self.gate(ctx)) + self.context_bias(ctx)


class FourierFeatures(nn.Module):
    """Fixed random Fourier features of a scalar: ``[cos(2 pi f t), sin(2 pi f t)]``.

    The frequencies ``f ~ N(0, std^2)`` are drawn once at construction (from the global torch
    RNG) and kept in a persistent buffer, so they are saved with the checkpoint and never trained.

    References:
        | Tancik et al. 2020, https://arxiv.org/abs/2006.10739; k-diffusion ``FourierFeatures``
          as used by CaloClouds II (docs/model.md §1: 1 input, 64 outputs, std 16).

    Arguments:
        out_features: number of outputs (even); ``out_features // 2`` frequencies.
        std: standard deviation of the frequencies.
    """

    frequencies: Tensor

    def __init__(self, out_features: int = 64, std: float = 16.0) -> None:
        super().__init__()
        if out_features <= 0 or out_features % 2:
            raise ValueError(f"out_features must be a positive even number, got {out_features}")
        self.register_buffer("frequencies", torch.randn(out_features // 2) * std)

    def forward(self, t: Tensor) -> Tensor:
        """Map ``t`` of shape ``(B,)`` to features of shape ``(B, out_features)`` (cos first)."""
        phase = 2.0 * math.pi * t[:, None] * self.frequencies
        return torch.cat([phase.cos(), phase.sin()], dim=-1)


class TimeEmbedding(nn.Module):
    """Embedding of the noise level: c_noise -> Fourier features -> Linear -> leaky-ReLU.

    ``c_noise = ln(sigma) / 4`` is computed by the EDM preconditioning (Karras et al. 2022,
    Table 1), not here. Layout from docs/model.md §1.

    Arguments:
        dim: embedding width (64 in CaloClouds II).
        fourier_std: standard deviation of the fixed Fourier frequencies (16).
        negative_slope: slope of the leaky-ReLU (0.01, the torch default used by the reference).
    """

    def __init__(self, dim: int = 64, fourier_std: float = 16.0, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.fourier = FourierFeatures(dim, fourier_std)
        self.linear = nn.Linear(dim, dim)
        self.negative_slope = negative_slope

    def forward(self, c_noise: Tensor) -> Tensor:
        """Map ``c_noise`` of shape ``(B,)`` to an embedding of shape ``(B, dim)``."""
        return F.leaky_relu(self.linear(self.fourier(c_noise)), self.negative_slope)


class PointwiseNet(nn.Module):
    """CaloClouds II PointWise-Net: the raw network F of the EDM denoiser, applied per point.

    ``F(x; c_noise, condition)`` maps every point of every shower through the ConcatSquash stack,
    each layer gated and shifted by the per-shower context
    ``ctx = [TimeEmbedding(c_noise), condition]``.

    With the defaults and ``context_dim=2`` the network has exactly 504,920 parameters
    (docs/model.md §1).

    References:
        | Buhmann et al., CaloClouds II, https://arxiv.org/abs/2309.05704;
        | docs/model.md §1 (``PointwiseNet_kDiffusion``).

    Arguments:
        point_dim: features per point (4: x, depth, y, energy in normalised units).
        context_dim: width of the per-shower conditioning (2: incident energy and number of
            points, both normalised).
        widths: hidden widths; the network has ``len(widths) + 1`` ConcatSquash layers.
        time_dim: width of the noise-level embedding.
        fourier_std: standard deviation of the fixed Fourier frequencies of the time embedding.
        negative_slope: slope of the leaky-ReLU between layers.

    Attributes:
        layers: the ConcatSquash layers in order from input to output (index 0 is the first);
            "top-k" strategies train ``layers[-k:]``.
        time_embedding: the :class:`TimeEmbedding`.
    """

    def __init__(
        self,
        point_dim: int = 4,
        context_dim: int = 2,
        widths: Sequence[int] = (128, 256, 512, 256, 128),
        time_dim: int = 64,
        fourier_std: float = 16.0,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if point_dim <= 0 or context_dim < 0 or any(w <= 0 for w in widths):
            raise ValueError(
                f"point_dim, widths must be positive and context_dim non-negative, got "
                f"point_dim={point_dim}, context_dim={context_dim}, widths={tuple(widths)}"
            )
        self.point_dim = point_dim
        self.context_dim = context_dim
        self.widths = tuple(int(w) for w in widths)
        self.time_dim = time_dim
        self.negative_slope = negative_slope

        self.time_embedding = TimeEmbedding(time_dim, fourier_std, negative_slope)
        sizes = (point_dim, *self.widths, point_dim)
        ctx_dim = time_dim + context_dim
        self.layers = nn.ModuleList(
            ConcatSquashLinear(n_in, n_out, ctx_dim) for n_in, n_out in zip(sizes[:-1], sizes[1:])
        )

    #: names of the parameter groups, see :meth:`parameter_groups`
    groups = PARAMETER_GROUPS
    #: Linear submodules of a layer that a peft adapter may target (:meth:`adapter_targets`)
    adapter_target_names: tuple[str, ...] = ("linear", "gate", "context_bias")

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """Evaluate F on every point.

        Arguments:
            x: points, shape ``(B, M, point_dim)`` (already scaled by c_in).
            c_noise: noise-level input ``ln(sigma) / 4``, shape ``(B,)`` or a scalar.
            context: per-shower conditioning, shape ``(B, context_dim)``.
            mask: accepted for the common backbone interface and ignored: points are independent.

        Returns:
            Tensor of shape ``(B, M, point_dim)``.
        """
        if x.ndim != 3 or x.shape[-1] != self.point_dim:
            raise ValueError(f"x must have shape (B, M, {self.point_dim}), got {tuple(x.shape)}")
        if context.shape != (x.shape[0], self.context_dim):
            raise ValueError(
                f"context must have shape ({x.shape[0]}, {self.context_dim}), got {tuple(context.shape)}"
            )
        c_noise = torch.as_tensor(c_noise, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])

        ctx = torch.cat([self.time_embedding(c_noise), context.to(x.dtype)], dim=-1)[:, None, :]
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx)
            if i < len(self.layers) - 1:
                h = F.leaky_relu(h, self.negative_slope)
        return h

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Partition the parameters into the named groups of :data:`PARAMETER_GROUPS`.

        Every parameter appears in exactly one group; the partition is built from the module
        structure, not from parameter names. See the module docstring for the table of groups.

        Returns:
            ``{group: [(qualified parameter name, parameter), ...]}`` with the keys in the order
            of :data:`PARAMETER_GROUPS`, layers from input to output.
        """
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in PARAMETER_GROUPS}
        for i, layer in enumerate(self.layers):
            prefix = f"layers.{i}"
            groups["weight"].append((f"{prefix}.linear.weight", layer.linear.weight))
            groups["bias"].append((f"{prefix}.linear.bias", layer.linear.bias))
            groups["context_bias"].append((f"{prefix}.context_bias.weight", layer.context_bias.weight))
            groups["gate"].append((f"{prefix}.gate.weight", layer.gate.weight))
            groups["gate"].append((f"{prefix}.gate.bias", layer.gate.bias))
        for name, p in self.time_embedding.named_parameters():
            groups["time_embedding"].append((f"time_embedding.{name}", p))
        return groups

    def bias_vectors(self) -> list[tuple[str, nn.Parameter]]:
        """The true additive bias vectors (BitFit, Ben Zaken et al. 2022, arXiv:2106.10199).

        These are b and g of every layer and the bias of the time-embedding Linear: 2,632
        parameters (0.52 %) for the default net, docs/model.md §6. The context-to-bias maps H are
        matrices and are *not* included (the reference's substring selection wrongly did so).
        """
        out: list[tuple[str, nn.Parameter]] = []
        for i, layer in enumerate(self.layers):
            out.append((f"layers.{i}.linear.bias", layer.linear.bias))
            out.append((f"layers.{i}.gate.bias", layer.gate.bias))
        out.append(("time_embedding.linear.bias", self.time_embedding.linear.bias))
        return out

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def conditioning_maps(self) -> list[tuple[str, nn.Parameter]]:
        """The context-to-bias maps H (with :meth:`bias_vectors`: the published "BitFit, 17 %")."""
        return [(f"layers.{i}.context_bias.weight", layer.context_bias.weight) for i, layer in enumerate(self.layers)]

    def top_layers(self, k: int) -> list[tuple[str, nn.Parameter]]:
        """All tensors of the last ``k`` ConcatSquash layers and of the time embedding (top-k)."""
        if not 1 <= k <= self.n_layers:
            raise ValueError(f"top-k with k={k}, but the point network has {self.n_layers} layers")
        chosen = [(f"layers.{i}.{name}", p) for i in range(self.n_layers - k, self.n_layers)
                  for name, p in self.layers[i].named_parameters()]
        return chosen + [(f"time_embedding.{name}", p) for name, p in self.time_embedding.named_parameters()]

    def adapter_targets(self, targets: Sequence[str], layers: Sequence[int] | None = None) -> list[str]:
        """Qualified names of the Linear submodules a peft adapter wraps.

        Arguments:
            targets: any of ``linear`` (W), ``gate`` (G), ``context_bias`` (H).
            layers: indices of the ConcatSquash layers (None: all).
        """
        unknown = [t for t in targets if t not in self.adapter_target_names]
        if unknown:
            raise ValueError(f"adapter targets {unknown} do not exist in the pointwise network; "
                             f"expected {', '.join(self.adapter_target_names)}")
        chosen = range(self.n_layers) if layers is None else layers
        bad = [i for i in chosen if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"adapter layers {bad} do not exist; the point network has layers 0..{self.n_layers - 1}")
        return [f"layers.{i}.{t}" for i in chosen for t in targets]
