"""Tests of caloadapt.models.transformer: shapes, symmetries, padding, adaLN-Zero, groups, peft."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from caloadapt.models.transformer import ADAPTER_TARGETS, PARAMETER_GROUPS, PointTransformer

SMALL = {"dim": 16, "depth": 2, "heads": 2, "n_inducing": 4, "mlp_ratio": 2, "time_dim": 8}


def n_params(params) -> int:
    return sum(p.numel() for p in params)


def trained_like(net: PointTransformer, seed: int = 0, std: float = 0.3) -> PointTransformer:
    """Overwrite every parameter with random values: at initialisation the blocks are the identity
    and the head is zero, which would make the symmetry tests trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return net


def small_net(context_dim: int = 2, seed: int = 0) -> PointTransformer:
    torch.manual_seed(seed)
    return trained_like(PointTransformer(context_dim=context_dim, **SMALL), seed).double()


def inputs(batch: int = 3, points: int = 7, context_dim: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, points, 4, generator=gen, dtype=torch.float64)
    c_noise = torch.randn(batch, generator=gen, dtype=torch.float64)
    context = torch.randn(batch, context_dim, generator=gen, dtype=torch.float64)
    return x, c_noise, context


# ----------------------------------------------------------------------------------------------
# forward: shapes and symmetries


def test_output_shape_and_scalar_c_noise():
    net = small_net()
    x, c_noise, context = inputs()
    assert net(x, c_noise, context).shape == x.shape
    assert net(x, torch.tensor(0.3, dtype=torch.float64), context).shape == x.shape


def test_permutation_equivariance():
    net = small_net()
    x, c_noise, context = inputs(points=9)
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    mask[0, 5:] = False
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    out = net(x, c_noise, context, mask)
    out_perm = net(x[:, perm], c_noise, context, mask[:, perm])
    torch.testing.assert_close(out_perm, out[:, perm], atol=1e-5, rtol=0)


