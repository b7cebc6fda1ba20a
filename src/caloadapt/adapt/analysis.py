"""Why adaptation works: the singular-value structure of the weight updates ΔW = W_ft − W_pre.

For every 2-D weight of the point network (W, G and H of each ConcatSquash layer and the
time-embedding Linear) the update is decomposed by SVD, σ_1 ≥ σ_2 ≥ … (docs/model.md §8, after the
CaloTransfer notebook ``final_score_plot.ipynb``, cells 18 and 22):

- normalised spectrum σ_i / σ_1;
- effective rank k_p: the smallest k with Σ_{i≤k} σ_i² ≥ p · Σ_i σ_i², for p = 0.95 and 0.99;
- compression ratio min(out, in) / k_0.95;
- truncated-SVD ("inverse LoRA") error ε_r = ‖ΔW_r − ΔW‖_F / ‖ΔW‖_F for the rank-r truncation ΔW_r,
  r over powers of 2 and their 1.5× intermediates up to full rank; by Eckart–Young
  ε_r = sqrt(Σ_{i>r} σ_i² / Σ_i σ_i²);
- update magnitude ‖ΔW‖_F, relative ‖ΔW‖_F / ‖W_pre‖_F, and ‖Δb‖_2 of the module's bias.

A high effective rank says that a low-rank adapter of that rank cannot represent the update.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._atomic import atomic_path
from ..errors import CheckpointError

__all__ = ["RANK_THRESHOLDS", "analysis_ranks", "effective_rank", "weight_updates", "analyse_update",
           "analyse_states", "analyse_checkpoints"]

#: thresholds of the cumulative squared spectrum for the effective rank (docs/model.md §8)
RANK_THRESHOLDS: tuple[float, ...] = (0.95, 0.99)
#: the reconstruction-error line drawn in the plots (docs/model.md §8)
ERROR_LINE = 0.05

_NET_PREFIX = "denoiser.net."


def analysis_ranks(max_rank: int) -> list[int]:
    """Powers of 2 and their 1.5× intermediates (1, 2, 3, 4, 6, 8, 12, …) up to ``max_rank``, and it."""
    ranks = {max_rank}
    power = 1
    while power <= max_rank:
        ranks.add(power)
        if power >= 2 and power * 3 // 2 <= max_rank:
            ranks.add(power * 3 // 2)
        power *= 2
    return sorted(r for r in ranks if r >= 1)


def effective_rank(singular_values: np.ndarray, threshold: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ threshold · Σ_i σ_i² (0 for a zero update)."""
    energy = np.asarray(singular_values, np.float64) ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    cumulative = np.cumsum(energy) / total
    return int(np.searchsorted(cumulative, threshold * (1 - 1e-12)) + 1)


def weight_updates(pretrained_state: dict, finetuned_state: dict) -> dict[str, np.ndarray]:
    """ΔW of every 2-D weight of the point network, ``{module name: ΔW (out, in)}``.

    The states are model state dicts (keys ``denoiser.net.…``) or point-network state dicts;
    module names are relative to the point network, e.g. ``layers.0.linear``,
    ``time_embedding.linear``, in state-dict order.
    """
    _check_compatible(pretrained_state, finetuned_state)
    prefix = _NET_PREFIX if any(k.startswith(_NET_PREFIX) for k in pretrained_state) else ""
    out: dict[str, np.ndarray] = {}
    for key, value in pretrained_state.items():
        if not key.startswith(prefix) or not key.endswith(".weight") or value.ndim != 2:
            continue
        name = key[len(prefix):-len(".weight")]
        delta = finetuned_state[key].detach().double().cpu() - value.detach().double().cpu()
        out[name] = delta.numpy()
    return out


