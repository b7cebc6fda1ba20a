"""EDM diffusion for point clouds: preconditioning, masked loss and deterministic samplers.

All equations are from T. Karras, M. Aittala, T. Aila, S. Laine, *Elucidating the Design Space of
Diffusion-Based Generative Models* (EDM), NeurIPS 2022, https://arxiv.org/abs/2206.00364, as
used by CaloClouds II (docs/model.md §2, §3).

Shapes: a batch of B showers padded to M points of D features, ``x`` of shape ``(B, M, D)``,
with a boolean ``mask`` of shape ``(B, M)`` that is True for real points. Noise levels ``sigma``
are in the units of the (normalised) point features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Denoiser",
    "EDMPrecond",
    "EDMLoss",
    "random_point_subset",
    "karras_sigmas",
    "sample_heun",
    "sample_euler",
    "initial_noise",
    "zero_padding",
    "as_sigma_data",
    "given_features",
    "given_mask",
    "given_scalings",
    "impose_given",
    "DEFAULT_STEPS",
]

#: Heun steps of the point diffusion at generation: 13 noise levels, 25 network evaluations
#: (the CaloClouds II setting, Buhmann et al. 2023, arXiv:2309.05704)
DEFAULT_STEPS = 13

#: a denoiser D(x; sigma, context, mask): x (B, M, D), sigma (B,), context (B, C), mask (B, M) or None
#: -> (B, M, D)
Denoiser = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


def as_sigma_data(sigma_data: float | Sequence[float]) -> tuple[float, ...]:
    values = (float(sigma_data),) if isinstance(sigma_data, (int, float)) else tuple(map(float, sigma_data))
    if not values or any(not s > 0 for s in values):
        raise ValueError(f"sigma_data must be positive (a number or one per feature), got {sigma_data!r}")
    return values


def given_scalings(c_skip: Tensor, c_out: Tensor, c_in: Tensor, sigma_data: Tensor,
                   given: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The scalings of a denoiser with given (never noised) feature channels.

    A given channel is a condition carried along with the point, not a variable to generate: its
    noise level is 0, so ``c_skip = 1`` and ``c_out = 0`` (the output returns it unchanged) and
    ``c_in = 1 / sigma_data`` (the network sees it at the scale of clean data at every noise
    level). This is the sigma -> 0 limit of the EDM scalings of that channel (Karras et al. 2022,
    Table 1). ``given`` is a ``(D,)`` bool mask or None (nothing given).
    """
    if given is None or not bool(given.any()):
        return c_skip, c_out, c_in
    return (torch.where(given, torch.ones_like(c_skip), c_skip), torch.where(given, torch.zeros_like(c_out), c_out),
            torch.where(given, 1 / sigma_data.to(c_in.dtype), c_in))


def given_mask(given_channels: Sequence[int], n_features: int | None = None) -> Tensor:
    """``(n_features,)`` bool mask of ``given_channels`` (width: the last given channel + 1 when
    ``n_features`` is None)."""
    channels = tuple(int(c) for c in given_channels)
    if any(c < 0 for c in channels) or len(set(channels)) != len(channels):
        raise ValueError(f"given channels must be distinct non-negative indices, got {given_channels!r}")
    width = max(channels, default=-1) + 1 if n_features is None else n_features
    mask = torch.zeros(width, dtype=torch.bool)
    mask[list(channels)] = True
    return mask


def impose_given(x: Tensor, given: Tensor | None) -> Tensor:
    """``x`` with the given features put in: ``given`` is ``(B, M, D)``, NaN where a feature is
    generated and the (normalised) value where it is a condition (e.g. the depth of the layer a
    point is generated in, ``ModelConfig.depth_given``). None: ``x`` unchanged."""
    if given is None:
        return x
    return torch.where(torch.isnan(given), x, given.to(x.dtype))


def given_features(x: Tensor, given: Tensor | None) -> Tensor | None:
    """The ``given`` channels (a ``(D,)`` bool mask) of clean features ``x`` ``(B, M, D)``, NaN in the
    others: what :func:`impose_given` and the samplers take; None when nothing is given."""
    if given is None or not bool(given.any()):
        return None
    return torch.where(given.to(x.device), x, torch.full_like(x, float("nan")))


