"""ShowerFlow: a conditional neural spline flow over per-shower statistics.

The flow models ``p(s | c)`` for a vector ``s`` of per-shower statistics (whatever the caller
chooses, e.g. points and energy per depth bin, centre of gravity) given a conditioning vector
``c`` (e.g. the normalised incident energy). The meaning of the features lives with the caller;
this module only sees ``n_features`` standardised numbers.

It replaces the pyro ``HybridTanH`` flow of CaloClouds II / CaloTransfer (docs/model.md §4) by a
zuko neural spline flow made of coupling transforms (``passes=2``), so that sampling costs two
hyper-network passes per transform instead of one per feature.

zuko's masked layers multiply each weight matrix by its mask at every call. Without gradients the
masked weights are computed once and kept until the weights change (:class:`_CachedMaskedLinear`):
at batch 1 that product was most of the flow's sampling time (docs/speed.md). The splines normalise
their bin widths and heights over the bins in an inner dimension (:class:`_RQSTransform`), where the
CPU's softmax is several times faster than over the short last one. Sampling inverts the couplings
with one plain function of tensors (:func:`_invert_couplings`), which ``torch.compile`` can fuse
(:meth:`ShowerFlow.compile_sampling`), and each half of a coupling transform is inverted with the
weights its outputs depend on, no more (:class:`_CouplingHalves`; docs/speed.md, "Each half reads
only what it depends on").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import zuko
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ShowerFlow"]


def tensor_versions(*tensors: Tensor) -> tuple:
    """What identifies the contents of ``tensors``: torch counts in-place modifications of a tensor in
    ``_version``, and a replaced tensor (a move to another device) has another address."""
    return tuple((t._version, t.data_ptr()) for t in tensors)


class _CachedMaskedLinear(zuko.nn.MaskedLinear):
    """zuko's masked linear layer, keeping ``mask * weight`` while no gradient is taken.

    The product is recomputed whenever the weight or the mask is modified in place (an optimiser
    step, ``load_state_dict``), replaced (a move to another device) or a gradient is wanted, so the
    layer computes exactly what zuko's does.
    """

    _masked: tuple[tuple, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        key = tensor_versions(self.weight, self.mask)
        if self._masked is None or self._masked[0] != key:
            self._masked = (key, self.mask * self.weight)
        return torch.nn.functional.linear(x, self._masked[1], self.bias)


def _cache_masked_weights(network: nn.Module) -> None:
    """Make zuko's masked linear layers in ``network`` :class:`_CachedMaskedLinear` in place: the
    subclass adds only behaviour, so each layer keeps its parameters, buffers and state dict, and
    no layer is rebuilt (which would draw random numbers and change every later initialisation)."""
    for layer in network.modules():
        if type(layer) is zuko.nn.MaskedLinear:
            layer.__class__ = _CachedMaskedLinear


def _over_bins(operation, values: Tensor) -> Tensor:
    """``operation(values, dim)`` over the last dimension (the spline's bins), computed with the bins
    in an inner dimension: torch's CPU softmax and cumsum over a last dimension of a few elements
    cost several times more than over an inner one (100 showers x 162 statistics x 8 bins: 5.5 ms
    against 0.5 ms on one thread)."""
    if values.ndim < 2:
        return operation(values, -1)
    return operation(values.transpose(-1, -2), -2).transpose(-1, -2)


class _RQSTransform(zuko.transforms.MonotonicRQSTransform):
    """zuko's monotonic rational-quadratic spline (Durkan et al. 2019, arXiv:1906.04032) with the
    same knots, computed with :func:`_over_bins`.

    The unconstrained widths and heights are softly bounded (``u / (1 + |2u / ln(slope)|)``),
    normalised over the bins and summed into knots on ``[-bound, bound]``; the derivatives are
    softly bounded (``u / (1 + |u / ln(slope)|)``) and exponentiated, with slope 1 at both ends.
    Densities are zuko's (the knots are all the transform keeps); the inverse is its own
    (:meth:`_inverse`), for zuko's ``inv`` and the flow's sampling alike.
    """

    def __init__(self, widths: Tensor, heights: Tensor, derivatives: Tensor, bound: float = 5.0,
                 slope: float = 1e-3, **kwargs) -> None:
        torch.distributions.Transform.__init__(self, **kwargs)
        log_slope = math.log(slope)

        def knots(unconstrained: Tensor) -> Tensor:
            fractions = _over_bins(torch.softmax, unconstrained / (1 + abs(2 * unconstrained / log_slope)))
            return bound * (2 * _over_bins(torch.cumsum, F.pad(fractions, (1, 0), value=0)) - 1)

        # both knot sets in one pass: at batch 1 the flow's cost is the number of tensor operations
        # (stacked in front: the bins must stay next to the statistics for _over_bins)
        self.horizontal, self.vertical = knots(torch.stack((widths, heights))).unbind(0)
        self.derivatives = torch.exp(F.pad(derivatives / (1 + abs(derivatives / log_slope)), (1, 1), value=0))

    def _inverse(self, y: Tensor) -> Tensor:
        """``x`` with ``spline(x) = y``: zuko's inverse (the root of the rational quadratic in the bin
        that holds ``y``, Durkan et al. 2019, section 3.1 and appendix A; the identity outside
        ``[-bound, bound]``), with one gather for the knots of both ends of every bin instead of six.
        """
        n_bins = self.horizontal.shape[-1] - 1
        k = torch.sum(self.vertical < y[..., None], dim=-1) - 1  # bin of y: -1 below, n_bins above
        inside = (k >= 0) & (k < n_bins)
        ends = k.clamp(0, n_bins - 1)[..., None] + torch.arange(2, device=y.device)  # (..., 2): k and k + 1
        knots = torch.stack((self.horizontal, self.vertical, self.derivatives), dim=-1)  # (..., n_bins + 1, 3)
        at_ends = knots.expand(*k.shape, n_bins + 1, 3).gather(-2, ends[..., None].expand(*ends.shape, 3))
        (x0, y0, d0), (x1, y1, d1) = at_ends[..., 0, :].unbind(-1), at_ends[..., 1, :].unbind(-1)
        dx, dy = x1 - x0, y1 - y0
        slope = dy / dx
        height = inside * (y - y0)
        bent = height * (d0 + d1 - 2 * slope)  # height x curvature
        a = dy * (slope - d0) + bent
        b = dy * d0 - bent
        c = -slope * height
        z = 2 * c / (-b - (b * b - 4 * a * c).sqrt())
        return torch.where(inside, x0 + z * dx, y)


class _CouplingHalves:
    """What sampling needs of one coupling transform, as plain tensors without gradient: for each
    half of its features, the part of the hyper-network that gives that half's spline parameters.

    zuko's ``MaskedAutoregressiveTransform`` with ``passes=2`` gives feature ``i`` the degree
    ``order[i] // ceil(features / 2)``: degree 0 is transformed given the context only, degree 1
    given the context and the degree-0 features; the last layer's rows ``i * total ... (i + 1) *
    total - 1`` are feature ``i``'s parameters. The masks say which hidden units and inputs those
    rows depend on (their support, followed from the last layer back to the inputs): for the first
    half, the context and half the hidden units; for the second, the context, the first half's
    features and every unit. Each half keeps only the weights of its support, masked and transposed
    (``(inputs, outputs)``, the layout a one-row product reads fastest), which computes the same
    numbers with 30 % fewer weights read per sample in the shipped flow. The weights are cut again whenever a
    layer's weight, mask or bias changes (same rule as :class:`_CachedMaskedLinear`)."""

    def __init__(self, transform: zuko.flows.MaskedAutoregressiveTransform) -> None:
        *hidden, last = transform.hyper
        # ShowerFlow's hyper-networks are zuko's default: masked linear layers with a ReLU between them
        assert all(isinstance(a, nn.ReLU) for a in hidden[1::2]), hidden
        self.layers = (*hidden[0::2], last)
        self.total = transform.total
        self.sizes = [math.prod(s) for s in transform.shapes]
        self.univariate = transform.univariate
        self.features = [torch.nonzero(transform.order == degree).flatten() for degree in (0, 1)]
        self._cut: tuple[tuple, tuple] | None = None

    def _half(self, features: Tensor) -> tuple:
        """``(features, inputs, layers)`` of one half: the inputs it reads (indices into the features
        followed by the context) and ``(weight^T, bias)`` of each layer over its support."""
        rows = (features[:, None] * self.total + torch.arange(self.total, device=features.device)).flatten()
        layers = []
        for layer in reversed(self.layers):
            mask = layer.mask[rows]
            columns = torch.nonzero(mask.any(dim=0)).flatten()
            weight = (layer.weight[rows] * mask)[:, columns]
            layers.insert(0, (weight.t().contiguous(), layer.bias[rows].detach()))
            rows = columns
        return features, rows, layers

    def plan(self) -> tuple:
        """``(halves, total, sizes, univariate)``: :meth:`_half` of the first half then of the second,
        and how the last layer's output splits into spline parameters (:func:`_invert_couplings`)."""
        key = tensor_versions(*(t for layer in self.layers for t in (layer.weight, layer.mask, layer.bias)))
        if self._cut is None or self._cut[0] != key:
            device = self.layers[-1].weight.device
            with torch.no_grad():
                halves = [self._half(f.to(device)) for f in self.features]
            self._cut = (key, (halves, self.total, self.sizes, self.univariate))
        return self._cut[1]


