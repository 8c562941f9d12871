"""The device half and the bundle format must work where TensorFlow is not installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import sys, importlib.abc
    HEAVY = ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization", "tf2onnx")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError("blocked " + name)
    sys.meta_path.insert(0, Block())
    """
)


def test_device_and_bundle_import_without_tensorflow():
    code = BLOCKER + textwrap.dedent(
        """
        import edgetl, edgetl.device, edgetl.bundle, edgetl.errors, edgetl.cli
        assert edgetl.cli.main(["--version"]) == 0
        heavy = [m for m in sys.modules if m.split(".")[0] in HEAVY]
        assert not heavy, heavy
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_host_side_reports_missing_tensorflow_clearly():
    code = BLOCKER + textwrap.dedent(
        """
        from edgetl.errors import DependencyError
        from edgetl.host import _tf
        try:
            _tf.tf()
        except DependencyError as exc:
            assert 'pip install "edgetl[host]"' in str(exc), exc
            print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr + proc.stdout
