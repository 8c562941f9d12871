"""The single place where the host side imports TensorFlow.

tensorflow-model-optimization supports Keras 2 only, so edgetl builds every host model
with ``tf_keras`` and sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is first imported
(after that, TensorFlow has already bound ``tf.keras`` to one implementation).
"""

from __future__ import annotations

import os
import sys
import warnings
from types import ModuleType

from edgetl._quiet import native_output_silenced, quiet_python_loggers, verbose
from edgetl.errors import DependencyError

_INSTALL_HINT = 'Install the host extra: pip install "edgetl[host]"'


def tf() -> ModuleType:
    """Return the ``tensorflow`` module, importing it with the settings edgetl needs.

    The first import is quiet (unless ``EDGETL_VERBOSE``): TensorFlow's C++ side prints its
    CUDA probe ("failed call to cuInit", "Could not find cuda drivers") and absl's
    "All log messages before absl::InitializeLog()" straight to file descriptor 2, and its
    Python loggers warn about tf.function retracing on every ``predict`` of a new model.
    """

    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose() else "3")
    try:
        with warnings.catch_warnings(), native_output_silenced():
            warnings.simplefilter("ignore")
            import tensorflow

            # The CUDA probe runs when devices are first listed, not at import; do it here,
            # silenced. Listing physical devices does not initialise the runtime, so logical
            # CPU devices (configure_cpu_devices) can still be set up afterwards.
            tensorflow.config.list_physical_devices("GPU")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(f"edgetl's host side needs TensorFlow ({exc}). {_INSTALL_HINT}") from exc
    quiet_python_loggers()
    if not verbose():
        tensorflow.get_logger().setLevel("ERROR")
        tensorflow.autograph.set_verbosity(0)
    return tensorflow


def keras() -> ModuleType:
    """Return ``tf_keras`` (Keras 2), the Keras every edgetl host model is built with."""
    tf()
    try:
        import tf_keras
    except ImportError as exc:  # pragma: no cover
        raise DependencyError(f"edgetl's host side needs tf-keras ({exc}). {_INSTALL_HINT}") from exc
    return tf_keras