def _invert_couplings(plan: list[tuple], y: Tensor, context: Tensor) -> Tensor:
    """The inverse of a flow's coupling transforms, last first (``plan``: :meth:`_CouplingHalves.plan`
    of each, in that order), for base samples ``y`` (B, n_features) and ``context`` (B, C).

    zuko inverts a coupling transform with two passes of its hyper-network over all features: the
    first (from ``x = 0``) gets the first half right, the second the rest. Here each pass evaluates
    only what the half it inverts depends on (:class:`_CouplingHalves`): the same numbers for less
    than half the work of the first pass. A plain function of tensors, so that ``torch.compile``
    can fuse it (:meth:`ShowerFlow.compile_sampling`).
    """
    x = y
    for halves, total, sizes, univariate in plan:
        y, x = x, torch.zeros_like(x)
        for features, inputs, layers in halves:
            hidden = torch.cat([x, context], dim=-1).index_select(-1, inputs)
            for i, (weight_t, bias) in enumerate(layers):
                hidden = torch.addmm(bias, hidden, weight_t)
                if i < len(layers) - 1:
                    hidden = torch.relu(hidden)
            spline = univariate(*hidden.unflatten(-1, (-1, total)).split(sizes, dim=-1))
            # without torch's Transform.inv checks
            x = x.index_copy(1, features, spline._inverse(y.index_select(1, features)))
    return x


