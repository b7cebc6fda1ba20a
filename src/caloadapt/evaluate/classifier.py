"""The CaloChallenge binary classifier test: can a neural network tell generated from Geant4 showers?

A re-implementation of the DNN test of CaloChallenge/homepage ``code/evaluate.py``
(modes ``cls-low``, ``cls-low-normed``, ``cls-high``; docs/scoring.md §2.5):

1. Label Geant4 showers 1 and generated showers 0; shuffle each class and split it into
   train/test/validation fractions 0.6/0.2/0.2 (60k/20k/20k of 100k per class officially), then
   merge and shuffle the splits. Both samples must have the same size.
2. An MLP: Linear(d, n_hidden) + LeakyReLU + Dropout, ``n_layer`` more blocks
   Linear(n_hidden, n_hidden) + LeakyReLU + Dropout, then Linear(n_hidden, 1), trained on the logit
   with BCEWithLogitsLoss and Adam.
3. After each epoch the accuracy on the test split; the epoch with the best test accuracy is kept
   (training stops early at a test accuracy of 1).
4. The sigmoid outputs of the kept network are calibrated with isotonic regression fitted on the
   test split (clipped to [1e-6, 1 - 1e-6]); on the validation split the reported numbers are
   the ROC AUC of the calibrated outputs and ``JSD = (ln 2 - BCE_calibrated) / ln 2`` (an estimate
   of the Jensen-Shannon divergence in bits, in [0, 1]).

Two settings: :meth:`ClassifierSettings.official` (3 hidden layers of 2048, lr 2e-4, batch 1000,
50 epochs, float64, as evaluate.py) and the CPU-sized default :meth:`ClassifierSettings.cpu`
(256 hidden units, 20 epochs, float32), chosen with ``settings="official"`` or ``"cpu"``
(``dataclasses.replace`` adjusts single fields). Unlike the
official script, every random choice (split, initialisation, batch order) is seeded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InputError

__all__ = ["ClassifierSettings", "ClassifierResult", "ShowerClassifierNet", "classifier_test",
           "CLASSIFIER_PRESETS"]

#: calibrated probabilities are clipped to [CLIP, 1 - CLIP] (evaluate.py calibrate_classifier)
CALIBRATION_CLIP = 1e-6


@dataclass(frozen=True)
class ClassifierSettings:
    """Hyper-parameters of the classifier test.

    Attributes:
        n_hidden: width of the hidden layers (official 2048).
        n_layer: hidden blocks after the first (official 2, i.e. 3 hidden layers).
        dropout: dropout probability (official 0).
        learning_rate: Adam learning rate (official 2e-4).
        batch_size: mini-batch size (official 1000).
        n_epochs: maximum number of epochs (official 50).
        split: train/test/validation fractions of each class (official 0.6/0.2/0.2).
        dtype: ``"float32"`` or ``"float64"`` (official: float64).
    """

    n_hidden: int = 256
    n_layer: int = 2
    dropout: float = 0.0
    learning_rate: float = 2e-4
    batch_size: int = 1000
    n_epochs: int = 20
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    dtype: str = "float32"

    @classmethod
    def official(cls) -> ClassifierSettings:
        """The defaults of the official evaluate.py (``--cls_*`` options)."""
        return cls(n_hidden=2048, n_layer=2, dropout=0.0, learning_rate=2e-4, batch_size=1000,
                   n_epochs=50, split=(0.6, 0.2, 0.2), dtype="float64")

    @classmethod
    def cpu(cls) -> ClassifierSettings:
        """CPU-sized defaults: 256 hidden units, 20 epochs, float32; otherwise official."""
        return cls()

    def __post_init__(self) -> None:
        if self.n_hidden < 1 or self.n_layer < 0 or self.batch_size < 1 or self.n_epochs < 1:
            raise InputError("classifier sizes and epochs must be positive")
        if not 0 <= self.dropout < 1 or self.learning_rate <= 0:
            raise InputError("classifier dropout must be in [0, 1) and the learning rate positive")
        if len(self.split) != 3 or any(f <= 0 for f in self.split) or sum(self.split) > 1 + 1e-9:
            raise InputError(f"split must be three positive fractions summing to <= 1, got {self.split}")
        if self.dtype not in ("float32", "float64"):
            raise InputError(f"classifier dtype must be 'float32' or 'float64', got {self.dtype!r}")


#: named settings: ``"cpu"`` (default) and ``"official"``
CLASSIFIER_PRESETS: dict[str, ClassifierSettings] = {"cpu": ClassifierSettings.cpu(),
                                                     "official": ClassifierSettings.official()}


@dataclass(frozen=True)
class ClassifierResult:
    """Outcome of one classifier test (numbers on the validation split unless stated).

    Attributes:
        auc: ROC AUC of the calibrated outputs (0.5: indistinguishable, 1: separable).
        jsd: (ln 2 - BCE of the calibrated outputs) / ln 2.
        accuracy: accuracy of the calibrated outputs.
        auc_uncalibrated: ROC AUC of the raw sigmoid outputs.
        best_epoch: the kept epoch, counted from 1.
        test_accuracy: test accuracy of the kept epoch.
        n_train, n_test, n_validation: showers per class in each split.
        settings: the settings used.
    """

    auc: float
    jsd: float
    accuracy: float
    auc_uncalibrated: float
    best_epoch: int
    test_accuracy: float
    n_train: int
    n_test: int
    n_validation: int
    settings: ClassifierSettings


class ShowerClassifierNet(nn.Module):
    """The official DNN: d -> n_hidden, n_layer x (n_hidden -> n_hidden), -> 1 logit (LeakyReLU)."""

    def __init__(self, input_dim: int, n_hidden: int, n_layer: int, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(input_dim, n_hidden), nn.LeakyReLU(), nn.Dropout(dropout)]
        for _ in range(n_layer):
            layers += [nn.Linear(n_hidden, n_hidden), nn.LeakyReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(n_hidden, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logit of "Geant4", shape ``(batch, 1)``."""
        return self.layers(x)


