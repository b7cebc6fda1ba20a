"""Tests of caloadapt.models.flow: log-density, training on a toy, seeded sampling, structure."""

from __future__ import annotations

import math

import pytest
import torch

from caloadapt.models import ShowerFlow
from conftest import needs_cxx


def small_flow(n_features: int = 3, **kwargs) -> ShowerFlow:
    torch.manual_seed(0)
    return ShowerFlow(n_features, context_dim=1, hidden=(32, 32), transforms=3, **kwargs)


def test_log_prob_is_finite_with_batch_shape():
    flow = small_flow()
    x = torch.randn(5, 3)
    x[0] = torch.tensor([7.0, -9.0, 0.0])  # outside the spline domain [-5, 5]
    lp = flow.log_prob(x, torch.rand(5, 1))
    assert lp.shape == (5,)
    assert torch.isfinite(lp).all()
    # (B,) context accepted for a one-dimensional condition
    torch.testing.assert_close(flow.log_prob(x, torch.full((5,), 0.3)), flow.log_prob(x, torch.full((5, 1), 0.3)))


def test_transforms_are_coupling_with_two_passes():
    flow = small_flow(n_features=6)
    transforms = list(flow.flow.transform.transforms)
    assert len(transforms) == 3
    assert all(t.passes == 2 for t in transforms)


def test_sampling_is_reproducible_by_seed_and_without_grad():
    flow = small_flow()
    ctx = torch.rand(8, 1)
    a = flow.sample(ctx, seed=123)
    b = flow.sample(ctx, seed=123)
    c = flow.sample(ctx, seed=124)
    d = flow.sample(ctx, generator=torch.Generator().manual_seed(123))
    assert a.shape == (8, 3)
    assert not a.requires_grad
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)


def test_permutations_depend_on_their_own_seed_and_survive_state_dict():
    a = small_flow(n_features=8)
    b = small_flow(n_features=8)
    c = small_flow(n_features=8, permutation_seed=7)
    order = [t.order.tolist() for t in a.flow.transform.transforms]
    assert order == [t.order.tolist() for t in b.flow.transform.transforms]
    assert order != [t.order.tolist() for t in c.flow.transform.transforms]

    x, ctx = torch.randn(4, 8), torch.rand(4, 1)
    torch.manual_seed(5)
    fresh = ShowerFlow(8, hidden=(32, 32), transforms=3)
    fresh.load_state_dict(a.state_dict())
    torch.testing.assert_close(fresh.log_prob(x, ctx), a.log_prob(x, ctx))


def test_alternating_order_option():
    flow = small_flow(n_features=4, randperm=False)
    orders = [t.order.tolist() for t in flow.flow.transform.transforms]
    assert orders[0] == [0, 0, 1, 1] and orders[1] == [1, 1, 0, 0]


def toy_batch(g: torch.Generator, n: int):
    """x | c: correlated Gaussian with a context-dependent mean, c ~ U(-1, 1)."""
    c = torch.rand(n, 1, generator=g) * 2 - 1
    z = torch.randn(n, 3, generator=g)
    x = torch.cat([2 * c, -c + 0.5 * z[:, :1], c**2], 1) + 0.3 * z
    return x, c


def test_training_reduces_nll_and_samples_follow_condition():
    torch.manual_seed(0)
    flow = ShowerFlow(3, context_dim=1, hidden=(64, 64), transforms=4)
    g = torch.Generator().manual_seed(0)
    x_val, c_val = toy_batch(g, 2000)
    with torch.no_grad():
        nll_before = -flow.log_prob(x_val, c_val).mean().item()
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(200):
        x, c = toy_batch(g, 256)
        loss = -flow.log_prob(x, c).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        nll_after = -flow.log_prob(x_val, c_val).mean().item()
    # exact conditional entropy: 1.5 ln(2 pi e) + 0.5 ln det(Sigma), det = (0.09 * 0.34 - 0.15^2) * 0.09
    entropy = 1.5 * math.log(2 * math.pi * math.e) + 0.5 * math.log((0.09 * 0.34 - 0.15**2) * 0.09)
    assert nll_after < nll_before - 1.0
    assert nll_after < entropy + 0.3

    s = flow.sample(torch.full((4000, 1), 0.5), seed=0)
    torch.testing.assert_close(s.mean(0), torch.tensor([1.0, -0.5, 0.25]), atol=0.1, rtol=0)
    torch.testing.assert_close(s.std(0), torch.tensor([0.3, math.sqrt(0.34), 0.3]), rtol=0.2, atol=0)