class EDMPrecond(nn.Module):
    """EDM preconditioning around a raw network F (Karras et al. 2022, Table 1 and eq. 7).

    ``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), context)`` with

    - ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)``
    - ``c_out  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``
    - ``c_in   = 1 / sqrt(sigma^2 + sigma_data^2)``
    - ``c_noise = ln(sigma) / 4``

    Arguments:
        net: the raw network, called as ``net(x, c_noise, context, mask)`` (e.g.
            :class:`~caloadapt.models.pointwise.PointwiseNet` or
            :class:`~caloadapt.models.transformer.PointTransformer`).
        sigma_data: standard deviation of the data, one number or one per feature (0.5 for all
            four point features in CaloClouds II, docs/model.md §2).
        given_channels: feature channels that are conditions, never noised (:func:`given_scalings`):
            ``(2,)`` generates each point in a known layer (its depth given, docs/fidelity.md).
    """

    sigma_data: Tensor
    #: what this module computes (an ONNX export records it): the denoiser D, not a consistency function
    kind = "edm"

    def __init__(self, net: nn.Module, sigma_data: float | Sequence[float] = 0.5,
                 given_channels: Sequence[int] = ()) -> None:
        super().__init__()
        self.net = net
        self.sigma_data_values = as_sigma_data(sigma_data)
        self.given_channels = tuple(int(c) for c in given_channels)
        self.register_buffer("sigma_data", torch.tensor(self.sigma_data_values), persistent=False)
        # not in the state dict: checkpoints keep their keys; the channels come from the model config
        self.register_buffer("given", given_mask(self.given_channels, getattr(net, "point_dim", None)),
                             persistent=False)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(c_skip, c_out, c_in, c_noise)`` for ``sigma`` of shape ``(B,)``.

        The first three have shape ``(B, 1, 1)`` or ``(B, 1, D)`` (per-feature sigma_data), so
        they broadcast against ``(B, M, D)``; ``c_noise`` has shape ``(B,)``.
        """
        s = sigma.reshape(-1, 1, 1)
        sd = self.sigma_data.to(s.dtype)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = sigma.reshape(-1).log() / 4
        return (*given_scalings(c_skip, c_out, c_in, sd, self.given), c_noise)

    def forward(self, x: Tensor, sigma: Tensor | float, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """Denoised estimate ``D(x; sigma)`` of shape ``(B, M, D)``; ``sigma`` is ``(B,)`` or a scalar.

        ``mask`` ``(B, M)`` (True for real points) is handed to the network: a backbone with
        attention between points must not attend to padding; the per-point network ignores it.
        """
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        return c_skip * x + c_out * self.net(c_in * x, c_noise, context, mask)


def random_point_subset(
    x: Tensor, mask: Tensor, n_points: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw up to ``n_points`` real points per shower uniformly without replacement.

    Valid for training a per-point network because points are generated independently given
    the shower condition, so a subset is an unbiased sample of the per-point loss. Showers with
    fewer real points keep all of them, padded (and masked) to ``n_points``.

    Arguments:
        x: points, ``(B, M, D)``.
        mask: ``(B, M)`` bool, True for real points.
        n_points: points kept per shower.
        generator: torch RNG for the draw.

    Returns:
        ``(x_subset, mask_subset)`` of shapes ``(B, k, D)`` and ``(B, k)``, ``k = min(n_points, M)``.
    """
    if n_points <= 0:
        raise ValueError(f"n_points must be positive, got {n_points}")
    batch, m = mask.shape
    if m <= n_points:
        return x, mask
    # random keys in [0, 1) for real points, 2 for padding: sorting puts real points first, shuffled
    keys = torch.rand(batch, m, generator=generator, device=x.device)
    keys = torch.where(mask, keys, torch.full_like(keys, 2.0))
    index = keys.argsort(dim=1)[:, :n_points]
    x_sub = torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
    return x_sub, torch.gather(mask, 1, index)


