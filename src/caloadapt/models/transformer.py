"""Point transformer: a drop-in alternative to :class:`~caloadapt.models.pointwise.PointwiseNet`.

The raw network F of the EDM denoiser (wrapped by :class:`~caloadapt.models.edm.EDMPrecond` as
``F(c_in x; c_noise, context, mask)``). The points of a shower are tokens; unlike PointWise-Net
they interact, by attention through a small set of learnt *inducing* tokens, so the cost is
``O(N m)`` for N points and m inducing tokens and a 20,000-point shower stays cheap on a CPU.

Architecture:

- context ``ctx = [TimeEmbedding(c_noise), condition]``, dimension ``time_dim + context_dim``,
  exactly as PointWise-Net (the condition may carry a geometry descriptor: nothing assumes 2);
- ``embed``: Linear(point_dim, dim) per point;
- ``depth`` :class:`TransformerBlock` s, each (pre-norm, adaLN-Zero)::

      h <- h + g1 * ISAB(LN1(h) (1 + s1) + b1)
      h <- h + g2 * MLP(LN2(h) (1 + s2) + b2)

  with ``(b1, s1, g1, b2, s2, g2) = modulation(ctx)``, zero at initialisation, so every block
  starts as the identity;
- a final adaLN ``LN(h) (1 + s) + b`` with ``(b, s) = final_modulation(ctx)`` and
  ``head``: Linear(dim, point_dim), zero at initialisation (F = 0, so D(x) = c_skip x at first).

ISAB (Lee et al. 2019, Set Transformer, §3.2): m learnt tokens I attend to all (real) points,
``P = I + Attn(I, h, h)`` (*pool*, padding masked out of the keys), then every point attends to
the m pooled tokens, ``Attn(h, P, P)`` (*broadcast*). Padded points are never keys of the pool,
so they cannot influence real points.

Parameter groups (fine-tuning strategies select parameters by *group*, never by a substring of
their names; :meth:`PointTransformer.parameter_groups`):

==================  ==============================================================  ===============
group               tensors                                                         count (default)
==================  ==============================================================  ===============
``embedding``       ``embed`` and ``head`` (weights and biases)                     580
``attention``       q, k, v, out of the pool and broadcast attentions; inducing I   137,216
``mlp``             ``fc1``, ``fc2`` of every block                                 66,304
``norm``            every LayerNorm weight and bias (elementwise affine)            1,152
``conditioning``    every ``modulation`` Linear, blocks and final (W and b)         111,488
``time_embedding``  Linear(64, 64) of the time embedding (its frequencies: buffer)  4,160
==================  ==============================================================  ===============

Total 320,900 parameters with the defaults and ``context_dim=2`` (PointWise-Net: 504,920).
BitFit (:meth:`PointTransformer.bias_vectors`) selects 5,188 of them (1.6 %); the context maps
(:meth:`PointTransformer.conditioning_maps`) another 109,824.

References:
    | Lee et al., Set Transformer, ICML 2019, https://arxiv.org/abs/1810.00825 (ISAB);
    | Peebles & Xie, Scalable Diffusion Models with Transformers (DiT), ICCV 2023,
      https://arxiv.org/abs/2212.09748 (adaLN-Zero);
    | Buhmann et al., CaloClouds II, https://arxiv.org/abs/2309.05704 (context, time embedding).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .pointwise import TimeEmbedding

__all__ = [
    "ADAPTER_TARGETS",
    "PARAMETER_GROUPS",
    "Attention",
    "FeedForward",
    "InducedSetAttention",
    "PointTransformer",
    "TransformerBlock",
]

#: names of the parameter groups of :class:`PointTransformer`, in a fixed order
PARAMETER_GROUPS: tuple[str, ...] = ("embedding", "attention", "mlp", "norm", "conditioning", "time_embedding")

#: target names accepted by :meth:`PointTransformer.adapter_targets`
ADAPTER_TARGETS: tuple[str, ...] = ("attention", "mlp", "modulation", "linear")

Named = list[tuple[str, nn.Parameter]]


def _named(prefix: str, module: nn.Module) -> Named:
    """All parameters of ``module`` with names qualified by ``prefix``."""
    return [(f"{prefix}.{name}", p) for name, p in module.named_parameters()]


def modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive layer-norm modulation ``h (1 + scale) + shift`` (DiT); ``scale = 0`` is the identity."""
    return h * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention ``out(softmax(q k^T / sqrt(d_head)) v)`` with explicit q, k, v, out maps.

    Separate :class:`~torch.nn.Linear` modules (not ``nn.MultiheadAttention``'s fused in-projection)
    so that LoRA (peft) can wrap each map. The product runs in
    :func:`torch.nn.functional.scaled_dot_product_attention`.

    Arguments:
        dim: token width (queries, keys and values alike).
        heads: number of heads; must divide ``dim``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads must divide dim, got dim={dim}, heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, t: Tensor) -> Tensor:
        # (B, L, dim) -> (B, heads, L, d_head)
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, query: Tensor, key_value: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Attend from ``query`` ``(B, Lq, dim)`` to ``key_value`` ``(B, Lk, dim)``.

        ``key_mask`` ``(B, Lk)`` bool, True for keys that may be attended to (None: all); every
        row must have at least one True entry. Returns ``(B, Lq, dim)``.
        """
        q, k, v = self._split(self.q(query)), self._split(self.k(key_value)), self._split(self.v(key_value))
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(h.transpose(1, 2).flatten(-2))


class InducedSetAttention(nn.Module):
    """Induced set attention (ISAB, Lee et al. 2019, https://arxiv.org/abs/1810.00825, §3.2).

    ``P = I + pool(I, h, h)`` (m learnt inducing tokens I summarise the set, padded points masked
    out of the keys), then ``broadcast(h, P, P)``: every point reads the summary. Cost ``O(N m)``
    instead of ``O(N^2)``.

    Arguments:
        dim: token width.
        heads: attention heads.
        n_inducing: number m of inducing tokens.

    Attributes:
        inducing: the inducing tokens I, shape ``(n_inducing, dim)``.
        pool: :class:`Attention` of I over the points.
        broadcast: :class:`Attention` of the points over the pooled tokens.
    """

    def __init__(self, dim: int, heads: int, n_inducing: int) -> None:
        super().__init__()
        if n_inducing <= 0:
            raise ValueError(f"n_inducing must be positive, got {n_inducing}")
        # unit scale, like the layer-normalised points they are compared with, so the m queries
        # already differ at initialisation
        self.inducing = nn.Parameter(torch.randn(n_inducing, dim))
        self.pool = Attention(dim, heads)
        self.broadcast = Attention(dim, heads)

    def forward(self, h: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Map points ``h`` ``(B, N, dim)`` to ``(B, N, dim)``; ``key_mask`` ``(B, N)``, True = real."""
        inducing = self.inducing.expand(h.shape[0], -1, -1)
        pooled = inducing + self.pool(inducing, h, key_mask)
        return self.broadcast(h, pooled)


class FeedForward(nn.Module):
    """Per-point MLP ``fc2(GELU(fc1(h)))`` with hidden width ``mlp_ratio * dim``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(h)))


class TransformerBlock(nn.Module):
    """Pre-norm block with adaLN-Zero conditioning (DiT, Peebles & Xie 2023, §3.2).

    ``h <- h + g1 ISAB(modulate(LN1 h, b1, s1))``; ``h <- h + g2 MLP(modulate(LN2 h, b2, s2))``
    with ``(b1, s1, g1, b2, s2, g2) = modulation(ctx)``. The modulation is zero-initialised, so
    the gates are zero and the block is the identity at initialisation.

    The LayerNorms keep their elementwise affine (unlike DiT) so that a ``norm`` parameter group
    exists for the adaptation methods; at initialisation it is the identity affine anyway.

    Arguments:
        dim: token width.
        context_dim: width of the per-shower context ``ctx``.
        heads: attention heads.
        n_inducing: inducing tokens of the ISAB.
        mlp_ratio: hidden width of the MLP in units of ``dim``.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, n_inducing: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = InducedSetAttention(dim, heads, n_inducing)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio * dim)
        self.modulation = nn.Linear(context_dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: Tensor, ctx: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Update points ``h`` ``(B, N, dim)`` given ``ctx`` ``(B, 1, context_dim)``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(ctx).chunk(6, dim=-1)
        h = h + gate1 * self.attn(modulate(self.norm1(h), shift1, scale1), key_mask)
        return h + gate2 * self.mlp(modulate(self.norm2(h), shift2, scale2))


class PointTransformer(nn.Module):
    """Point transformer with induced set attention and adaLN-Zero: the raw network F of EDM.

    Same call as :class:`~caloadapt.models.pointwise.PointwiseNet` plus a padding mask, and the
    same adaptation interface (:meth:`parameter_groups`, :meth:`bias_vectors`,
    :meth:`conditioning_maps`, :meth:`top_layers`, :meth:`adapter_targets`), so every fine-tuning
    method works on either backbone. See the module docstring for the architecture and groups.

    References:
        | Lee et al., Set Transformer, https://arxiv.org/abs/1810.00825;
        | Peebles & Xie, DiT, https://arxiv.org/abs/2212.09748.

    Arguments:
        point_dim: features per point (4: x, depth, y, energy in normalised units).
        context_dim: width of the per-shower conditioning (2, or more with a geometry descriptor).
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads (must divide ``dim``).
        n_inducing: inducing tokens per ISAB.
        mlp_ratio: hidden width of the MLPs in units of ``dim``.
        time_dim: width of the noise-level embedding.
        fourier_std: standard deviation of the fixed Fourier frequencies of the time embedding.

    Attributes:
        embed: Linear(point_dim, dim).
        blocks: the :class:`TransformerBlock` s from input to output; "top-k" trains ``blocks[-k:]``.
        final_norm, final_modulation: the final adaLN (modulation zero-initialised).
        head: Linear(dim, point_dim), zero-initialised.
        time_embedding: the :class:`~caloadapt.models.pointwise.TimeEmbedding`.
    """

    #: names of the parameter groups, see :meth:`parameter_groups`
    groups = PARAMETER_GROUPS
    #: target names accepted by :meth:`adapter_targets`
    adapter_target_names = ADAPTER_TARGETS

    def __init__(
        self,
        point_dim: int = 4,
        context_dim: int = 2,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        n_inducing: int = 16,
        mlp_ratio: int = 2,
        time_dim: int = 64,
        fourier_std: float = 16.0,
    ) -> None:
        super().__init__()
        if min(point_dim, dim, depth, heads, n_inducing, mlp_ratio, time_dim) <= 0 or context_dim < 0:
            raise ValueError(
                f"point_dim, dim, depth, heads, n_inducing, mlp_ratio, time_dim must be positive and context_dim "
                f"non-negative, got point_dim={point_dim}, context_dim={context_dim}, dim={dim}, depth={depth}, "
                f"heads={heads}, n_inducing={n_inducing}, mlp_ratio={mlp_ratio}, time_dim={time_dim}"
            )
        self.point_dim = point_dim
        self.context_dim = context_dim
        self.dim = dim
        self.depth = depth
        self.time_dim = time_dim

        self.time_embedding = TimeEmbedding(time_dim, fourier_std)
        ctx_dim = time_dim + context_dim
        self.embed = nn.Linear(point_dim, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, ctx_dim, heads, n_inducing, mlp_ratio) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim)
        self.final_modulation = nn.Linear(ctx_dim, 2 * dim)
        self.head = nn.Linear(dim, point_dim)
        for layer in (self.final_modulation, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks (``depth``)."""
        return self.depth

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """Evaluate F on every point of every shower.

        Arguments:
            x: points, shape ``(B, M, point_dim)`` (already scaled by c_in).
            c_noise: noise-level input ``ln(sigma) / 4``, shape ``(B,)`` or a scalar.
            context: per-shower conditioning, shape ``(B, context_dim)``.
            mask: ``(B, M)`` bool, True for real points; None means all points are real.

        Returns:
            Tensor of shape ``(B, M, point_dim)``; rows of padded points are zero.
        """
        if x.ndim != 3 or x.shape[-1] != self.point_dim:
            raise ValueError(f"x must have shape (B, M, {self.point_dim}), got {tuple(x.shape)}")
        if context.shape != (x.shape[0], self.context_dim):
            raise ValueError(
                f"context must have shape ({x.shape[0]}, {self.context_dim}), got {tuple(context.shape)}"
            )
        if mask is not None and mask.shape != x.shape[:2]:
            raise ValueError(f"mask must have shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        c_noise = torch.as_tensor(c_noise, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        ctx = torch.cat([self.time_embedding(c_noise), context.to(x.dtype)], dim=-1)[:, None, :]

        key_mask = None
        if mask is not None:
            mask = mask.to(device=x.device, dtype=torch.bool)
            # padding may hold anything (even NaN): zero it so that 0-weight keys stay finite
            x = x.masked_fill(~mask[..., None], 0.0)
            # a shower without real points would have no key at all (a softmax over nothing is NaN
            # on some backends): let it attend to its zeroed padding; its output rows are zeroed below
            key_mask = mask | ~mask.any(dim=1, keepdim=True)

        h = self.embed(x)
        for block in self.blocks:
            h = block(h, ctx, key_mask)
        shift, scale = self.final_modulation(ctx).chunk(2, dim=-1)
        out = self.head(modulate(self.final_norm(h), shift, scale))
        return out if mask is None else out.masked_fill(~mask[..., None], 0.0)

    # ----------------------------------------------------------------------------------------
    # adaptation interface

    def parameter_groups(self) -> dict[str, Named]:
        """Partition the parameters into the named groups of :data:`PARAMETER_GROUPS`.

        Every parameter appears in exactly one group; the partition is built from the module
        structure, not from parameter names. See the module docstring for the table of groups.

        Returns:
            ``{group: [(qualified parameter name, parameter), ...]}`` with the keys in the order
            of :data:`PARAMETER_GROUPS`, blocks from input to output.
        """
        groups: dict[str, Named] = {name: [] for name in PARAMETER_GROUPS}
        groups["embedding"] += _named("embed", self.embed) + _named("head", self.head)
        for i, block in enumerate(self.blocks):
            prefix = f"blocks.{i}"
            groups["attention"].append((f"{prefix}.attn.inducing", block.attn.inducing))
            for which in ("pool", "broadcast"):
                groups["attention"] += _named(f"{prefix}.attn.{which}", getattr(block.attn, which))
            groups["mlp"] += _named(f"{prefix}.mlp", block.mlp)
            groups["norm"] += _named(f"{prefix}.norm1", block.norm1) + _named(f"{prefix}.norm2", block.norm2)
            groups["conditioning"] += _named(f"{prefix}.modulation", block.modulation)
        groups["norm"] += _named("final_norm", self.final_norm)
        groups["conditioning"] += _named("final_modulation", self.final_modulation)
        groups["time_embedding"] += _named("time_embedding", self.time_embedding)
        return groups

    def bias_vectors(self) -> Named:
        """The additive bias vectors (BitFit, Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199).

        The bias of every :class:`~torch.nn.Linear` (q, k, v, out, fc1, fc2, modulation, embed,
        head, time embedding) and every LayerNorm, in module order.
        """
        return [
            (f"{name}.bias", module.bias)
            for name, module in self.named_modules()
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None
        ]

    def conditioning_maps(self) -> Named:
        """The weight matrices from the context to the features: every ``modulation`` weight.

        Together with :meth:`bias_vectors` the "bitfit-context" selection: the biases plus the
        maps through which the (new-geometry) conditioning acts.
        """
        out: Named = [(f"blocks.{i}.modulation.weight", b.modulation.weight) for i, b in enumerate(self.blocks)]
        out.append(("final_modulation.weight", self.final_modulation.weight))
        return out

    def top_layers(self, k: int) -> Named:
        """All parameters of the last ``k`` blocks, the final adaLN and head, and the time embedding.

        Raises:
            ValueError: if ``k`` is not in ``1 .. depth``.
        """
        if not 1 <= k <= self.depth:
            raise ValueError(f"k must be in 1..{self.depth} (the number of blocks), got {k}")
        out: Named = []
        for i in range(self.depth - k, self.depth):
            out += _named(f"blocks.{i}", self.blocks[i])
        for name in ("final_norm", "final_modulation", "head", "time_embedding"):
            out += _named(name, getattr(self, name))
        return out

    def adapter_targets(self, targets: Iterable[str], layers: Iterable[int] | None = None) -> list[str]:
        """Qualified names of the :class:`~torch.nn.Linear` modules that peft (LoRA, ...) should wrap.

        Arguments:
            targets: any of :data:`ADAPTER_TARGETS`: ``"attention"`` (q, k, v, out of the pool and
                broadcast attentions), ``"mlp"`` (fc1, fc2), ``"modulation"`` (the block's adaLN
                map) and ``"linear"`` = attention + mlp (the main weight maps; the project default).
            layers: indices of the blocks to adapt (0 is the first), or None for all blocks.

        Returns:
            Module names in block order, each at most once, suitable for
            ``LoraConfig(target_modules=...)``.

        Raises:
            ValueError: for an unknown target, an empty selection or a block index out of range.
        """
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        unknown = [t for t in targets if t not in ADAPTER_TARGETS]
        if unknown or not targets:
            raise ValueError(f"unknown adapter targets {unknown or targets!r}; valid: {ADAPTER_TARGETS}")
        chosen = range(self.depth) if layers is None else tuple(layers)
        bad = [i for i in chosen if not (isinstance(i, int) and 0 <= i < self.depth)]
        if bad or not chosen:
            raise ValueError(f"block indices {bad or list(chosen)} invalid; valid: 0..{self.depth - 1}")

        wanted = set(targets)
        if "linear" in wanted:
            wanted |= {"attention", "mlp"}
        names: list[str] = []
        for i in sorted(set(chosen)):
            prefix = f"blocks.{i}"
            if "attention" in wanted:
                names += [f"{prefix}.attn.{a}.{m}" for a in ("pool", "broadcast") for m in ("q", "k", "v", "out")]
            if "mlp" in wanted:
                names += [f"{prefix}.mlp.fc1", f"{prefix}.mlp.fc2"]
            if "modulation" in wanted:
                names.append(f"{prefix}.modulation")
        return names
