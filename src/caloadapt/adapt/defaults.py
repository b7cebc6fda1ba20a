"""Learning-rate defaults per adaptation method and data size.

Starting point: the published "adaptive" table by data size D (docs/model.md §7, CaloTransfer
``train.py``) and its per-strategy factors (full / top-k: x 1/2, BitFit: x 2, LoRA: x 1). The
published runs take 1M steps; caloadapt's default budgets are a few thousand steps on a CPU, so
scratch (point network and flow, both freshly initialised) trains at the pre-training rate (1e-3)
instead of the published 2e-4.

The table lowers the rate as D grows, which suits long runs. At a fixed short budget it makes larger
data sets *worse* (the steps, not the data, limit the run), so ``by_size=False`` takes the D <= 100
row for every size: the rates then do not change with D and a size scan measures the data alone.
"""

from __future__ import annotations

__all__ = ["table_learning_rate", "default_learning_rate", "adaptation_learning_rates", "SCRATCH_LEARNING_RATE",
           "FLOW_FACTOR", "NET_FACTOR", "BIAS_FLOW_FACTOR"]

# D <= bound -> learning rate (docs/model.md §7)
_TABLE = ((100, 1e-3), (500, 5e-4), (1000, 2e-4), (5000, 1e-4), (10_000, 5e-5), (50_000, 2e-5))
_FACTOR = {"full": 0.5, "top-k": 0.5, "bitfit": 2.0, "bitfit-context": 2.0, "lora": 1.0, "dora": 1.0,
           "loha": 1.0, "ia3": 2.0}


def table_learning_rate(n_samples: int) -> float:
    """The published learning rate for ``n_samples`` training showers."""
    for bound, lr in _TABLE:
        if n_samples <= bound:
            return lr
    return 1e-5


#: the learning rate of a freshly initialised network (the pre-training rate)
SCRATCH_LEARNING_RATE = 1e-3


def default_learning_rate(method: str, n_samples: int) -> float:
    """Peak learning rate of the point network for ``method`` trained on ``n_samples`` showers."""
    if method == "scratch":
        return SCRATCH_LEARNING_RATE
    return NET_FACTOR * _FACTOR[method] * table_learning_rate(n_samples)


#: the pre-trained flow adapts at this multiple of the table's rate: at 1x, 250 steps on 100 dataset-3
#: electrons left the ILD photon flow's energy sum and depth where the photons had them (docs/fidelity.md,
#: "Adapting a spot model to hits")
FLOW_FACTOR = 3.0
#: the pre-trained point network adapts at this multiple of the table's rate for its method: at 1x the
#: periphery of a dataset-3 shower was still short of points after 1000 steps (docs/fidelity.md,
#: "More steps, higher rates")
NET_FACTOR = 3.0
#: a flow adapted through its biases (``flow=bitfit``, or ``lora``: with low-rank updates of its hidden layers)
#: takes this multiple of the whole flow's rate: with its biases alone at 1x its validation loss after 250 steps
#: (8.96) was worse than the whole flow's after 50 (8.83), at 10x it is the whole flow's (8.48 against 8.46;
#: same section)
BIAS_FLOW_FACTOR = 10.0


def adaptation_learning_rates(method: str, n_samples: int, by_size: bool = True,
                              flow: str = "full") -> tuple[float, float]:
    """Peak learning rates ``(point network, flow)`` of an adaptation run.

    The pre-trained point network follows the table times :data:`NET_FACTOR` (and the method's factor), the
    pre-trained flow the table times :data:`FLOW_FACTOR` (times :data:`BIAS_FLOW_FACTOR` when only its biases,
    and with ``flow="lora"`` its low-rank updates, move: ``flow="bitfit"`` or ``"lora"``); a scratch network
    and flow train at the pre-training rate. ``by_size=False``: the rates of D <= 100 at every size (see the
    module docstring).
    """
    size = n_samples if by_size else min(n_samples, _TABLE[0][0])
    if method == "scratch":
        return SCRATCH_LEARNING_RATE, SCRATCH_LEARNING_RATE
    flow_lr = FLOW_FACTOR * table_learning_rate(size) * (BIAS_FLOW_FACTOR if flow in ("bitfit", "lora") else 1.0)
    return default_learning_rate(method, size), flow_lr
