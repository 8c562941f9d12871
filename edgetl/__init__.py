"""edgetl: transfer learning from the host to the edge.

Host side (needs the ``host`` extra, TensorFlow): :mod:`edgetl.host`.
Device side (numpy and one runtime, never TensorFlow): :mod:`edgetl.device`.
The two halves meet only in the bundle format, :mod:`edgetl.bundle`; both load data
with :mod:`edgetl.data`. Architecture: docs/architecture.md.
"""

from edgetl.errors import (
    BackboneError,
    BundleError,
    DataError,
    DependencyError,
    EdgeTLError,
    InputError,
    StoreError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "EdgeTLError",
    "InputError",
    "DataError",
    "BackboneError",
    "BundleError",
    "StoreError",
    "DependencyError",
]
