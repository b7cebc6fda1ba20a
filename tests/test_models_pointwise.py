"""Tests of caloadapt.models.pointwise: parameter count, parameter groups, shapes, independence."""

from __future__ import annotations

import pytest
import torch

from caloadapt.models import PARAMETER_GROUPS, ConcatSquashLinear, PointwiseNet, TimeEmbedding


def n_params(params) -> int:
    return sum(p.numel() for p in params)


def test_default_parameter_count_matches_reference():
    net = PointwiseNet(point_dim=4, context_dim=2)
    assert n_params(net.parameters()) == 504_920  # docs/model.md §1


def test_parameter_groups_partition_every_parameter_once():
    net = PointwiseNet()
    groups = net.parameter_groups()
    assert tuple(groups) == PARAMETER_GROUPS

    grouped = [(name, p) for members in groups.values() for name, p in members]
    ids = [id(p) for _, p in grouped]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    named = dict(net.named_parameters())
    assert {id(p) for p in named.values()} == set(ids)
    # the reported names are the real qualified names
    for name, p in grouped:
        assert named[name] is p


def test_parameter_group_counts_match_method_table():
    groups = PointwiseNet().parameter_groups()
    counts = {k: n_params(p for _, p in v) for k, v in groups.items()}
    assert counts == {
        "weight": 328_704,
        "bias": 1_284,
        "context_bias": 84_744,
        "gate": 84_744 + 1_284,  # G and the gate bias g
        "time_embedding": 4_160,
    }


def test_bias_vectors_are_the_true_biases():
    net = PointwiseNet()
    biases = net.bias_vectors()
    assert n_params(p for _, p in biases) == 2_632  # 0.52 % of 504,920, docs/model.md §6
    assert all(p.ndim == 1 for _, p in biases)
    named = dict(net.named_parameters())
    assert all(named[name] is p for name, p in biases)


def test_layers_support_top_k_selection():
    net = PointwiseNet()
    assert len(net.layers) == 6
    assert all(isinstance(layer, ConcatSquashLinear) for layer in net.layers)
    top3 = n_params(p for layer in net.layers[3:] for p in layer.parameters())
    # Top-3 of the reference: layers 3-5 plus the time Linear, 220,504 (docs/model.md §6)
    assert top3 + n_params(net.time_embedding.parameters()) == 220_504


def test_forward_shapes_and_configurable_widths():
    net = PointwiseNet(point_dim=3, context_dim=5, widths=(16, 8), time_dim=8)
    assert len(net.layers) == 3
    x = torch.randn(2, 7, 3)
    out = net(x, torch.randn(2), torch.randn(2, 5))
    assert out.shape == (2, 7, 3)
    assert torch.isfinite(out).all()
    # scalar c_noise is broadcast over the batch
    assert net(x, torch.tensor(0.1), torch.randn(2, 5)).shape == (2, 7, 3)


def test_points_are_processed_independently():
    torch.manual_seed(0)
    net = PointwiseNet(widths=(16, 16), time_dim=8)
    x = torch.randn(2, 5, 4)
    c_noise, ctx = torch.randn(2), torch.randn(2, 2)
    out = net(x, c_noise, ctx)
    x2 = x.clone()
    x2[:, 3] = 100.0
    out2 = net(x2, c_noise, ctx)
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(out[:, keep], out2[:, keep])


def test_concat_squash_formula():
    torch.manual_seed(1)
    layer = ConcatSquashLinear(3, 4, 2)
    h, ctx = torch.randn(5, 3), torch.randn(1, 2)
    expected = (h @ layer.linear.weight.T + layer.linear.bias) * torch.sigmoid(
        ctx @ layer.gate.weight.T + layer.gate.bias
    ) + ctx @ layer.context_bias.weight.T
    torch.testing.assert_close(layer(h, ctx), expected)
    assert layer.context_bias.bias is None


def test_time_embedding_frequencies_are_a_saved_buffer():
    emb = TimeEmbedding(64)
    assert "fourier.frequencies" in emb.state_dict()
    assert "fourier.frequencies" not in dict(emb.named_parameters())
    assert emb.fourier.frequencies.shape == (32,)
    assert emb(torch.randn(3)).shape == (3, 64)


def test_bad_shapes_raise():
    net = PointwiseNet(widths=(8,), time_dim=8)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 5, 3), torch.randn(2), torch.randn(2, 2))
    with pytest.raises(ValueError, match="context must have shape"):
        net(torch.randn(2, 5, 4), torch.randn(2), torch.randn(2, 3))