def test_padding_does_not_change_real_points():
    net = small_net()
    x, c_noise, context = inputs(points=6)
    out = net(x, c_noise, context)
    garbage = torch.randn(3, 5, 4, dtype=torch.float64) * 1e3
    garbage[0, 0, 0] = float("nan")  # even NaN in the padding must not leak into real points
    x_pad = torch.cat([x, garbage], dim=1)
    mask = torch.cat([torch.ones(3, 6, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    # shuffle the padding in among the real points
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(5))
    out_pad = net(x_pad[:, perm], c_noise, context, mask[:, perm])
    inverse = perm.argsort()
    torch.testing.assert_close(out_pad[:, inverse][:, :6], out, atol=1e-5, rtol=0)
    assert (out_pad[~mask[:, perm]] == 0).all(), "rows of padded points are zero"


def test_all_padding_shower_is_finite():
    net = small_net()
    x, c_noise, context = inputs(points=5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    x[1] = float("nan")
    out = net(x, c_noise, context, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], net(x[:1], c_noise[:1], context[:1])[0], atol=1e-5, rtol=0)


def test_wider_context_for_geometry_descriptor():
    net = small_net(context_dim=2 + 11)
    x, c_noise, context = inputs(context_dim=13)
    out = net(x, c_noise, context)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert net.blocks[0].modulation.in_features == SMALL["time_dim"] + 13


def test_mask_none_equals_all_real():
    net = small_net()
    x, c_noise, context = inputs()
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(net(x, c_noise, context), net(x, c_noise, context, mask), atol=1e-10, rtol=0)


def test_points_interact():
    """Unlike PointWise-Net, moving one point changes the output at the others."""
    net = small_net()
    x, c_noise, context = inputs()
    moved = x.clone()
    moved[:, 0] += 1.0
    diff = (net(moved, c_noise, context) - net(x, c_noise, context))[:, 1:]
    assert diff.abs().max() > 1e-6


def test_shape_validation():
    net = small_net()
    x, c_noise, context = inputs()
    with pytest.raises(ValueError, match="x must have shape"):
        net(x[..., :3], c_noise, context)
    with pytest.raises(ValueError, match="context must have shape"):
        net(x, c_noise, context[:, :1])
    with pytest.raises(ValueError, match="mask must have shape"):
        net(x, c_noise, context, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="heads must divide dim"):
        PointTransformer(dim=10, heads=4)


# ----------------------------------------------------------------------------------------------
# adaLN-Zero initialisation


def test_blocks_are_identity_at_init():
    torch.manual_seed(0)
    net = PointTransformer(**SMALL).double()
    x, c_noise, context = inputs()
    assert (net(x, c_noise, context) == 0).all(), "zero head: F = 0, so D(x) = c_skip x at first"

    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for b in net.blocks]
    nn.init.normal_(net.head.weight)
    out = net(x, c_noise, context)
    for h in hooks:
        h.remove()
    assert len(seen) == len(net.blocks)
    for h_in, h_out in seen:
        assert torch.equal(h_in, h_out)
    # the output depends on the input only through embed, the final (unmodulated) norm and head
    torch.testing.assert_close(out, net.head(net.final_norm(net.embed(x))), atol=1e-12, rtol=0)
    # ... so scrambling every attention and MLP weight changes nothing
    with torch.no_grad():
        for _, p in net.parameter_groups()["attention"] + net.parameter_groups()["mlp"]:
            p.normal_()
    torch.testing.assert_close(net(x, c_noise, context), out, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------
# adaptation interface


def test_parameter_groups_partition_every_parameter_once():
    net = PointTransformer(**SMALL)
    groups = net.parameter_groups()
    assert tuple(groups) == PARAMETER_GROUPS == PointTransformer.groups
    grouped = [(name, p) for members in groups.values() for name, p in members]
    ids = [id(p) for _, p in grouped]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    named = dict(net.named_parameters())
    assert {id(p) for p in named.values()} == set(ids)
    assert {name for name, _ in grouped} == set(named)
    for name, p in grouped:
        assert named[name] is p
    assert all(groups.values()), "no empty group"


def test_default_group_counts_add_up():
    net = PointTransformer()
    counts = {k: n_params(p for _, p in v) for k, v in net.parameter_groups().items()}
    assert sum(counts.values()) == n_params(net.parameters()) == 320_900
    assert counts == {
        "embedding": 580,
        "attention": 137_216,
        "mlp": 66_304,
        "norm": 1_152,
        "conditioning": 111_488,
        "time_embedding": 4_160,
    }


def test_bias_vectors_and_conditioning_maps():
    net = PointTransformer(**SMALL)
    named = dict(net.named_parameters())
    biases = net.bias_vectors()
    assert {name for name, _ in biases} == {n for n, p in named.items() if n.endswith(".bias")}
    assert all(named[name] is p and p.ndim == 1 for name, p in biases)
    assert len({id(p) for _, p in biases}) == len(biases)

    maps = net.conditioning_maps()
    modulations = {n for n, m in net.named_modules() if n.endswith("modulation")}
    assert {name for name, _ in maps} == {f"{n}.weight" for n in modulations}
    assert all(named[name] is p and p.ndim == 2 for name, p in maps)


def test_top_layers():
    net = PointTransformer(**SMALL)
    assert net.n_layers == SMALL["depth"]
    top = dict(net.top_layers(1))
    assert not any(name.startswith("blocks.0.") for name in top)
    assert {n for n, _ in net.blocks[1].named_parameters()} == {
        n.removeprefix("blocks.1.") for n in top if n.startswith("blocks.1.")
    }
    for name in ("head.weight", "final_norm.weight", "final_modulation.weight", "time_embedding.linear.weight"):
        assert name in top
    assert "embed.weight" not in top
    named = dict(net.named_parameters())
    assert all(named[n] is p for n, p in top.items())
    assert len(net.top_layers(2)) > len(top)
    for bad in (0, SMALL["depth"] + 1):
        with pytest.raises(ValueError, match="k must be in"):
            net.top_layers(bad)


@pytest.mark.parametrize("layers", [None, (0,), (1,), (0, 1)])
@pytest.mark.parametrize("target", ADAPTER_TARGETS)
def test_adapter_targets_are_linear_modules(target, layers):
    net = PointTransformer(**SMALL)
    modules = dict(net.named_modules())
    names = net.adapter_targets((target,), layers)
    per_block = {"attention": 8, "mlp": 2, "modulation": 1, "linear": 10}[target]
    n_blocks = SMALL["depth"] if layers is None else len(layers)
    assert len(names) == len(set(names)) == per_block * n_blocks
    for name in names:
        assert isinstance(modules[name], nn.Linear)
        assert layers is None or int(name.split(".")[1]) in layers


def test_adapter_targets_linear_is_attention_plus_mlp_and_errors():
    net = PointTransformer(**SMALL)
    assert set(net.adapter_targets(("linear",), None)) == set(net.adapter_targets(("attention", "mlp"), None))
    assert "blocks.0.modulation" not in net.adapter_targets(("linear",), None)
    with pytest.raises(ValueError, match="valid"):
        net.adapter_targets(("gate",), None)
    with pytest.raises(ValueError, match="valid: 0..1"):
        net.adapter_targets(("mlp",), (2,))


# ----------------------------------------------------------------------------------------------
# peft LoRA


def test_lora_injection_identity_at_init_and_base_frozen():
    peft = pytest.importorskip("peft")
    net = small_net().float()
    x, c_noise, context = (t.float() for t in inputs())
    reference = net(x, c_noise, context).detach()
    base = list(net.parameters())
    before = [p.detach().clone() for p in base]

    names = net.adapter_targets(("linear",), None)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=names)
    net = peft.inject_adapter_in_model(config, net)
    adapters = [(n, p) for n, p in net.named_parameters() if "lora_" in n]
    assert len(adapters) == 2 * len(names)  # A and B per wrapped Linear
    torch.testing.assert_close(net(x, c_noise, context), reference, atol=1e-6, rtol=0)

    for p in net.parameters():
        p.requires_grad_(False)
    for _, p in adapters:
        p.requires_grad_(True)
    lora_before = [p.detach().clone() for _, p in adapters]
    optimizer = torch.optim.Adam([p for _, p in adapters], lr=1e-2)
    loss = net(x, c_noise, context).square().mean()
    loss.backward()
    optimizer.step()

    assert all(torch.equal(p, q) for p, q in zip(base, before)), "base weights are bit-identical"
    assert any(not torch.equal(p, q) for (_, p), q in zip(adapters, lora_before)), "the adapters moved"


# ----------------------------------------------------------------------------------------------
# cost and EDM


def test_twenty_thousand_points_forward():
    torch.manual_seed(0)
    net = trained_like(PointTransformer(), std=0.05)
    x = torch.randn(1, 20_000, 4)
    mask = torch.ones(1, 20_000, dtype=torch.bool)
    mask[0, 15_000:] = False
    with torch.no_grad():
        out = net(x, torch.zeros(1), torch.zeros(1, 2), mask)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_edm_preconditioning_wraps_the_transformer():
    from caloadapt.models.edm import EDMPrecond

    denoiser = EDMPrecond(small_net().float())
    x, _, context = (t.float() for t in inputs())
    out = denoiser(x, torch.full((3,), 0.7), context)
    assert out.shape == x.shape and torch.isfinite(out).all()
