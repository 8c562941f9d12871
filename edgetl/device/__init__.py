"""Device side of edgetl: numpy, the stdlib and one runtime (onnxruntime or LiteRT).

This package must never import TensorFlow; ``tests/device/test_lean_imports.py`` enforces
it by making TensorFlow unimportable. The runtimes are imported lazily.
"""
