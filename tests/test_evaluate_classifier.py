"""Tests of caloadapt.evaluate.classifier: the CaloChallenge DNN test on small synthetic inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caloadapt.errors import InputError
from caloadapt.evaluate.classifier import (
    CLASSIFIER_PRESETS,
    ClassifierSettings,
    ShowerClassifierNet,
    classifier_test,
)

N_PER_CLASS, DIM = 3000, 10


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny networks train fastest on one thread; OpenMP on a busy 2-core machine stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_identical_distributions_are_not_separated():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(N_PER_CLASS, DIM))
    generated = rng.normal(size=(N_PER_CLASS, DIM))
    result = classifier_test(reference, generated, settings="cpu", seed=1)
    assert result.auc == pytest.approx(0.5, abs=0.05)
    assert abs(result.jsd) < 0.1
    assert (result.n_train, result.n_test, result.n_validation) == (1800, 600, 600)
    assert 1 <= result.best_epoch <= 20


def test_separable_distributions_are_separated():
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(N_PER_CLASS, DIM))
    generated = rng.normal(size=(N_PER_CLASS, DIM))
    generated[:, 0] += 3.0
    result = classifier_test(reference, generated, settings="cpu", seed=1)
    assert result.auc > 0.9
    assert result.jsd > 0.5 and result.accuracy > 0.85


def test_results_are_seeded_and_leave_the_global_rng_alone():
    rng = np.random.default_rng(3)
    reference, generated = rng.normal(size=(400, 4)), rng.normal(0.3, 1.0, size=(400, 4))
    small = ClassifierSettings(n_hidden=16, n_layer=1, n_epochs=3, batch_size=100)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = classifier_test(reference, generated, settings=small, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())
    second = classifier_test(reference, generated, settings=small, seed=5)
    assert first.auc == second.auc and first.jsd == second.jsd


def test_official_settings_are_available():
    official = CLASSIFIER_PRESETS["official"]
    assert official == ClassifierSettings.official()
    assert (official.n_hidden, official.n_layer, official.learning_rate, official.batch_size,
            official.n_epochs, official.split, official.dtype) == (2048, 2, 2e-4, 1000, 50, (0.6, 0.2, 0.2),
                                                                  "float64")
    cpu = CLASSIFIER_PRESETS["cpu"]
    assert (cpu.n_hidden, cpu.n_epochs) == (256, 20)


def test_network_architecture():
    net = ShowerClassifierNet(input_dim=7, n_hidden=32, n_layer=2)
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(7, 32), (32, 32), (32, 32), (32, 1)]
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in net.modules()) == 3
    assert net(torch.zeros(5, 7)).shape == (5, 1)


def test_bad_inputs_raise_input_error():
    rng = np.random.default_rng(4)
    with pytest.raises(InputError, match="equal size"):
        classifier_test(rng.normal(size=(100, 3)), rng.normal(size=(90, 3)))
    with pytest.raises(InputError):
        classifier_test(rng.normal(size=(100, 3)), rng.normal(size=(100, 4)))
    with pytest.raises(InputError):
        classifier_test(rng.normal(size=(100, 3)), rng.normal(size=(100, 3)), settings="huge")
    with pytest.raises(InputError):
        classifier_test(rng.normal(size=(2, 3)), rng.normal(size=(2, 3)))
    bad = rng.normal(size=(100, 3))
    bad[0, 0] = np.nan
    with pytest.raises(InputError):
        classifier_test(bad, rng.normal(size=(100, 3)))
    with pytest.raises(InputError):
        ClassifierSettings(split=(0.8, 0.2, 0.2))
