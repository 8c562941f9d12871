"""Device side of edgetl: numpy, the stdlib and one runtime (onnxruntime or LiteRT).

    >>> from edgetl.device import Classifier, Personalizer
    >>> clf = Classifier.open("digits.edgetl", backend="litert", store="heads/")
    >>> clf.predict(images).labels
    >>> Personalizer(clf, "heads/").personalize(my_images, my_labels)

This package never imports TensorFlow; ``tests/device/test_lean_imports.py`` enforces it
by making TensorFlow unimportable. The runtimes are imported lazily. Modules whose names
start with ``_`` are internal and may change.
"""

from edgetl.device._advisor import Advice, advise
from edgetl.device._bench import bench_bundle
from edgetl.device._classifier import Classifier, Prediction
from edgetl.device._guard import GuardPolicy
from edgetl.device._head import HeadState, TrainSettings
from edgetl.device._lifecycle import Migration, migrate
from edgetl.device._personalizer import CommitResult, Personalizer
from edgetl.device._store import HeadStore
from edgetl.device._verify import Report, verify_bundle

__all__ = [
    "Classifier",
    "Prediction",
    "Personalizer",
    "CommitResult",
    "GuardPolicy",
    "HeadStore",
    "migrate",
    "Migration",
    "HeadState",
    "TrainSettings",
    "verify_bundle",
    "Report",
    "bench_bundle",
    "advise",
    "Advice",
]