def _split(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sizes per class: ``int(n * f)`` for train and test, the rest for validation (np.split)."""
    n_train, n_test = (np.array([n, n]) * np.array(fractions[:2])).astype(int)
    n_val = n - n_train - n_test
    return int(n_train), int(n_test), int(n_val)


def _predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).reshape(-1) for i in range(0, len(x), batch_size)])


def _accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float(np.mean(np.round(probabilities) == labels))


def classifier_test(reference_inputs: np.ndarray, generated_inputs: np.ndarray, *,
                    settings: ClassifierSettings | str = "cpu", seed: int = 0,
                    device: str | torch.device = "cpu",
                    progress: Callable[[int, float, float], None] | None = None) -> ClassifierResult:
    """Train the classifier Geant4 (reference, label 1) vs generated (label 0) and score it.

    Args:
        reference_inputs: ``(N, d)`` inputs of the reference showers, e.g.
            :func:`~caloadapt.evaluate.calochallenge.low_level_vector` or
            :func:`~caloadapt.evaluate.calochallenge.high_level_vector`.
        generated_inputs: ``(N, d)`` inputs of the generated showers (same N, as officially required).
        settings: ``"cpu"`` (default), ``"official"`` or a :class:`ClassifierSettings`.
        seed: seeds the split, the initialisation and the batch order (global RNG states untouched).
        device: torch device to train on.
        progress: optional callback ``(epoch, mean train loss, test accuracy)`` after each epoch.

    Raises:
        InputError: different sample sizes or dimensions, non-finite inputs, or a split too small.
    """
    if isinstance(settings, str):
        if settings not in CLASSIFIER_PRESETS:
            raise InputError(f"unknown classifier settings {settings!r}; expected one of "
                             f"{sorted(CLASSIFIER_PRESETS)}")
        settings = CLASSIFIER_PRESETS[settings]
    ref = np.asarray(reference_inputs)
    gen = np.asarray(generated_inputs)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise InputError(f"classifier inputs must be (N, d) with the same d, got {ref.shape} and {gen.shape}")
    if len(ref) != len(gen):
        raise InputError(f"the classifier test needs samples of equal size, got {len(ref)} reference and "
                         f"{len(gen)} generated showers")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(gen))):
        raise InputError("classifier inputs contain NaN or infinite values")
    n_train, n_test, n_val = _split(len(ref), settings.split)
    if min(n_train, n_test, n_val) < 1:
        raise InputError(f"{len(ref)} showers per class are too few for the split {settings.split}")

    device = torch.device(device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[settings.dtype]
    rng = np.random.default_rng(seed)
    ref_parts = np.split(ref[rng.permutation(len(ref))], [n_train, n_train + n_test])
    gen_parts = np.split(gen[rng.permutation(len(gen))], [n_train, n_train + n_test])

    def merged(i: int) -> tuple[torch.Tensor, np.ndarray]:
        x = np.concatenate([gen_parts[i], ref_parts[i]])
        y = np.concatenate([np.zeros(len(gen_parts[i])), np.ones(len(ref_parts[i]))])
        order = rng.permutation(len(x))
        return torch.as_tensor(x[order], dtype=dtype, device=device), y[order]

    (x_train, y_train), (x_test, y_test), (x_val, y_val) = merged(0), merged(1), merged(2)
    t_train = torch.as_tensor(y_train, dtype=dtype, device=device).unsqueeze(1)

    fork_devices = [] if device.type != "cuda" else [device]
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = ShowerClassifierNet(ref.shape[1], settings.n_hidden, settings.n_layer,
                                    settings.dropout).to(device=device, dtype=dtype)
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
        loss_fn = nn.BCEWithLogitsLoss()
        order_generator = torch.Generator().manual_seed(seed)
        best_accuracy, best_epoch, best_state = -math.inf, 0, None
        for epoch in range(settings.n_epochs):
            model.train()
            permutation = torch.randperm(len(x_train), generator=order_generator).to(device)
            losses = []
            for i in range(0, len(x_train), settings.batch_size):
                index = permutation[i:i + settings.batch_size]
                loss = loss_fn(model(x_train[index]), t_train[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
            test_prob = torch.sigmoid(_predict_logits(model, x_test, settings.batch_size)).cpu().numpy()
            accuracy = _accuracy(y_test, test_prob)
            if progress is not None:
                progress(epoch + 1, float(np.mean(losses)), accuracy)
            if accuracy > best_accuracy:
                best_accuracy, best_epoch = accuracy, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
            if accuracy == 1.0:
                break
    model.load_state_dict(best_state)
    test_prob = torch.sigmoid(_predict_logits(model, x_test, settings.batch_size)).double().cpu().numpy()
    val_prob = torch.sigmoid(_predict_logits(model, x_val, settings.batch_size)).double().cpu().numpy()
    return _calibrated_scores(test_prob, y_test, val_prob, y_val, best_epoch, best_accuracy,
                              (n_train, n_test, n_val), settings)


def _calibrated_scores(test_prob: np.ndarray, y_test: np.ndarray, val_prob: np.ndarray,
                       y_val: np.ndarray, best_epoch: int, best_accuracy: float,
                       sizes: tuple[int, int, int], settings: ClassifierSettings) -> ClassifierResult:
    """Isotonic calibration on the test split; AUC, JSD and accuracy on the validation split."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import roc_auc_score

    calibrator = IsotonicRegression(out_of_bounds="clip", y_min=CALIBRATION_CLIP,
                                    y_max=1.0 - CALIBRATION_CLIP).fit(test_prob, y_test)
    calibrated = calibrator.predict(val_prob)
    # binary cross-entropy of the calibrated probabilities (torch.nn.BCELoss; no log clamp is
    # reached since the probabilities are clipped to [1e-6, 1 - 1e-6])
    bce = -np.mean(y_val * np.log(calibrated) + (1.0 - y_val) * np.log(1.0 - calibrated))
    return ClassifierResult(
        auc=float(roc_auc_score(y_val, calibrated)),
        jsd=float((math.log(2.0) - bce) / math.log(2.0)),
        accuracy=_accuracy(y_val, calibrated),
        auc_uncalibrated=float(roc_auc_score(y_val, val_prob)),
        best_epoch=best_epoch,
        test_accuracy=float(best_accuracy),
        n_train=sizes[0], n_test=sizes[1], n_validation=sizes[2],
        settings=settings,
    )