def test_bad_inputs_raise():
    flow = small_flow()
    with pytest.raises(ValueError, match="context"):
        flow.log_prob(torch.randn(2, 3), torch.rand(2, 2))
    with pytest.raises(ValueError, match="x must have shape"):
        flow.log_prob(torch.randn(2, 4), torch.rand(2, 1))
    with pytest.raises(ValueError, match="n_features"):
        ShowerFlow(1)


def test_masked_weights_kept_without_gradients_follow_every_change_of_the_weights():
    """The masked layers keep mask * weight between gradient-free calls (the sampling cost at batch 1);
    they must compute what a fresh product gives after an optimiser step, a state-dict load and a
    change of dtype, inside and outside inference mode, and keep zuko's state dict."""
    import zuko

    flow = small_flow(n_features=4)
    layers = [m for m in flow.modules() if isinstance(m, zuko.nn.MaskedLinear)]
    assert layers and all(type(m) is not zuko.nn.MaskedLinear for m in layers)
    x, context = torch.randn(6, 4), torch.rand(6, 1)

    def agree() -> None:
        with torch.no_grad():
            cached = flow.log_prob(x, context)
        with torch.inference_mode():
            in_inference = flow.log_prob(x, context)
        fresh = flow.log_prob(x, context).detach()  # with gradients: the product is formed anew
        torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
        torch.testing.assert_close(in_inference, fresh, rtol=0, atol=0)

    agree()
    optimizer = torch.optim.SGD(flow.parameters(), lr=0.1)
    (-flow.log_prob(x, context).mean()).backward()
    optimizer.step()
    agree()
    flow.load_state_dict(small_flow(n_features=4, permutation_seed=42).state_dict())
    agree()
    flow.double()
    x = x.double()
    context = context.double()
    agree()
    keys = {k for k in flow.state_dict()}
    assert keys == set(small_flow(n_features=4).state_dict()) and any(k.endswith(".mask") for k in keys)