def analyse_update(delta: np.ndarray, weight: np.ndarray | None = None) -> dict:
    """Spectrum, effective ranks, truncation errors and magnitude of one update ΔW.

    Arguments:
        delta: ΔW, shape ``(out, in)``.
        weight: the pre-trained W, for the relative magnitude (optional).

    Returns:
        ``shape``, ``max_rank``, ``singular_values`` (descending), ``effective_rank_95``,
        ``effective_rank_99``, ``compression_ratio`` (max_rank / effective_rank_95, None for a
        zero update), ``ranks`` and ``reconstruction_error`` (ε_r for those ranks),
        ``frobenius_norm`` ‖ΔW‖_F and ``relative_norm`` ‖ΔW‖_F / ‖W‖_F (None without ``weight``).
    """
    delta = np.asarray(delta, np.float64)
    if delta.ndim != 2:
        raise ValueError(f"ΔW must be a matrix, got shape {delta.shape}")
    sigma = np.linalg.svd(delta, compute_uv=False)
    energy = sigma**2
    total = float(energy.sum())
    max_rank = int(min(delta.shape))
    ranks = analysis_ranks(max_rank)
    # Eckart–Young: the rank-r truncation leaves exactly the energy of the discarded singular values
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    errors = [float(np.sqrt(max(tail[r], 0.0) / total)) if total > 0 else 0.0 for r in ranks]
    k95, k99 = (effective_rank(sigma, p) for p in RANK_THRESHOLDS)
    norm = float(np.sqrt(total))
    w_norm = float(np.linalg.norm(weight)) if weight is not None else None
    return {
        "shape": list(delta.shape),
        "max_rank": max_rank,
        "singular_values": sigma.tolist(),
        "effective_rank_95": k95,
        "effective_rank_99": k99,
        "compression_ratio": max_rank / k95 if k95 else None,
        "ranks": ranks,
        "reconstruction_error": errors,
        "frobenius_norm": norm,
        "relative_norm": norm / w_norm if w_norm else None,
    }


def _check_compatible(a: dict, b: dict) -> None:
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise CheckpointError(f"checkpoints come from different architectures: keys only in the pre-trained "
                              f"{only_a[:3]}, only in the fine-tuned {only_b[:3]}")
    shapes = [f"{k} {tuple(a[k].shape)} vs {tuple(b[k].shape)}" for k in a if tuple(a[k].shape) != tuple(b[k].shape)]
    if shapes:
        raise CheckpointError(f"checkpoints come from different architectures: shapes differ: {'; '.join(shapes[:3])}")


def analyse_states(pretrained_state: dict, finetuned_state: dict) -> dict[str, dict]:
    """:func:`analyse_update` for every 2-D point-network weight, with ‖Δb‖_2 of its bias.

    Returns ``{module name: analysis}``; each analysis also holds ``bias_delta_norm`` (None when
    the module has no bias) and ``magnitude`` = ‖ΔW‖_F + ‖Δb‖_2 (docs/model.md §8 heatmap).
    """
    prefix = _NET_PREFIX if any(k.startswith(_NET_PREFIX) for k in pretrained_state) else ""
    result: dict[str, dict] = {}
    for name, delta in weight_updates(pretrained_state, finetuned_state).items():
        weight = pretrained_state[f"{prefix}{name}.weight"].detach().double().cpu().numpy()
        info = analyse_update(delta, weight)
        bias_key = f"{prefix}{name}.bias"
        if bias_key in pretrained_state:
            db = finetuned_state[bias_key].detach().double().cpu() - pretrained_state[bias_key].detach().double().cpu()
            info["bias_delta_norm"] = float(db.norm())
        else:
            info["bias_delta_norm"] = None
        info["magnitude"] = info["frobenius_norm"] + (info["bias_delta_norm"] or 0.0)
        result[name] = info
    return result


def _weights(path: str | os.PathLike[str]) -> tuple[dict, dict | None, dict]:
    """(merged weights, adaptation method dict or None, model config) of a checkpoint."""
    from ..models.checkpoint import load_checkpoint
    from .finetune import load_adapted_state

    payload = load_checkpoint(path)
    state = load_adapted_state(payload, source=str(path))
    return state, payload.get("adapter"), payload["model_config"]


def _label(path: Path, method: dict | None, used: set[str]) -> str:
    if method:
        from ..models.adapters import AdaptMethod

        label = AdaptMethod.from_dict(method).label()
    else:
        label = path.parent.name or path.stem
    label = re.sub(r"[^A-Za-z0-9_.+-]", "_", label) or "run"
    base, i = label, 2
    while label in used:
        label, i = f"{base}-{i}", i + 1
    used.add(label)
    return label