class ShowerFlow(nn.Module):
    """Conditional neural spline flow with coupling transforms (zuko ``NSF`` with ``passes=2``).

    Each of the ``transforms`` layers is a :class:`zuko.flows.MaskedAutoregressiveTransform`
    with ``passes=2`` (a coupling transform: the features are split in two halves; the first
    half is transformed given the context only, the second given the context and the first half)
    and a monotonic rational-quadratic spline with ``bins`` bins as univariate transform; the base
    distribution is N(0, I). This is exactly ``zuko.flows.NSF(..., passes=2)`` except that the
    feature order of every transform is a random permutation drawn from ``permutation_seed``
    (the reference's random permutations used seed 42, docs/model.md §4), so that every pair of
    features can end up in different halves, and that its splines are computed faster
    (:class:`_RQSTransform`, the same function). With ``randperm=False`` the orders alternate
    ascending / descending as in zuko.

    Warning:
        The splines act on ``[-5, 5]`` and are the identity outside; standardise the features
        (zero mean, unit variance) before training.

    References:
        | Neural Spline Flows (Durkan et al., 2019), https://arxiv.org/abs/1906.04032;
        | zuko, https://github.com/probabilists/zuko.

    Arguments:
        n_features: dimension of the per-shower statistics vector (at least 2).
        context_dim: dimension of the conditioning vector (1: the normalised incident energy).
        hidden: hidden widths of every coupling hyper-network.
        transforms: number of coupling transforms.
        bins: number of spline bins.
        randperm: random feature order per transform (True) or alternating order (False).
        permutation_seed: seed of the feature permutations; independent of the global RNG, which
            still drives the weight initialisation.
    """

    def __init__(
        self,
        n_features: int,
        context_dim: int = 1,
        hidden: Sequence[int] = (256, 256),
        transforms: int = 6,
        bins: int = 8,
        randperm: bool = True,
        permutation_seed: int = 42,
    ) -> None:
        super().__init__()
        if n_features < 2:
            raise ValueError(f"n_features must be at least 2 for coupling transforms, got {n_features}")
        if context_dim < 1:
            raise ValueError(f"context_dim must be at least 1 (a conditional flow), got {context_dim}")
        if transforms < 1 or bins < 2:
            raise ValueError(f"need transforms >= 1 and bins >= 2, got transforms={transforms}, bins={bins}")
        self.n_features = n_features
        self.context_dim = context_dim

        if randperm:
            rng = torch.Generator().manual_seed(permutation_seed)
            orders = [torch.randperm(n_features, generator=rng) for _ in range(transforms)]
        else:
            ascending = torch.arange(n_features)
            orders = [ascending if i % 2 == 0 else ascending.flip(0) for i in range(transforms)]

        layers = [
            zuko.flows.MaskedAutoregressiveTransform(
                features=n_features,
                context=context_dim,
                passes=2,
                order=order,
                univariate=partial(_RQSTransform, slope=1e-3),
                shapes=[(bins,), (bins,), (bins - 1,)],
                hidden_features=tuple(hidden),
            )
            for order in orders
        ]
        for layer in layers:
            _cache_masked_weights(layer.hyper)
        base = zuko.flows.UnconditionalDistribution(
            zuko.distributions.DiagNormal, torch.zeros(n_features), torch.ones(n_features), buffer=True
        )
        self.flow = zuko.flows.Flow(layers, base)
        self._halves: list[_CouplingHalves] | None = None
        self._invert_fn = _invert_couplings

    def _check_context(self, context: Tensor) -> Tensor:
        if context.ndim == 1 and self.context_dim == 1:
            context = context[:, None]
        if context.ndim != 2 or context.shape[1] != self.context_dim:
            raise ValueError(f"context must have shape (B, {self.context_dim}), got {tuple(context.shape)}")
        return context

    def forward(self, context: Tensor) -> torch.distributions.Distribution:
        """The conditional distribution ``p(s | c)`` (a zuko ``NormalizingFlow``) for ``context`` (B, C)."""
        return self.flow(self._check_context(context))

    def log_prob(self, x: Tensor, context: Tensor) -> Tensor:
        """Log-density ``log p(x | c)`` of ``x`` (B, n_features) given ``context`` (B, C); shape (B,)."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"x must have shape (B, {self.n_features}), got {tuple(x.shape)}")
        return self(context).log_prob(x)

    @torch.no_grad()
    def sample(
        self,
        context: Tensor,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> Tensor:
        """Draw one sample per context row, ``x = f^{-1}(z)`` with ``z ~ N(0, I)``.

        Arguments:
            context: ``(B, C)`` (or ``(B,)`` when ``context_dim == 1``).
            generator: torch RNG for the latent draw (on the context's device).
            seed: seed of a fresh generator on the context's device; ignored if ``generator`` is
                given. With neither, the global RNG is used.

        Returns:
            Samples of shape ``(B, n_features)``.
        """
        context = self._check_context(context)
        if generator is None and seed is not None:
            generator = torch.Generator(device=context.device).manual_seed(seed)
        base = self.flow.base().base_dist  # Normal(loc, scale) of the DiagNormal base
        eps = torch.randn(
            (context.shape[0], self.n_features), generator=generator, device=context.device, dtype=base.loc.dtype
        )
        return self._invert(base.loc + base.scale * eps, context)

    def _invert(self, y: Tensor, context: Tensor) -> Tensor:
        """The flow's inverse map of base samples ``y`` (B, n_features): what
        ``self(context).transform.inv(y)`` computes, without building zuko's transform objects (at
        batch 1 building them cost more than the arithmetic): :func:`_invert_couplings`."""
        return self._invert_fn(self._plan(), y, context.to(y.dtype))

    def _plan(self) -> list[tuple]:
        """What :func:`_invert_couplings` needs of each coupling transform, last first."""
        return [halves.plan() for halves in reversed(self._coupling_halves())]

    def compile_sampling(self) -> None:
        """Sample through ``torch.compile`` from now on (docs/speed.md, "The flow compiled").

        At batch 1 the flow's cost is the dispatch of its some thousand small tensor operations;
        compiled, they run as a few fused kernels. One sample at batch 1 is compiled here (tens of
        seconds on a CPU, where inductor needs a C++ compiler), so that a failure shows now; a
        larger batch compiles on its first call. Later weight changes are picked up (the weights
        are inputs of the compiled code, not constants).

        Raises:
            RuntimeError: torch could not compile the flow (the message says why).
        """
        # static shapes, one compilation per batch size: with torch's automatic dynamic shapes, a flow
        # compiled after one of another size in the same process gave wrong samples (seen in the tests)
        compiled = torch.compile(_invert_couplings, dynamic=False)
        like = self.flow.base().base_dist.loc  # device and dtype of the samples
        try:
            with torch.no_grad():
                compiled(self._plan(), like.new_zeros(1, self.n_features), like.new_zeros(1, self.context_dim))
        except Exception as err:  # noqa: BLE001 - inductor reports a missing compiler in several ways
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"torch.compile could not compile the flow's sampling: {first}") from None
        self._invert_fn = compiled

    def _coupling_halves(self) -> list[_CouplingHalves]:
        transforms = self.flow.transform.transforms
        # cut again when a layer was replaced (moved to another device, wrapped for adaptation, merged)
        if self._halves is None or any(a is not b for h, t in zip(self._halves, transforms)
                                       for a, b in zip(h.layers, list(t.hyper)[0::2], strict=True)):
            self._halves = [_CouplingHalves(transform) for transform in transforms]
        return self._halves
