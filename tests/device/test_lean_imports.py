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
        import edgetl.device._classifier, edgetl.device._personalizer, edgetl.device._store
        import edgetl.device._verify, edgetl.device._runtimes, edgetl.device._head
        import edgetl.data  # the one data path, shared with the host
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


def test_device_cli_runs_with_tensorflow_blocked(digits_bundle, tmp_path):
    """predict, personalize and store, end to end, in a process where TensorFlow cannot load.
    (The guard is tested elsewhere; --margin 1 makes the commit certain here.)"""
    import numpy as np

    from edgetl.data import restyle_digits

    bundle, halves = digits_bundle
    np.savez(
        tmp_path / "user.npz",
        x=restyle_digits(halves.test.x[:60]),
        y=halves.test.y[:60],
        class_names=np.array(halves.test.class_names),
    )
    np.save(tmp_path / "one.npy", halves.test.x[0])
    code = BLOCKER + textwrap.dedent(
        f"""
        from edgetl.cli import main
        store = {str(tmp_path / "store")!r}
        assert main(["predict", {str(bundle.path)!r}, {str(tmp_path / "one.npy")!r}]) == 0
        bundle, data = {str(bundle.path)!r}, {str(tmp_path / "user.npz")!r}
        args = ["--data", data, "--store", store, "--backend", "litert", "--margin", "1"]
        assert main(["personalize", bundle, *args]) == 0
        assert main(["store", "history", "--store", store]) == 0
        one = {str(tmp_path / "one.npy")!r}
        assert main(["predict", bundle, one, "--store", store, "--backend", "onnxruntime"]) == 0
        assert main(["store", "reset", "--store", store]) == 0
        heavy = [m for m in sys.modules if m.split(".")[0] in HEAVY]
        assert not heavy, heavy
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:] + proc.stdout[-2000:]
    assert "head version 1" in proc.stdout and "committed; active version 1" in proc.stdout
