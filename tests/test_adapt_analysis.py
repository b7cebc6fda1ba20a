"""Weight-update analysis: SVD spectra, effective rank, truncation error, checkpoints in and plots out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caloadapt.adapt import (AdaptMethod, analyse_checkpoints, analyse_update, analysis_ranks, effective_rank,
                             prepare, weight_updates)
from caloadapt.errors import CheckpointError
from caloadapt.models import ModelConfig, ShowerModel
from caloadapt.train import save_checkpoint

TINY = ModelConfig(widths=(32, 32), time_dim=16, flow_hidden=(32,), flow_transforms=2)


def _planted(rank: int, shape=(128, 256), noise: float = 1e-7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1])) + noise * rng.normal(size=shape)


def test_ranks_are_powers_of_two_and_their_intermediates():
    assert analysis_ranks(256) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert analysis_ranks(4) == [1, 2, 3, 4]
    assert analysis_ranks(100) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 100]


def test_effective_rank_on_a_known_spectrum():
    sigma = np.sqrt([50.0, 30.0, 15.0, 4.0, 1.0])  # cumulative energy 0.5, 0.8, 0.95, 0.99, 1
    assert effective_rank(sigma, 0.5) == 1
    assert effective_rank(sigma, 0.95) == 3
    assert effective_rank(sigma, 0.99) == 4
    assert effective_rank(sigma, 0.999) == 5
    assert effective_rank(np.zeros(3), 0.95) == 0


def test_svd_analysis_recovers_a_planted_low_rank_update():
    delta = _planted(5)
    info = analyse_update(delta, weight=np.ones((128, 256)))
    assert info["max_rank"] == 128 and info["shape"] == [128, 256]
    assert info["effective_rank_95"] <= 5 and info["effective_rank_99"] <= 5
    errors = dict(zip(info["ranks"], info["reconstruction_error"]))
    assert errors[4] > 1e-2 and errors[6] < 1e-3
    # the error at rank 5 from an explicit truncated SVD
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    eps5 = np.linalg.norm(u[:, :5] * s[:5] @ vt[:5] - delta) / np.linalg.norm(delta)
    assert eps5 < 1e-3
    # and the formula used for the listed ranks agrees with explicit truncation
    for r, err in errors.items():
        explicit = np.linalg.norm(u[:, :r] * s[:r] @ vt[:r] - delta) / np.linalg.norm(delta)
        assert err == pytest.approx(explicit, abs=1e-9)
    assert info["frobenius_norm"] == pytest.approx(np.linalg.norm(delta))
    assert info["relative_norm"] == pytest.approx(np.linalg.norm(delta) / np.sqrt(128 * 256))
    assert info["compression_ratio"] == pytest.approx(128 / info["effective_rank_95"])


def test_a_full_rank_update_has_a_high_effective_rank():
    delta = np.random.default_rng(2).normal(size=(64, 32))
    info = analyse_update(delta)
    assert info["effective_rank_95"] > 20 and info["reconstruction_error"][-1] == pytest.approx(0.0, abs=1e-12)
    assert info["relative_norm"] is None


def test_weight_updates_are_the_two_dimensional_point_network_weights():
    torch.manual_seed(0)
    model = ShowerModel(TINY)
    state = model.state_dict()
    updates = weight_updates(state, state)
    expected = [f"layers.{i}.{m}" for i in range(3) for m in ("linear", "gate", "context_bias")]
    assert sorted(updates) == sorted(expected + ["time_embedding.linear"])
    assert updates["layers.1.linear"].shape == (32, 32) and not np.any(updates["layers.1.linear"])


def _save_pair(tmp_path, planted_rank: int = 3):
    torch.manual_seed(0)
    pre = ShowerModel(TINY)
    save_checkpoint(tmp_path / "pre.pt", pre, ema=pre.state_dict())
    ft = ShowerModel(TINY)
    ft.load_state_dict(pre.state_dict())
    rng = np.random.default_rng(4)
    with torch.no_grad():
        ft.net.layers[1].linear.weight.add_(torch.as_tensor(0.05 * _planted(planted_rank, (32, 32)),
                                                            dtype=torch.float32))
        ft.net.layers[2].context_bias.weight.add_(torch.as_tensor(0.01 * rng.normal(size=(4, 18)),
                                                                  dtype=torch.float32))
        ft.net.layers[0].linear.bias.add_(0.1)
    # raw weights differ from the EMA ones: the analysis must use the EMA weights
    raw = ShowerModel(TINY)
    save_checkpoint(tmp_path / "ft.pt", raw, ema=ft.state_dict(), adapter=AdaptMethod("full").to_dict())
    return pre, ft


def test_analyse_checkpoints_writes_json_and_plots(tmp_path):
    _save_pair(tmp_path)
    out = tmp_path / "analysis"
    result = analyse_checkpoints(tmp_path / "pre.pt", tmp_path / "ft.pt", out)
    saved = json.loads((out / "updates.json").read_text())
    assert saved == json.loads(json.dumps(result))
    (run,) = saved["runs"]
    assert run["label"] == "full" and run["method"]["name"] == "full"
    layers = run["layers"]
    assert layers["layers.1.linear"]["effective_rank_95"] <= 3
    assert layers["layers.1.linear"]["reconstruction_error"][layers["layers.1.linear"]["ranks"].index(3)] < 1e-2
    assert layers["layers.2.context_bias"]["effective_rank_99"] >= 3
    assert layers["layers.2.context_bias"]["max_rank"] == 4
    assert layers["layers.0.gate"]["frobenius_norm"] == 0 and layers["layers.0.gate"]["effective_rank_95"] == 0
    assert layers["layers.0.linear"]["bias_delta_norm"] == pytest.approx(0.1 * np.sqrt(32), rel=1e-4)
    assert layers["layers.2.context_bias"]["bias_delta_norm"] is None
    for name in ("spectra.png", "effective_rank.png", "reconstruction_error.png", "update_magnitude.png"):
        assert name in saved["files"]
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp"))


def test_several_runs_and_unmerged_peft_checkpoints(tmp_path):
    pre, _ = _save_pair(tmp_path)
    method = AdaptMethod("lora", rank=2, alpha=2)
    model, names = prepare(pre, method, seed=0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            if n.startswith("denoiser."):
                params[n].add_(0.2)
    # a checkpoint as written during a peft run: adapters separate, merged on reading
    save_checkpoint(tmp_path / "lora.pt", model, ema=model.state_dict(), adapter=method.to_dict())
    result = analyse_checkpoints(tmp_path / "pre.pt", [tmp_path / "ft.pt", tmp_path / "lora.pt"], tmp_path / "out")
    assert [r["label"] for r in result["runs"]] == ["full", "lora-r2"]
    lora = result["runs"][1]["layers"]
    assert all(lora[f"layers.{i}.linear"]["effective_rank_99"] <= 2 for i in range(3))
    assert lora["layers.1.linear"]["frobenius_norm"] > 0 and lora["layers.1.gate"]["frobenius_norm"] == 0
    assert (tmp_path / "out" / "lora-r2_spectra.png").is_file()
    assert (tmp_path / "out" / "update_magnitude.png").is_file()


def test_checkpoints_of_different_architectures_are_refused(tmp_path):
    _save_pair(tmp_path)
    other = ShowerModel(ModelConfig(widths=(16, 16), time_dim=16, flow_hidden=(32,), flow_transforms=2))
    save_checkpoint(tmp_path / "other.pt", other, ema=other.state_dict())
    with pytest.raises(CheckpointError, match="different architectures"):
        analyse_checkpoints(tmp_path / "pre.pt", tmp_path / "other.pt", tmp_path / "out")
    state = ShowerModel(TINY).state_dict()
    other_state = other.state_dict()
    with pytest.raises(CheckpointError, match="different architectures: shapes differ"):
        weight_updates(state, other_state)
    del other_state["denoiser.net.layers.0.gate.bias"]
    with pytest.raises(CheckpointError, match="different architectures: keys"):
        weight_updates(state, other_state)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        analyse_checkpoints(tmp_path / "missing.pt", tmp_path / "pre.pt", tmp_path / "out")