class EDMLoss:
    """EDM training loss with log-normal noise levels, masked over padded points.

    ``L = E_{sigma, y, n} [ lambda(sigma) || D(y + n; sigma) - y ||^2 ]`` (Karras et al. 2022,
    eq. 2 and 8) with ``ln sigma ~ N(P_mean, P_std^2)`` and
    ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` (Table 1). This equals the
    k-diffusion form ``|| F - (y - c_skip (y + n)) / c_out ||^2`` used by the reference.

    The squared error is averaged over the real points (``mask`` True) and the features of the
    whole batch, so padding never contributes (docs/model.md §2; the reference averaged over
    padded zeros too).

    Arguments:
        P_mean: mean of ln(sigma) (-1.2, docs/model.md §2).
        P_std: standard deviation of ln(sigma) (1.2).
        sigma_data: data standard deviation, a number or one per feature; must equal that of the
            :class:`EDMPrecond` the loss is called with.
        max_points_per_shower: if set, each call trains on a random subset of at most this many
            real points per shower (see :func:`random_point_subset`).
    """

    def __init__(
        self,
        P_mean: float = -1.2,  # noqa: N803 (paper symbol)
        P_std: float = 1.2,  # noqa: N803
        sigma_data: float | Sequence[float] = 0.5,
        max_points_per_shower: int | None = None,
    ) -> None:
        if not P_std > 0:
            raise ValueError(f"P_std must be positive, got {P_std}")
        if max_points_per_shower is not None and max_points_per_shower <= 0:
            raise ValueError(f"max_points_per_shower must be positive or None, got {max_points_per_shower}")
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data_values = as_sigma_data(sigma_data)
        self.max_points_per_shower = max_points_per_shower

    def __call__(
        self,
        denoiser: EDMPrecond | nn.Module,
        y: Tensor,
        context: Tensor,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Scalar loss for a batch.

        Arguments:
            denoiser: the preconditioned model D (an :class:`EDMPrecond`, possibly wrapped in
                DistributedDataParallel).
            y: clean points ``(B, M, D)``; padded entries may hold any finite or non-finite value.
            context: per-shower conditioning ``(B, C)``.
            mask: ``(B, M)`` bool, True for real points; None means all points are real.
            generator: torch RNG for the subset, sigma and noise draws (reproducible losses).
        """
        # a DistributedDataParallel wrapper hides the attribute; look through it
        inner = getattr(denoiser, "module", denoiser)
        expected = getattr(inner, "sigma_data_values", self.sigma_data_values)
        if expected != self.sigma_data_values:
            raise ValueError(
                f"EDMLoss sigma_data {self.sigma_data_values} differs from the preconditioning's {expected}"
            )
        if mask is None:
            mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        if self.max_points_per_shower is not None:
            y, mask = random_point_subset(y, mask, self.max_points_per_shower, generator)
        y = torch.where(mask[..., None], y, y.new_zeros(()))

        rnd_normal = torch.randn(y.shape[0], generator=generator, device=y.device, dtype=y.dtype)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()  # ln sigma ~ N(P_mean, P_std^2)
        s = sigma.reshape(-1, 1, 1)
        sd = torch.tensor(self.sigma_data_values, dtype=y.dtype, device=y.device)
        weight = (s**2 + sd**2) / (s * sd) ** 2  # lambda(sigma), Table 1
        n = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype) * s
        # given channels (conditions, EDMPrecond.given_channels) are never noised and never scored
        generated = _generated_channels(inner, y.shape[-1], y.device)
        n = n * generated
        D_yn = denoiser(y + n, sigma, context, mask)
        squared_error = torch.where(mask[..., None], weight * generated * (D_yn - y) ** 2, y.new_zeros(()))
        n_real = mask.sum() * generated.sum()
        return squared_error.sum() / n_real.clamp_min(1)


def _generated_channels(denoiser: nn.Module, n_features: int, device: torch.device) -> Tensor:
    """``(D,)`` float: 1 for the features the denoiser generates, 0 for its given channels."""
    given = getattr(denoiser, "given", None)
    if given is None or not bool(given.any()):
        return torch.ones(n_features, device=device)
    if given.numel() != n_features:  # a mask of another width would silently noise a condition
        raise ValueError(f"the denoiser's given-channel mask has {given.numel()} entries for {n_features} features")
    return (~given).to(device=device, dtype=torch.float32)


def karras_sigmas(
    n_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Noise levels of the EDM time discretisation (Karras et al. 2022, eq. 5), then 0.

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for
    ``i = 0 .. n-1``, followed by ``sigma_n = 0``. Decreasing from sigma_max to sigma_min.

    Returns:
        float64 tensor of shape ``(n_steps + 1,)``.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n_steps, dtype=torch.float64, device=device)
    if n_steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64, device=device)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def initial_noise(
    context: Tensor,
    n_points: int | None,
    point_dim: int,
    mask: Tensor | None,
    generator: torch.Generator | None,
    noise: Tensor | None,
) -> Tensor:
    """Standard-normal latent ``(B, M, D)``: ``noise`` if given, else drawn with ``generator``."""
    dtype = context.dtype if context.is_floating_point() else torch.float32
    if noise is not None:
        if noise.ndim != 3 or noise.shape[0] != context.shape[0]:
            raise ValueError(f"noise must have shape ({context.shape[0]}, M, D), got {tuple(noise.shape)}")
        return noise.to(device=context.device, dtype=dtype)
    if n_points is None:
        if mask is None:
            raise ValueError("give n_points, mask or noise to set the number of points")
        n_points = mask.shape[1]
    return torch.randn(
        (context.shape[0], n_points, point_dim), generator=generator, device=context.device, dtype=dtype
    )


def zero_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padded points."""
    if mask is None:
        return x
    return torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    context: Tensor,
    n_points: int | None = None,
    *,
    mask: Tensor | None = None,
    n_steps: int = DEFAULT_STEPS,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    point_dim: int = 4,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    given: Tensor | None = None,
) -> Tensor:
    """Deterministic Heun sampler (Karras et al. 2022, Algorithm 1; Algorithm 2 with S_churn = 0).

    Integrates the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` from
    ``sigma_max`` to 0 on :func:`karras_sigmas`. The last step (to sigma = 0) is an Euler step,
    so the number of network evaluations is ``2 n_steps - 1`` (25 for the default 13 steps,
    CaloClouds II; docs/model.md §3). Points are independent, so padded points are simply zeroed
    in the output. Runs under ``torch.no_grad``.

    Arguments:
        denoiser: ``D(x, sigma, context, mask)``, e.g. an :class:`EDMPrecond`; it is handed the
            mask, so a backbone with attention between points never attends to padding.
        context: per-shower conditioning ``(B, C)``.
        n_points: points per shower M (or take it from ``mask`` or ``noise``).
        mask: ``(B, M)`` bool, True for the points to generate; the others are returned as 0.
        n_steps: number of noise levels before the final 0.
        sigma_min, sigma_max, rho: Karras schedule (0.002, 80, 7).
        point_dim: features per point D.
        generator: torch RNG for the initial noise.
        noise: standard-normal initial noise ``(B, M, D)``; overrides ``generator``.
        given: ``(B, M, D)`` values of the given channels of the denoiser, NaN elsewhere
            (:func:`impose_given`); the ODE keeps them, since the denoiser returns them unchanged.

    Returns:
        Samples of shape ``(B, M, D)``.
    """
    sigmas = karras_sigmas(n_steps, sigma_min, sigma_max, rho).tolist()
    x = impose_given(initial_noise(context, n_points, point_dim, mask, generator, noise) * sigmas[0], given)
    batch = x.shape[0]
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        # Euler step
        d_cur = (x - denoiser(x, x.new_full((batch,), t_cur), context, mask)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        # second-order (trapezoidal) correction, skipped on the last step to sigma = 0
        if t_next > 0:
            d_next = (x_next - denoiser(x_next, x.new_full((batch,), t_next), context, mask)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return zero_padding(x, mask)


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    context: Tensor,
    n_points: int | None = None,
    *,
    mask: Tensor | None = None,
    n_steps: int = DEFAULT_STEPS,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    point_dim: int = 4,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    given: Tensor | None = None,
) -> Tensor:
    """Deterministic Euler sampler of the probability-flow ODE on :func:`karras_sigmas`.

    Karras et al. 2022, Algorithm 1 without the second-order correction: ``n_steps`` network
    evaluations. Runs under ``torch.no_grad``. Arguments as in :func:`sample_heun`.
    """
    sigmas = karras_sigmas(n_steps, sigma_min, sigma_max, rho).tolist()
    x = impose_given(initial_noise(context, n_points, point_dim, mask, generator, noise) * sigmas[0], given)
    batch = x.shape[0]
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = (x - denoiser(x, x.new_full((batch,), t_cur), context, mask)) / t_cur
        x = x + (t_next - t_cur) * d_cur
    return zero_padding(x, mask)

