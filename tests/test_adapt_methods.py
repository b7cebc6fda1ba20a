"""Adaptation methods: exactly the named parameter groups are trained; peft adapters merge back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from caloadapt.adapt import (METHODS, AdaptMethod, finetune, format_report, is_adapted, merge,
                             parameter_report, prepare)
from caloadapt.data import write_showers
from caloadapt.errors import InputError
from caloadapt.geometry import get_geometry
from caloadapt.models import ModelConfig, Sampler, ShowerModel, load_model
from caloadapt.models.adapters import LowRankUpdate
from caloadapt.models.representation import n_statistics
from caloadapt.simulate import simulate
from caloadapt.train import TrainConfig, load_checkpoint, model_from_checkpoint, save_checkpoint

TINY = ModelConfig(widths=(32, 32), time_dim=16, flow_hidden=(32,), flow_transforms=2)
PEFT = ("lora", "dora", "ia3", "loha")


@pytest.fixture(scope="module")
def default_model() -> ShowerModel:
    torch.manual_seed(0)
    return ShowerModel()


@pytest.fixture(scope="module")
def tiny_model() -> ShowerModel:
    torch.manual_seed(1)
    model = ShowerModel(TINY)
    with torch.no_grad():  # non-trivial normalisation, as after pre-training
        model.point_mean.copy_(torch.tensor([0.5, -0.2, 3.0, 0.1]))
        model.point_std.copy_(torch.tensor([2.0, 2.0, 5.0, 0.3]))
    return model


def _net_counts(model: ShowerModel, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names if n.startswith("denoiser."))


def _expected_net_names(model: ShowerModel, method: AdaptMethod) -> set[str]:
    """The point-network parameters each method must train, written out from the module structure."""
    net, p = model.net, "denoiser.net."
    n = len(net.layers)
    if method.name in ("full", "scratch"):
        return {p + name for name, _ in net.named_parameters()}
    true_biases = {f"{p}layers.{i}.{m}.bias" for i in range(n) for m in ("linear", "gate")}
    true_biases.add(f"{p}time_embedding.linear.bias")
    if method.name == "bitfit":
        return true_biases
    if method.name == "bitfit-context":
        return true_biases | {f"{p}layers.{i}.context_bias.weight" for i in range(n)}
    if method.name == "top-k":
        return ({f"{p}layers.{i}.{m}.{t}" for i in range(n - method.k, n) for m, t in
                 (("linear", "weight"), ("linear", "bias"), ("gate", "weight"), ("gate", "bias"),
                  ("context_bias", "weight"))}
                | {f"{p}time_embedding.linear.weight", f"{p}time_embedding.linear.bias"})
    layers = range(n) if method.layers is None else method.layers
    suffix = {"lora": ("lora_A.default.weight", "lora_B.default.weight"),
              "dora": ("lora_A.default.weight", "lora_B.default.weight", "lora_magnitude_vector.default.weight"),
              "ia3": ("ia3_l.default",),
              "loha": ("hada_w1_a.default", "hada_w1_b.default", "hada_w2_a.default", "hada_w2_b.default")}
    return {f"{p}layers.{i}.{t}.{s}" for i in layers for t in method.targets for s in suffix[method.name]}


def _expected_net_count(model: ShowerModel, method: AdaptMethod) -> int:
    """Parameter counts from the layer shapes (docs/model.md §6 formulas)."""
    net = model.net
    r = method.rank
    layers = range(len(net.layers)) if method.layers is None else method.layers
    shapes = [(getattr(net.layers[i], t).in_features, getattr(net.layers[i], t).out_features)
              for i in layers for t in method.targets]
    per_method = {"lora": sum(r * (i + o) for i, o in shapes), "dora": sum(r * (i + o) + o for i, o in shapes),
                  "ia3": sum(o for _, o in shapes), "loha": sum(2 * r * (i + o) for i, o in shapes)}
    return per_method[method.name]


# -- counts against the default architecture (docs/model.md §1, §6) -----------------------------------

PUBLISHED = {  # method name, settings -> trainable point-network parameters of the default network
    ("full", ()): 504_920,
    ("scratch", ()): 504_920,
    ("bitfit", ()): 2_632,  # b + g + time bias: the true bias vectors (0.52 %)
    ("bitfit-context", ()): 87_376,  # + H: the published "BitFit, 17.30 %"
    ("top-k", (("k", 3),)): 220_504,  # layers 3..5 + time Linear (43.67 %)
    ("lora", (("rank", 8),)): 20_544,  # 8 * 2,568
    ("lora", (("rank", 106), ("alpha", 106.0))): 272_208,
    ("dora", (("rank", 8),)): 20_544 + 1_284,
    ("ia3", ()): 1_284,
    ("loha", (("rank", 8),)): 2 * 20_544,
}


@pytest.mark.parametrize("key", list(PUBLISHED), ids=lambda k: "-".join([k[0], *(f"{a}{b}" for a, b in k[1])]))
def test_counts_of_every_method_on_the_default_network(default_model, key):
    method = AdaptMethod(key[0], **dict(key[1]))
    model, names = prepare(default_model, method, seed=0)
    assert _net_counts(model, names) == PUBLISHED[key]
    rows = {r["group"]: r for r in parameter_report(model, names)}
    assert rows["net"]["trainable"] == PUBLISHED[key]
    assert rows["net"]["total"] == 504_920
    assert rows["net"]["percent"] == pytest.approx(100 * PUBLISHED[key] / 504_920)
    assert rows["flow"]["trainable"] == rows["flow"]["total"] == sum(p.numel() for p in model.flow.parameters())
    if method.is_peft:
        assert rows["net.adapter"]["trainable"] == PUBLISHED[key] == _expected_net_count(model, method)
        assert all(rows[f"net.{g}"]["trainable"] == 0 for g in ("weight", "bias", "context_bias", "gate"))
    assert "net.context_bias" in format_report(parameter_report(model, names))


def test_whole_model_counts_include_the_flow(default_model):
    """On the real default configuration BitFit of the point network is 0.5 % of the network, but with the
    flow adapted in full it trains most of the model; only with the flow's biases or a frozen flow is the
    method parameter-efficient as a whole (< 5 % of all parameters)."""
    from caloadapt.adapt.finetune import whole_model

    n_flow = sum(p.numel() for p in default_model.flow.parameters())
    n_all = sum(p.numel() for p in default_model.parameters())
    flow_biases = sum(m.bias.numel() for m in default_model.flow.modules()
                      if isinstance(m, nn.Linear) and m.bias is not None)
    expected = {"full": 2_632 + n_flow, "bitfit": 2_632 + flow_biases, "frozen": 2_632}
    for flow, trainable in expected.items():
        model, names = prepare(default_model, AdaptMethod("bitfit", flow=flow))
        whole = whole_model(parameter_report(model, names))
        assert whole["trainable"] == trainable and whole["total"] == n_all
        assert whole["trainable_net"] == 2_632 and whole["trainable_flow"] == trainable - 2_632
        assert whole["percent"] == pytest.approx(100 * trainable / n_all)
    assert n_flow > 3_000_000 and 100 * expected["full"] / n_all > 80  # the flow dominates the model
    assert 100 * expected["bitfit"] / n_all < 5 and 100 * expected["frozen"] / n_all < 5


def test_bitfit_group_split_is_honest(default_model):
    model, names = prepare(default_model, AdaptMethod("bitfit"))
    rows = {r["group"]: r for r in parameter_report(model, names)}
    assert (rows["net.bias"]["trainable"], rows["net.gate"]["trainable"], rows["net.time_embedding"]["trainable"],
            rows["net.context_bias"]["trainable"], rows["net.weight"]["trainable"]) == (1_284, 1_284, 64, 0, 0)
    model, names = prepare(default_model, AdaptMethod("bitfit-context"))
    rows = {r["group"]: r for r in parameter_report(model, names)}
    assert rows["net.context_bias"]["trainable"] == rows["net.context_bias"]["total"] == 84_744


# -- exact sets of trainable tensors (tiny network) ------------------------------------------------

CASES = [AdaptMethod(m) for m in METHODS] + [
    AdaptMethod("top-k", k=1), AdaptMethod("top-k", k=3, flow="frozen"), AdaptMethod("bitfit", flow="bitfit"),
    AdaptMethod("lora", rank=3, alpha=6, target="gate,context_bias", layers=(0, 2)),
    AdaptMethod("dora", rank=2, target="linear,gate,context_bias", flow="frozen"),
    AdaptMethod("lora", rank=2, flow="lora"), AdaptMethod("bitfit", rank=3, alpha=3, flow="lora"),
    AdaptMethod("ia3", target="linear,context_bias"), AdaptMethod("loha", rank=2, target="context_bias", layers=(1,)),
]


def _flow_names(model: ShowerModel, mode: str) -> set[str]:
    if mode == "full":
        return {f"flow.{n}" for n, _ in model.flow.named_parameters()}
    biases = {f"flow.{name}.bias" for name, m in model.flow.named_modules()
              if isinstance(m, nn.Linear) and m.bias is not None}
    if mode == "bitfit":
        return biases
    if mode == "lora":  # and A, B of every hyper-network layer but the last
        hyper = {name: m for name, m in model.flow.named_modules() if isinstance(m, nn.Sequential)}
        return biases | {f"flow.{h}.{i}.{f}" for h, layers in hyper.items() for f in "AB"
                         for i in [i for i, m in enumerate(layers) if isinstance(m, (nn.Linear, LowRankUpdate))][:-1]}
    return set()


@pytest.mark.parametrize("method", CASES, ids=lambda m: f"{m.label()}-{m.target}-{m.flow}")
def test_each_method_trains_exactly_its_groups(tiny_model, method):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model, names = prepare(tiny_model, method, seed=0)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())  # input untouched
    assert not is_adapted(tiny_model)
    assert is_adapted(model) == (method.is_peft or method.flow == "lora")
    flow_mode = "full" if method.name == "scratch" else method.flow
    expected = _expected_net_names(model, method) | _flow_names(model, flow_mode)
    assert set(names) == expected
    assert len(names) == len(set(names))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    if method.is_peft:
        assert _net_counts(model, names) == _expected_net_count(model, method)
    if flow_mode == "bitfit":
        assert names and all(dict(model.named_parameters())[n].ndim == 1 for n in names)

    # one optimiser step changes the trainable tensors and nothing else
    params = dict(model.named_parameters())
    frozen = {n: p.detach().clone() for n, p in params.items() if n not in expected}
    trained = {n: p.detach().clone() for n, p in params.items() if n in expected}
    gen = torch.Generator().manual_seed(3)
    points = torch.randn(4, 16, 4, generator=gen)
    mask = torch.ones(4, 16, dtype=torch.bool)
    condition = torch.rand(4, 2, generator=gen)
    stats = torch.randn(4, n_statistics(TINY.grid), generator=gen)
    optimizer = torch.optim.Adam([params[n] for n in names], lr=1e-2)
    losses = model(points, mask, condition, stats, gen)
    (losses["diffusion"] + losses["flow"]).backward()
    optimizer.step()
    for n, value in frozen.items():
        assert torch.equal(params[n], value), n
        assert params[n].grad is None, n
    changed = [n for n, value in trained.items() if not torch.equal(params[n], value)]
    assert changed
    assert any(n.startswith("denoiser.") for n in changed)
    if flow_mode != "frozen":
        assert any(n.startswith("flow.") for n in changed)


def test_scratch_reinitialises_but_keeps_the_normalisation(tiny_model):
    model, names = prepare(tiny_model, AdaptMethod("scratch"), seed=5)
    again, _ = prepare(tiny_model, AdaptMethod("scratch"), seed=5)
    assert len(names) == len(list(model.parameters()))
    for key in ("point_mean", "point_std", "stats_mean", "stats_std"):
        assert torch.equal(getattr(model, key), getattr(tiny_model, key))
    pre, new = tiny_model.state_dict(), model.state_dict()
    assert set(pre) == set(new)
    assert not torch.equal(pre["denoiser.net.layers.1.linear.weight"], new["denoiser.net.layers.1.linear.weight"])
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in new.items())  # seeded


def test_invalid_settings_are_refused(tiny_model):
    for kwargs in ({"name": "prefix"}, {"name": "lora", "target": "linear,bogus"}, {"name": "lora", "rank": 0},
                   {"name": "scratch", "flow": "frozen"}, {"name": "full", "flow": "prefix"},
                   {"name": "lora", "target": "linear,linear"}):
        with pytest.raises(InputError):
            AdaptMethod(**kwargs)
    with pytest.raises(InputError, match="has 3 layers"):
        prepare(tiny_model, AdaptMethod("top-k", k=4))
    with pytest.raises(InputError, match="do not exist"):
        prepare(tiny_model, AdaptMethod("lora", layers=(5,)))
    with pytest.raises(InputError, match="attention.*do not exist in the pointwise"):
        prepare(tiny_model, AdaptMethod("lora", target="attention"))  # a transformer target
    model, _ = prepare(tiny_model, AdaptMethod("lora"))
    with pytest.raises(InputError, match="already holds"):
        prepare(model, AdaptMethod("lora"))


def test_method_round_trips_through_a_dict():
    for method in CASES:
        assert AdaptMethod.from_dict(method.to_dict()) == method
    assert AdaptMethod("lora", layers=[0, 2]).layers == (0, 2)


# -- peft: wrap, merge, same showers --------------------------------------------------------------


def _perturb_adapters(model: ShowerModel, names: list[str]) -> None:
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n in names:
            if n.startswith("denoiser."):
                params[n].add_(0.3 * torch.randn(params[n].shape, generator=gen))


@pytest.mark.parametrize("method", [AdaptMethod("lora", rank=4, alpha=8), AdaptMethod("dora", rank=4),
                                    AdaptMethod("ia3", target="linear,gate,context_bias"),
                                    AdaptMethod("loha", rank=2, target="linear,context_bias", layers=(1, 2))],
                         ids=lambda m: m.name)
def test_peft_merge_gives_the_same_model(tiny_model, method, tmp_path):
    model, names = prepare(tiny_model, method, seed=0)
    x = torch.randn(3, 20, 4)
    sigma = torch.tensor([0.01, 0.5, 20.0])
    condition = torch.rand(3, 2)
    with torch.no_grad():
        assert torch.allclose(model.denoiser(x, sigma, condition), tiny_model.denoiser(x, sigma, condition),
                              atol=1e-5)  # adapters start as the identity
    _perturb_adapters(model, names)
    merged = merge(model, method)
    assert is_adapted(model) and not is_adapted(merged)
    assert type(merged) is ShowerModel and merged.net.layers[0].linear.__class__ is nn.Linear
    assert list(merged.state_dict()) == list(tiny_model.state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    model.eval(), merged.eval()
    with torch.no_grad():
        wrapped_out = model.denoiser(x, sigma, condition)
        merged_out = merged.denoiser(x, sigma, condition)
        assert not torch.allclose(wrapped_out, tiny_model.denoiser(x, sigma, condition), atol=1e-3)
    assert torch.allclose(wrapped_out, merged_out, atol=1e-5, rtol=1e-5)

    # the merged model is a plain checkpoint, and generates the same showers as the wrapped one
    save_checkpoint(tmp_path / "merged.pt", merged, ema=merged.state_dict())
    loaded = model_from_checkpoint(tmp_path / "merged.pt")
    geometry = get_geometry("calochallenge-3")
    energies = np.array([5e3, 20e3, 60e3])
    a = model.generate(geometry, energies, Sampler(steps=4), generator=torch.Generator().manual_seed(7))
    b = loaded.generate(geometry, energies, Sampler(steps=4), generator=torch.Generator().manual_seed(7))
    assert np.array_equal(a.n_points, b.n_points) and a.points.shape[0] > 0
    np.testing.assert_allclose(a.points, b.points, rtol=1e-4, atol=1e-4)

    # an unmerged checkpoint (as written during training) loads merged as well
    save_checkpoint(tmp_path / "adapted.pt", model, ema=model.state_dict(), adapter=method.to_dict())
    reloaded, _ = load_model(tmp_path / "adapted.pt")
    assert list(reloaded.state_dict()) == list(tiny_model.state_dict())
    for key, value in merged.state_dict().items():
        assert torch.allclose(reloaded.state_dict()[key], value, atol=1e-6), key


def test_the_flows_low_rank_update_keeps_its_couplings_and_merges_exactly(tiny_model, tmp_path):
    method = AdaptMethod("bitfit", rank=2, alpha=4, flow="lora")
    model, names = prepare(tiny_model, method, seed=0)
    context = torch.rand(5, 1)
    sample = tiny_model.flow(context).sample()
    with torch.no_grad():  # the update starts at zero: the pre-trained flow
        torch.testing.assert_close(model.flow(context).log_prob(sample), tiny_model.flow(context).log_prob(sample))
        for name, p in model.named_parameters():
            if name.startswith("flow.") and name.endswith((".A", ".B")):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    model.eval()
    with torch.no_grad():
        adapted = model.flow(context)
        # still invertible (which an update that bypassed the couplings' masks would break), and moved
        torch.testing.assert_close(adapted.transform.inv(adapted.transform(sample)), sample, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(adapted.log_prob(sample), tiny_model.flow(context).log_prob(sample))
    merged = merge(model, method)
    assert not is_adapted(merged) and set(merged.state_dict()) == set(tiny_model.state_dict())
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.flow(context).log_prob(sample), model.flow(context).log_prob(sample))
        # the fast sampling path, which cuts the layers' weights itself, samples the updated flow
        drawn = model.flow.sample(context, seed=3)
        torch.testing.assert_close(drawn, merged.flow.sample(context, seed=3), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(drawn, tiny_model.flow.sample(context, seed=3), atol=1e-3)
    # a checkpoint written during training (updates unmerged) loads merged
    save_checkpoint(tmp_path / "adapted.pt", model, ema=model.state_dict(), adapter=method.to_dict())
    reloaded, _ = load_model(tmp_path / "adapted.pt")
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)


def test_merge_is_identity_for_plain_methods(tiny_model):
    model, _ = prepare(tiny_model, AdaptMethod("bitfit"))
    assert merge(model, AdaptMethod("bitfit")) is model
    with pytest.raises(InputError, match="no peft adapters"):
        merge(model, AdaptMethod("lora"))


# -- one end-to-end fine-tuning run ---------------------------------------------------------------


def test_finetune_run_records_counts_and_writes_a_loadable_model(tiny_model, tmp_path):
    data = tmp_path / "ds3.h5"
    energies = np.exp(np.random.default_rng(1).uniform(np.log(1e3), np.log(20e3), 24))
    write_showers(data, simulate("calochallenge-3", "electron", energies, seed=2), format="calochallenge")
    pretrained = tmp_path / "pretrained.pt"
    save_checkpoint(pretrained, tiny_model, ema=tiny_model.state_dict())
    config = TrainConfig(steps=4, batch_size=4, max_points=64, val_every=2, checkpoint_every=2, warmup_steps=1,
                         device="cpu", val_max_showers=8, val_fraction=0.25)
    method = AdaptMethod("lora", rank=2, alpha=2, flow="bitfit")
    logged = []
    summary = finetune(pretrained, data, get_geometry("calochallenge-3"), tmp_path / "run", method, config,
                       progress=False, log=logged.append)
    assert summary["steps"] == 4 and "net.adapter" in logged[0]
    payload = load_checkpoint(tmp_path / "run" / "best.pt")
    assert payload["adapter"] == method.to_dict()
    rows = {r["group"]: r for r in payload["parameters"]}
    assert rows["net"]["trainable"] == 2 * sum(l.linear.in_features + l.linear.out_features
                                               for l in tiny_model.net.layers)
    final = model_from_checkpoint(summary["model"])
    assert list(final.state_dict()) == list(tiny_model.state_dict())
    # frozen base weights unchanged except through the merged low-rank update; flow weights frozen but biases
    pre, post = tiny_model.state_dict(), final.state_dict()
    assert torch.equal(pre["denoiser.net.layers.0.gate.weight"], post["denoiser.net.layers.0.gate.weight"])
    delta = post["denoiser.net.layers.1.linear.weight"] - pre["denoiser.net.layers.1.linear.weight"]
    sigma = torch.linalg.svdvals(delta.double())
    assert sigma[0] > 0 and sigma[2] < 1e-2 * sigma[0]  # rank 2 up to the float32 rounding of the merge
    flow_weights = [k for k in pre if k.startswith("flow.") and k.endswith("weight")]
    assert flow_weights and all(torch.equal(pre[k], post[k]) for k in flow_weights)
    # resume of the finished run works on the adapter checkpoint
    again = finetune(pretrained, data, get_geometry("calochallenge-3"), tmp_path / "run", method, config,
                     resume=True, progress=False, log=None)
    assert again["steps"] == 4


def test_finetune_keeps_the_pretrained_sampler_for_calibration_and_generation(tiny_model, tmp_path, monkeypatch):
    # the occupancy calibration is a property of the sampler it was fitted with: a fine-tuned model must be
    # calibrated and generated with its pre-trained model's sampler, not the default one
    import caloadapt.train.calibrate as calibrate
    data = tmp_path / "ds3.h5"
    energies = np.exp(np.random.default_rng(3).uniform(np.log(1e3), np.log(10e3), 12))
    write_showers(data, simulate("calochallenge-3", "electron", energies, seed=4), format="calochallenge")
    own = Sampler("euler", 3, sigma_max=5.0)
    assert own != Sampler()
    pretrained = tmp_path / "pretrained.pt"
    save_checkpoint(pretrained, tiny_model, ema=tiny_model.state_dict(), sampler=own)
    used = []
    real_fit = calibrate.fit_occupancy
    monkeypatch.setattr(calibrate, "fit_occupancy",
                        lambda *args, sampler, **kw: used.append(sampler) or real_fit(*args, sampler=sampler, **kw))
    config = TrainConfig(steps=2, batch_size=4, max_points=64, val_every=2, checkpoint_every=2, warmup_steps=1,
                         device="cpu", val_max_showers=4, val_fraction=0.25, occupancy_showers=3)
    summary = finetune(pretrained, data, get_geometry("calochallenge-3"), tmp_path / "run", AdaptMethod("bitfit"),
                       config, progress=False, log=None)
    assert used == [own]
    for path in (summary["model"], tmp_path / "run" / "best.pt", tmp_path / "run" / "last.pt"):
        assert load_model(path)[1] == own, path


def test_learning_rate_rules():
    from caloadapt.adapt.defaults import adaptation_learning_rates

    # the published table by D, with the per-method factors (a pre-trained network and flow at 3x the table's
    # rate, a flow adapted by its biases alone at 30x);
    # a scratch flow is fresh: pre-training rate
    assert adaptation_learning_rates("full", 100) == pytest.approx((1.5e-3, 3e-3))
    assert adaptation_learning_rates("full", 10_000) == pytest.approx((7.5e-5, 1.5e-4))
    assert adaptation_learning_rates("bitfit", 1000) == pytest.approx((1.2e-3, 6e-4))
    assert adaptation_learning_rates("bitfit", 100, flow="bitfit") == pytest.approx((6e-3, 3e-2))
    assert adaptation_learning_rates("scratch", 10_000) == pytest.approx((1e-3, 1e-3))
    # rates that do not fall with D (short fixed budgets): the D <= 100 row at every size
    for method in ("full", "bitfit", "scratch", "lora"):
        assert adaptation_learning_rates(method, 10_000, by_size=False) == adaptation_learning_rates(method, 100)
    assert adaptation_learning_rates("full", 50, by_size=False) == adaptation_learning_rates("full", 50)
