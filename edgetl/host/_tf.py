"""The single place where the host side imports TensorFlow.

tensorflow-model-optimization supports Keras 2 only, so edgetl builds every host model
with ``tf_keras`` and sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is first imported
(after that, TensorFlow has already bound ``tf.keras`` to one implementation).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from edgetl.errors import DependencyError

_INSTALL_HINT = 'Install the host extra: pip install "edgetl[host]"'


def tf() -> ModuleType:
    """Return the ``tensorflow`` module, importing it with the settings edgetl needs."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tensorflow
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(f"edgetl's host side needs TensorFlow ({exc}). {_INSTALL_HINT}") from exc
    return tensorflow


def keras() -> ModuleType:
    """Return ``tf_keras`` (Keras 2), the Keras every edgetl host model is built with."""
    tf()
    try:
        import tf_keras
    except ImportError as exc:  # pragma: no cover
        raise DependencyError(f"edgetl's host side needs tf-keras ({exc}). {_INSTALL_HINT}") from exc
    return tf_keras
