"""Adaptation methods: which parameters of a pre-trained shower model are trained on the target.

Every method is a choice of *parameter groups* of the point network (docs/model.md §6), named by the
module structure of :class:`~caloadapt.models.pointwise.PointwiseNet`, never by a substring of the
parameter names (docs/model.md §6), plus a choice for the flow:

==================  ==========================================================================  =========
method              trained tensors of the point network                                        default
==================  ==========================================================================  =========
``scratch``         everything, from a fresh random initialisation (the baseline)               504,920
``full``            everything, from the pre-trained weights                                    504,920
``bitfit``          the true bias vectors b, g of every layer and the time-embedding bias       2,632
``bitfit-context``  those and the context-to-bias maps H (the published "BitFit, 17 %")         87,376
``top-k``           all tensors of the last k ConcatSquash layers and the time embedding        220,504 (k=3)
``lora``            low-rank A, B on the chosen Linear submodules (peft ``LoraConfig``)         r * 2,568
``dora``            LoRA with a learnt magnitude per output (peft ``LoraConfig(use_dora)``)     r * 2,568 + 1,284
``ia3``             a learnt scale per output of the chosen Linears (peft ``IA3Config``)        1,284
``loha``            low-rank Hadamard product (peft ``LoHaConfig``)                             2 r * 2,568
==================  ==========================================================================  =========

(counts for the default 4 -> 128 -> 256 -> 512 -> 256 -> 128 -> 4 network, ``target="linear"``,
all layers; docs/model.md §1 and §6).

The peft methods are injected into the plain torch point network with
:func:`peft.inject_adapter_in_model`, targeting the named ``nn.Linear`` submodules (``linear``,
``gate``, ``context_bias``) of the chosen ConcatSquash layers; :func:`merge` folds the adapters
back into those Linears and returns a plain :class:`~caloadapt.models.ShowerModel` with exactly the
original state-dict keys, so that the normal checkpoint and generation code uses it unchanged.

The flow is adapted separately (``flow``): ``full`` fine-tuning (the published choice, docs/model.md
§6), ``frozen``, ``bitfit`` (the bias vectors of its ``nn.Linear`` layers), or ``lora``: those biases and
a low-rank update of rank r of every hidden layer of its hyper-networks (:class:`LowRankUpdate`). peft's
adapters add their output beside a Linear's and would bypass the masks of zuko's masked layers, which keep
the flow's couplings invertible; the flow's update is added to the weight before the layer's mask instead.

References:
    | BitFit: Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199;
    | LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685;
    | DoRA: Liu et al. 2024, https://arxiv.org/abs/2402.09353;
    | IA3: Liu et al. 2022, https://arxiv.org/abs/2205.05638;
    | LoHa: Hyeon-Woo et al. 2022, https://arxiv.org/abs/2108.06098;
    | peft: https://github.com/huggingface/peft.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..errors import InputError
from .flow import tensor_versions
from .pointwise import PointwiseNet
from .shower_model import ShowerModel
from .transformer import PointTransformer

__all__ = [
    "METHODS",
    "PEFT_METHODS",
    "TARGETS",
    "FLOW_MODES",
    "AdaptMethod",
    "LowRankUpdate",
    "check_available",
    "prepare",
    "merge",
    "adapter_modules",
    "is_adapted",
    "parameter_report",
    "format_report",
]

#: adaptation methods, in the order of docs/model.md §6 then the peft methods
METHODS: tuple[str, ...] = ("scratch", "full", "bitfit", "bitfit-context", "top-k", "lora", "dora", "ia3", "loha")
#: methods whose adapters are injected by peft (and merged back by :func:`merge`)
PEFT_METHODS: tuple[str, ...] = ("lora", "dora", "ia3", "loha")
#: what a peft adapter may target: ``linear`` (the main weight maps, both backbones), ``gate`` and
#: ``context_bias`` (pointwise), ``attention``, ``mlp`` and ``modulation`` (transformer)
TARGETS: tuple[str, ...] = ("linear", "gate", "context_bias", "attention", "mlp", "modulation")
#: how the flow is adapted
FLOW_MODES: tuple[str, ...] = ("full", "frozen", "bitfit", "lora")


@dataclass(frozen=True)
class AdaptMethod:
    """An adaptation method and its settings (stored in every fine-tuning checkpoint as ``adapter``).

    Attributes:
        name: one of :data:`METHODS`.
        k: ``top-k``: number of last ConcatSquash layers trained (with the time embedding).
        rank: ``lora``, ``dora``, ``loha``: adapter rank r.
        alpha: ``lora``, ``dora``, ``loha``: scale numerator; the update is scaled by alpha / r
            (CaloTransfer used alpha = r, docs/model.md §6).
        target: peft methods: comma-separated Linear submodules of every adapted ConcatSquash layer,
            any of ``linear`` (W, the default, as the published LoRA), ``gate`` (G) and
            ``context_bias`` (H).
        layers: peft methods: indices of the ConcatSquash layers that get adapters (0 is the
            input layer); None: all layers.
        flow: flow adaptation, ``full`` (default, the published choice), ``frozen``, ``bitfit``
            (bias vectors of the flow's Linear layers) or ``lora`` (those and a rank-``rank`` update,
            scaled by ``alpha / rank``, of the hidden layers of its hyper-networks). ``scratch`` always
            trains the whole flow.
    """

    name: str
    k: int = 3
    rank: int = 8
    alpha: float = 8.0
    target: str = "linear"
    layers: tuple[int, ...] | None = None
    flow: str = "full"

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise InputError(f"unknown adaptation method {self.name!r}; expected one of {', '.join(METHODS)}")
        if self.flow not in FLOW_MODES:
            raise InputError(f"unknown flow adaptation {self.flow!r}; expected one of {', '.join(FLOW_MODES)}")
        if self.name == "scratch" and self.flow != "full":
            raise InputError("method 'scratch' initialises the flow at random too; it needs flow='full'")
        if self.k < 1:
            raise InputError(f"top-k needs k >= 1, got {self.k}")
        if self.rank < 1:
            raise InputError(f"adapter rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise InputError(f"adapter alpha must be positive, got {self.alpha}")
        targets = self.targets
        if not targets or any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets):
            raise InputError(f"adapter target {self.target!r}: expected a comma-separated choice of "
                             f"{', '.join(TARGETS)}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
            if not self.layers or any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
                raise InputError(f"adapter layers must be distinct non-negative indices, got {self.layers}")

    @property
    def targets(self) -> tuple[str, ...]:
        """The targeted Linear submodules as a tuple (from ``target``)."""
        return tuple(t.strip() for t in self.target.split(",") if t.strip())

    @property
    def is_peft(self) -> bool:
        return self.name in PEFT_METHODS

    def label(self) -> str:
        """A short label for tables and plots, e.g. ``lora-r8``, ``top-3``, ``bitfit``."""
        if self.name == "top-k":
            return f"top-{self.k}"
        if self.name in ("lora", "dora", "loha"):
            return f"{self.name}-r{self.rank}"
        return self.name

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AdaptMethod:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown adaptation settings {sorted(unknown)}")
        values = dict(data)
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        return cls(**values)


# -- selection -------------------------------------------------------------------------------------


def _names_by_id(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _flow_bias_vectors(model: ShowerModel) -> list[nn.Parameter]:
    """Bias vectors of the flow's Linear layers (including zuko's masked Linears)."""
    return [m.bias for m in model.flow.modules() if isinstance(m, nn.Linear) and m.bias is not None]


class LowRankUpdate(nn.Module):
    """A Linear layer of the flow (zuko's masked ones included) with LoRA's update of its weight,
    ``W -> W + (alpha / r) B A`` (Hu et al. 2021, eq. 3): ``A`` (r, in) Kaiming-uniform and ``B`` (out, r)
    zero, so that training starts from the pre-trained layer. The layer's mask, where it has one,
    multiplies the updated weight, as it multiplies the weight in the layer itself."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # peft's LoRA initialisation of A
        self._weight: tuple[tuple, torch.Tensor] | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The updated weight. Without gradients it is kept until ``W``, ``A`` or ``B`` change, so that the
        flow's sampling, which caches what it cuts from its layers' weights by their versions
        (:func:`~caloadapt.models.flow.tensor_versions`), sees a new tensor exactly when they do."""
        if torch.is_grad_enabled():
            return self._updated()
        key = tensor_versions(self.base.weight, self.A, self.B)
        if self._weight is None or self._weight[0] != key:
            self._weight = (key, self._updated())
        return self._weight[1]

    def _updated(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.B @ self.A)

    @property
    def mask(self) -> torch.Tensor:
        return self.base.mask  # an AttributeError for a plain Linear, as for the layer itself

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        return nn.functional.linear(x, self.mask * weight if hasattr(self.base, "mask") else weight, self.bias)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The layer with the update folded into its weight (the update is kept in place: merge a copy)."""
        self.base.weight.copy_(self._updated())
        return self.base


def _hyper_networks(model: ShowerModel) -> list[nn.Sequential]:
    return [m for m in model.flow.modules() if isinstance(m, nn.Sequential)]


def _add_flow_updates(model: ShowerModel, rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap every Linear of the flow's hyper-networks but the last of each in a :class:`LowRankUpdate`.
    The last maps the hidden features to every spline parameter (3,726 x 128 in the shipped flow), where
    a rank-8 update alone would cost more than all the others together; its bias adapts with the others."""
    params: list[nn.Parameter] = []
    for hyper in _hyper_networks(model):
        hidden = [i for i, m in enumerate(hyper) if isinstance(m, nn.Linear)][:-1]
        for i in hidden:
            hyper[i] = LowRankUpdate(hyper[i], rank, alpha)
            params += [hyper[i].A, hyper[i].B]
    return params


def _flow_updates(model: ShowerModel) -> list[LowRankUpdate]:
    """The flow's layers with a low-rank update (none unless prepared with ``flow="lora"``)."""
    return [m for m in model.flow.modules() if isinstance(m, LowRankUpdate)]


def _flow_parameters(model: ShowerModel, method: AdaptMethod) -> list[nn.Parameter]:
    """The flow's parameters to train (``scratch``: all); ``flow="lora"`` registers its updates first."""
    mode = "full" if method.name == "scratch" else method.flow
    if mode == "full":
        return list(model.flow.parameters())
    if mode == "bitfit":
        return _flow_bias_vectors(model)
    if mode == "lora":
        return _flow_bias_vectors(model) + _add_flow_updates(model, method.rank, method.alpha)
    return []


def _net_parameters(net: PointwiseNet | PointTransformer, method: AdaptMethod) -> list[nn.Parameter]:
    """The point-network parameters a non-peft method trains (by group and layer structure)."""
    if method.name in ("scratch", "full"):
        return [p for group in net.parameter_groups().values() for _, p in group]
    if method.name == "bitfit":
        return [p for _, p in net.bias_vectors()]
    if method.name == "bitfit-context":
        return [p for _, p in net.bias_vectors() + net.conditioning_maps()]
    if method.name == "top-k":
        try:
            return [p for _, p in net.top_layers(method.k)]
        except ValueError as err:
            raise InputError(str(err)) from None
    raise AssertionError(method.name)


def adapter_modules(net: nn.Module) -> dict[str, nn.Module]:
    """The peft tuner layers inside ``net`` (``{qualified module name: layer}``); empty if none."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft there can be no adapters
        return {}
    return {name: m for name, m in net.named_modules() if isinstance(m, BaseTunerLayer)}


def is_adapted(model: ShowerModel) -> bool:
    """True when the model holds adapters not yet merged: peft's in the point network, or low-rank
    updates of the flow."""
    return bool(adapter_modules(model.net)) or bool(_flow_updates(model))


def _adapter_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Parameters of the peft adapters: those of tuner layers that are not in their base layer."""
    out: list[nn.Parameter] = []
    for layer in adapter_modules(net).values():
        base = {id(p) for p in layer.get_base_layer().parameters()}
        out.extend(p for p in layer.parameters() if id(p) not in base)
    return out


def check_available(method: AdaptMethod) -> None:
    """Refuse a peft method where peft is not installed, before any work is done for it."""
    if method.is_peft and importlib.util.find_spec("peft") is None:
        raise InputError(f"method {method.name!r} needs the peft extra (pip install 'caloadapt[peft]'); "
                         "without it, e.g. bitfit:flow=bitfit is parameter-efficient too")


def _peft_config(method: AdaptMethod, target_modules: list[str]):
    check_available(method)
    from peft import IA3Config, LoHaConfig, LoraConfig

    if method.name in ("lora", "dora"):
        # A Kaiming-uniform, B zero (docs/model.md §6); no dropout, adapters on the Linears' weights only
        return LoraConfig(r=method.rank, lora_alpha=method.alpha, target_modules=target_modules,
                          lora_dropout=0.0, bias="none", use_dora=method.name == "dora")
    if method.name == "ia3":
        # one scale per output feature of every target (no "feed-forward" input scaling)
        return IA3Config(target_modules=target_modules, feedforward_modules=[])
    if method.name == "loha":
        return LoHaConfig(r=method.rank, alpha=method.alpha, target_modules=target_modules)
    raise AssertionError(method.name)


def _target_modules(net: PointwiseNet | PointTransformer, method: AdaptMethod) -> list[str]:
    try:
        return net.adapter_targets(method.targets, method.layers)
    except ValueError as err:
        raise InputError(str(err)) from None


@contextlib.contextmanager
def _seeded(seed: int | None):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def prepare(model: ShowerModel, method: AdaptMethod, *, seed: int | None = None,
            copy_model: bool = True) -> tuple[ShowerModel, list[str]]:
    """Build the model to train with ``method`` and the names of the parameters to train.

    Arguments:
        model: the pre-trained model (its architecture and normalisation are kept).
        method: the adaptation method.
        seed: seed of the random initialisation (``scratch``) or of the adapter initialisation
            (peft methods); None uses the global torch RNG.
        copy_model: work on a deep copy (default) and leave ``model`` untouched; False changes
            ``model`` in place for the peft methods.

    Returns:
        ``(model_to_train, trainable_names)``: the names are those of
        ``model_to_train.named_parameters()``; exactly these have ``requires_grad`` set. For the
        peft methods the point network holds peft tuner layers (its base weights are then named
        ``...linear.base_layer.weight``); :func:`merge` returns the plain model.
    """
    if is_adapted(model):
        raise InputError("the model already holds peft adapters; merge it before preparing it again")
    with _seeded(seed):
        if method.name == "scratch":
            target = ShowerModel(model.config)
            # the meaning of the inputs never changes: keep the pre-training feature normalisation
            for name in ("point_mean", "point_std", "stats_mean", "stats_std"):
                getattr(target, name).copy_(getattr(model, name))
            target.to(model.point_mean.device)
        else:
            target = copy.deepcopy(model) if copy_model else model
        if method.is_peft:
            net = target.net
            config = _peft_config(method, _target_modules(net, method))
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, net)
            chosen = _adapter_parameters(net)
        else:
            chosen = _net_parameters(target.net, method)
        chosen = chosen + _flow_parameters(target, method)
    ids = {id(p) for p in chosen}
    for p in target.parameters():
        p.requires_grad_(id(p) in ids)
    names = [name for name, p in target.named_parameters() if id(p) in ids]
    return target, names


def merge(model: ShowerModel, method: AdaptMethod | None = None, *, copy_model: bool = True) -> ShowerModel:
    """Fold the adapters (peft's, the flow's low-rank updates) into their layers: a plain model with the
    original state-dict keys.

    For the other methods (or a model without adapters) the model is returned as it is.
    ``method`` is only checked against the model (a peft method needs adapters to merge).
    With ``copy_model`` (default) the adapted model is left usable, else it is merged in place.
    All parameters of the merged model have ``requires_grad`` set again.
    """
    if not is_adapted(model):
        if method is not None and method.is_peft:
            raise InputError(f"method {method.name!r}: the model holds no peft adapters to merge")
        return model
    merged = copy.deepcopy(model) if copy_model else model
    net = merged.net
    for name in adapter_modules(net):  # module names are stable; fetch the copy's layers by name
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        layer = getattr(parent, child)
        layer.merge(safe_merge=True)
        setattr(parent, child, layer.get_base_layer())
    if hasattr(net, "peft_config"):
        del net.peft_config
    for hyper in _hyper_networks(merged):
        for i, layer in enumerate(hyper):
            if isinstance(layer, LowRankUpdate):
                hyper[i] = layer.merged()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


# -- reporting -------------------------------------------------------------------------------------


def parameter_report(model: ShowerModel, trainable_names: list[str] | set[str]) -> list[dict]:
    """Trainable and total parameters per group, so that percentage claims are checkable.

    Rows (``group``, ``trainable``, ``total``, ``percent`` = 100 trainable / total):

    - ``net.<group>`` for the parameter groups of the point network (``groups`` of its class;
      pre-trained tensors; for a peft model the frozen base weights);
    - ``net.adapter``: the peft adapter parameters (total = their number; 0 without adapters);
    - ``net``: all trainable point-network parameters including adapters, over the size of the
      point network itself (504,920 by default), the denominator of docs/model.md §6;
    - ``flow``: the flow, its low-rank updates counted as trainable, not in its size;
    - ``all``: everything trainable over the size of the whole model (point network + flow,
      without adapters).
    """
    names = set(trainable_names)
    by_id = _names_by_id(model)
    known = set(by_id.values())
    if names - known:
        raise InputError(f"trainable names not in the model: {sorted(names - known)[:3]}")

    def row(group: str, params: list[nn.Parameter], total: int | None = None) -> dict:
        n_total = sum(p.numel() for p in params) if total is None else total
        n_train = sum(p.numel() for p in params if by_id[id(p)] in names)
        return {"group": group, "trainable": n_train, "total": n_total,
                "percent": 100.0 * n_train / n_total if n_total else 0.0}

    groups = model.net.parameter_groups()
    rows = [row(f"net.{g}", [p for _, p in groups[g]]) for g in groups]
    adapter = _adapter_parameters(model.net)
    rows.append(row("net.adapter", adapter))
    base = [p for group in groups.values() for _, p in group]
    n_base = sum(p.numel() for p in base)
    rows.append(row("net", base + adapter, n_base))
    updates = [p for update in _flow_updates(model) for p in (update.A, update.B)]
    flow = [p for p in model.flow.parameters() if id(p) not in {id(u) for u in updates}]
    n_flow = sum(p.numel() for p in flow)
    rows.append(row("flow", flow + updates, n_flow))
    rows.append(row("all", base + adapter + flow + updates, n_base + n_flow))
    accounted = {id(p) for p in base + adapter + flow + updates}
    stray = [by_id[id(p)] for p in model.parameters() if id(p) not in accounted]
    if stray:
        raise AssertionError(f"parameters outside every group: {stray[:3]}")
    return rows


def format_report(rows: list[dict]) -> str:
    """The report of :func:`parameter_report` as an aligned text table."""
    lines = [f"{'group':<20} {'trainable':>12} {'total':>12} {'percent':>9}"]
    for r in rows:
        if r["group"] in ("net", "all"):
            lines.append("-" * 56)
        lines.append(f"{r['group']:<20} {r['trainable']:>12,} {r['total']:>12,} {r['percent']:>8.2f}%")
    return "\n".join(lines)