@pytest.mark.parametrize("shape", [(8,), (5, 8), (3, 7, 8)])
def test_the_flows_spline_is_zukos(shape):
    """The spline with its bins normalised in an inner dimension has zuko's knots, values, inverse,
    log-determinant and gradients (1-d parameters too: zuko builds one at construction); in double
    precision, where the order of the sums no longer shows."""
    import zuko

    from caloadapt.models.flow import _RQSTransform

    torch.manual_seed(0)
    widths, heights = torch.randn(shape, dtype=torch.float64) * 3, torch.randn(shape, dtype=torch.float64) * 3
    derivatives = torch.randn(*shape[:-1], shape[-1] - 1, dtype=torch.float64) * 3
    params = [p.requires_grad_() for p in (widths, heights, derivatives)]
    ours, zukos = _RQSTransform(*params, slope=1e-3), zuko.transforms.MonotonicRQSTransform(*params, slope=1e-3)
    assert type(ours)._inverse is not type(zukos)._inverse  # the inverse compared below is our own
    for name in ("horizontal", "vertical", "derivatives"):
        torch.testing.assert_close(getattr(ours, name), getattr(zukos, name))
    x = torch.linspace(-6, 6, 11, dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1)).expand(11, *shape[:-1])
    torch.testing.assert_close(ours(x), zukos(x))
    torch.testing.assert_close(ours.inv(x), zukos.inv(x))
    torch.testing.assert_close(ours.log_abs_det_jacobian(x, ours(x)), zukos.log_abs_det_jacobian(x, zukos(x)))
    ours_grad = torch.autograd.grad(ours(x).sum(), params)
    zukos_grad = torch.autograd.grad(zukos(x).sum(), params)
    for a, b in zip(ours_grad, zukos_grad, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("randperm", [True, False])
def test_sampling_inverts_the_flow_as_zuko_does(randperm):
    """Sampling inverts the flow without zuko's transform objects, with the same result as zuko's composed
    inverse of the same base draw (whose splines are compared with zuko's own above), and the sample maps back
    to that draw through zuko's forward map."""
    torch.manual_seed(0)
    flow = ShowerFlow(7, context_dim=2, hidden=(16, 16), transforms=3, randperm=randperm)
    context = torch.randn(5, 2)

    def agree() -> None:
        sample = flow.sample(context, seed=4)
        with torch.no_grad():
            dist = flow(context)
            base = dist.base.base_dist
            draw = base.loc + base.scale * torch.randn((5, 7), generator=torch.Generator().manual_seed(4))
            # each half's rows of the last layer are a matrix of their own: float32 sums may round apart, by
            # up to 1.7e-6 on a 2-core AMD EPYC whose kernels sum in another order (the same test at 1e-6 failed
            # there on the code it was written for)
            torch.testing.assert_close(sample, dist.transform.inv(draw), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dist.transform(sample), draw, rtol=1e-4, atol=1e-4)

    agree()
    # sampling cuts each transform's last layer into its halves once; a change of the weights or of
    # the biases alone (BitFit of the flow) must reach the cut layers
    last_layers = [t.hyper[-1] for t in flow.flow.transform.transforms]
    with torch.no_grad():
        for layer in last_layers:
            layer.bias += 0.5
    agree()
    with torch.no_grad():  # the hidden layers' weights are kept as well
        for transform in flow.flow.transform.transforms:
            transform.hyper[0].bias -= 0.3
    agree()
    with torch.no_grad():
        for layer in last_layers:
            layer.weight.mul_(1.5)
    agree()
    flow.load_state_dict(ShowerFlow(7, context_dim=2, hidden=(16, 16), transforms=3, randperm=randperm).state_dict())
    agree()


def test_sampling_reads_only_what_each_half_depends_on():
    """Each half of a coupling transform is inverted with the weights its outputs depend on (the masks'
    support): the first half reads the context alone, the second the context and the first half, and
    together they read fewer weights than zuko's two full passes."""
    flow = ShowerFlow(9, context_dim=2, hidden=(16, 16), transforms=2)
    for halves, transform in zip(flow._coupling_halves(), flow.flow.transform.transforms):
        (first, first_inputs, first_layers), (_, second_inputs, _) = halves.plan()[0]
        assert set(first_inputs.tolist()) <= {9, 10}  # the context columns follow the 9 features
        assert set(second_inputs.tolist()) <= set(first.tolist()) | {9, 10}
        read = sum(w.numel() for _, _, layers in halves.plan()[0] for w, _ in layers)
        assert read < 2 * sum(layer.weight.numel() for layer in transform.hyper if hasattr(layer, "weight"))
        assert first_layers[-1][0].shape[0] < 16  # half the last hidden units


@needs_cxx
def test_compiled_sampling_gives_the_flows_samples_and_follows_its_weights():
    """compile_sampling changes the speed, not the samples: the same draws give the same samples at batch
    1 (compiled up front) and at another batch size (compiled on its first call), and a later change of
    the weights reaches the compiled sampler (the weights are its inputs)."""
    torch.manual_seed(0)
    flow = ShowerFlow(7, context_dim=2, hidden=(16, 16), transforms=2)
    eager = ShowerFlow(7, context_dim=2, hidden=(16, 16), transforms=2)
    eager.load_state_dict(flow.state_dict())
    context = torch.randn(4, 2)
    flow.compile_sampling()
    for rows in (slice(0, 1), slice(0, 4)):
        torch.testing.assert_close(flow.sample(context[rows], seed=3), eager.sample(context[rows], seed=3),
                                   rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for model in (flow, eager):
            model.flow.transform.transforms[0].hyper[-1].bias += 0.5
    torch.testing.assert_close(flow.sample(context, seed=3), eager.sample(context, seed=3), rtol=1e-5, atol=1e-5)


def test_a_flow_that_cannot_be_compiled_says_so_and_keeps_sampling(monkeypatch):
    def no_compiler(function, **options):
        def compiled(*args):
            raise OSError("no C++ compiler found\n(details)")
        return compiled

    flow = small_flow()
    expected = flow.sample(torch.ones(2, 1), seed=0)
    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.raises(RuntimeError, match="could not compile the flow's sampling: no C\\+\\+ compiler found$"):
        flow.compile_sampling()
    torch.testing.assert_close(flow.sample(torch.ones(2, 1), seed=0), expected)