def analyse_checkpoints(pretrained_path: str | os.PathLike[str],
                        finetuned_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                        out_dir: str | os.PathLike[str], *, plots: bool = True) -> dict:
    """Analyse the weight updates of one or more fine-tuned checkpoints against the pre-trained one.

    EMA weights are used when a checkpoint has them. A checkpoint written during a peft run (with
    the adapters still separate) is merged first. Writes ``updates.json`` and, with ``plots``,
    ``spectra.png``, ``effective_rank.png``, ``reconstruction_error.png`` (per run, prefixed by
    the run's label when several are given) and ``update_magnitude.png`` (all runs) to
    ``out_dir``, each atomically.

    Returns:
        The content of ``updates.json``: ``pretrained``, ``runs`` (each with ``label``,
        ``checkpoint``, ``method``, ``layers`` = ``{module: analysis}``) and ``files``.
    """
    paths = [finetuned_path] if isinstance(finetuned_path, (str, os.PathLike)) else list(finetuned_path)
    if not paths:
        raise CheckpointError("no fine-tuned checkpoint given")
    out_dir = Path(out_dir)
    pre_state, _, pre_config = _weights(pretrained_path)
    runs, used = [], set()
    for path in map(Path, paths):
        state, method, config = _weights(path)
        if config != pre_config:
            diff = [f"{k}: {pre_config.get(k)!r} vs {config.get(k)!r}" for k in sorted(set(pre_config) | set(config))
                    if pre_config.get(k) != config.get(k)]
            raise CheckpointError(f"checkpoints come from different architectures: {path}: {'; '.join(diff[:3])}")
        try:
            layers = analyse_states(pre_state, state)
        except CheckpointError as err:
            raise CheckpointError(f"{pretrained_path} vs {path}: {err}") from None
        runs.append({"label": _label(path, method, used), "checkpoint": str(path), "method": method,
                     "layers": layers})
    result = {"pretrained": str(pretrained_path), "thresholds": list(RANK_THRESHOLDS), "runs": runs, "files": []}
    if plots:
        result["files"] = _plot(runs, out_dir)
    with atomic_path(out_dir / "updates.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return result


# -- plots ------------------------------------------------------------------------------------------


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _plot(runs: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for run in runs:
        prefix = f"{run['label']}_" if len(runs) > 1 else ""
        layers = run["layers"]
        names = list(layers)

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in names:
            sigma = np.asarray(layers[name]["singular_values"])
            if sigma.size and sigma[0] > 0:
                ax.semilogy(np.arange(1, sigma.size + 1), sigma / sigma[0], label=name, lw=1)
        for level in (0.1, 0.01):
            ax.axhline(level, color="grey", ls="--", lw=0.8)
        ax.set(xlabel="index i", ylabel="σ_i / σ_1", title=f"Singular values of ΔW ({run['label']})")
        ax.legend(fontsize=6, ncol=2)
        files.append(_save(fig, out_dir / f"{prefix}spectra.png"))

        fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(names)), 4.5))
        x = np.arange(len(names))
        for offset, key, label in ((-0.2, "effective_rank_95", "95 %"), (0.2, "effective_rank_99", "99 %")):
            ax.bar(x + offset, [layers[n][key] for n in names], width=0.4, label=f"effective rank at {label}")
        ax.scatter(x, [layers[n]["max_rank"] for n in names], marker="_", s=200, color="k", label="maximum rank")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)
        ax.set_xticks(x, names, rotation=70, fontsize=7)
        ax.set(ylabel="rank (unchanged weights: none)", title=f"Effective rank of ΔW ({run['label']})")
        ax.legend(fontsize=7)
        files.append(_save(fig, out_dir / f"{prefix}effective_rank.png"))

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in names:
            if not layers[name]["frobenius_norm"]:
                continue  # an unchanged weight has no error curve
            ranks, errors = layers[name]["ranks"], layers[name]["reconstruction_error"]
            ax.plot(ranks, np.maximum(errors, 1e-8), marker=".", label=name, lw=1)
        ax.axhline(ERROR_LINE, color="grey", ls="--", lw=0.8, label="5 %")
        ax.set(xscale="log", yscale="log", xlabel="rank r of the truncated SVD",
               ylabel="‖ΔW_r − ΔW‖_F / ‖ΔW‖_F", title=f"Truncated-SVD error ({run['label']})")
        ax.legend(fontsize=6, ncol=2)
        files.append(_save(fig, out_dir / f"{prefix}reconstruction_error.png"))

    names = list(dict.fromkeys(n for run in runs for n in run["layers"]))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(names)), 8), sharex=True)
    x = np.arange(len(names))
    width = 0.8 / len(runs)
    panels = (("magnitude", "‖ΔW‖_F + ‖Δb‖_2"), ("relative_norm", "‖ΔW‖_F / ‖W‖_F"))
    for ax, (key, ylabel) in zip(axes, panels):
        for i, run in enumerate(runs):
            values = [(run["layers"].get(n) or {}).get(key) or 0.0 for n in names]
            ax.bar(x - 0.4 + (i + 0.5) * width, values, width=width, label=run["label"])
        ax.set(ylabel=ylabel)
    axes[0].set_title("Update magnitude per layer and method")
    axes[0].legend(fontsize=7)
    axes[1].set_xticks(x, names, rotation=70, fontsize=7)
    files.append(_save(fig, out_dir / "update_magnitude.png"))
    return files
