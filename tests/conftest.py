"""Shared fixtures: TensorFlow work is expensive, so trained models are session-scoped."""

from __future__ import annotations

import os

# Must be set before TensorFlow is imported anywhere in the test process.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest


@pytest.fixture(scope="session")
def digits_source():
    from edgetl.host.data import load_digits_dataset

    return load_digits_dataset((0, 1, 2, 3, 4))


@pytest.fixture(scope="session")
def digits_target():
    from edgetl.host.data import load_digits_dataset

    return load_digits_dataset((5, 6, 7, 8, 9))


@pytest.fixture(scope="session")
def source_run(tmp_path_factory, digits_source):
    """edgetl_cnn pretrained on digits 0-4, saved as an `edgetl pretrain` run directory."""
    from edgetl.host.pretrain import pretrain
    from edgetl.host.run import save_run
    from edgetl.host.transfer import TrainConfig

    result = pretrain(digits_source, TrainConfig(backbone="edgetl_cnn", epochs=15, seed=0))
    path = save_run(result, tmp_path_factory.mktemp("runs") / "source", kind="pretrain")
    return path, result


@pytest.fixture
def rng():
    return np.random.default_rng(0)
