"""Edits of real bundles for tests: models rewritten in ONNX, the manifest re-hashed
(write_bundle), so every hash is valid and only the behaviour is wrong (or slow)."""

from __future__ import annotations

import json

import numpy as np

from edgetl.bundle import write_bundle


def _rewrite_output(model_bytes: bytes, extra) -> bytes:
    """The model with its output renamed to ``orig`` and ``extra(graph, input, "orig", output)``
    adding the nodes that compute the real output from it."""
    import onnx

    m = onnx.load_from_string(model_bytes)
    g = m.graph
    inp, out = g.input[0].name, g.output[0].name
    for node in g.node:
        node.output[:] = ["orig" if o == out else o for o in node.output]
    extra(g, inp, "orig", out)
    return m.SerializeToString()


def slowed(model_bytes: bytes, steps: int = 24, width: int = 1024) -> bytes:
    from onnx import helper as h
    from onnx import numpy_helper

    def extra(g, inp, orig, out):
        g.initializer.extend(
            [
                numpy_helper.from_array(np.full((1, width), 0.01, np.float32), "slow_a"),
                numpy_helper.from_array((np.eye(width) * 0.5).astype(np.float32), "slow_b"),
                numpy_helper.from_array(np.zeros((1,), np.float32), "slow_zero"),
            ]
        )
        g.initializer.append(numpy_helper.from_array(np.array([-1, 1], np.int64), "slow_shape"))
        nodes = [
            h.make_node("ReduceMean", [inp], ["slow_mean"], axes=[1, 2, 3], keepdims=1),
            h.make_node("Reshape", ["slow_mean", "slow_shape"], ["slow_m"]),  # (n, 1)
        ]
        nodes.append(h.make_node("MatMul", ["slow_m", "slow_a"], ["slow_0"]))  # (n, width), depends on the input
        for i in range(steps):
            nodes.append(h.make_node("MatMul", [f"slow_{i}", "slow_b"], [f"slow_{i + 1}"]))
        nodes += [
            h.make_node("ReduceMean", [f"slow_{steps}"], ["slow_r"], axes=[1], keepdims=1),
            h.make_node("Mul", ["slow_r", "slow_zero"], ["slow_z"]),
            h.make_node("Add", [orig, "slow_z"], [out]),
        ]
        g.node.extend(nodes)

    return _rewrite_output(model_bytes, extra)


def swapped(model_bytes: bytes, classes: int) -> bytes:
    from onnx import helper as h
    from onnx import numpy_helper

    def extra(g, inp, orig, out):
        g.initializer.append(numpy_helper.from_array(np.roll(np.arange(classes), 1).astype(np.int64), "perm"))
        g.node.append(h.make_node("Gather", [orig, "perm"], [out], axis=1))

    return _rewrite_output(model_bytes, extra)


def scaled(model_bytes: bytes, factor: float) -> bytes:
    """The model's output multiplied by ``factor`` (a converter that got a scale wrong)."""
    from onnx import helper as h
    from onnx import numpy_helper

    def extra(g, inp, orig, out):
        g.initializer.append(numpy_helper.from_array(np.array([factor], np.float32), "scale_factor"))
        g.node.append(h.make_node("Mul", [orig, "scale_factor"], [out]))

    return _rewrite_output(model_bytes, extra)


def rebuilt(src, out, changes, artifact_changes=None):
    """``src`` with some files replaced (``changes``: name -> function of the old bytes) and, with
    ``artifact_changes`` (name -> function editing its manifest entry in place), their entries
    edited, re-hashed."""
    manifest = json.loads((src.path / "manifest.json").read_text())
    manifest.pop("signature", None)
    files = {a["file"]: (src.path / a["file"]).read_bytes() for a in manifest["artifacts"]}
    for name, change in changes.items():
        files[name] = change(files[name])
    for entry in manifest["artifacts"]:
        (artifact_changes or {}).get(entry["file"], lambda e: None)(entry)
    return write_bundle(out, manifest, files)


def npz_edited(change):
    """A ``rebuilt`` change of an ``.npz`` file: ``change`` maps its arrays (a dict) to new ones."""

    def edit(content: bytes) -> bytes:
        import io

        with np.load(io.BytesIO(content)) as z:
            arrays = change({k: z[k] for k in z.files})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    return edit


TAIL_ROLES = ("trunk", "tail", "tail_infer", "tail_train_loop", "tail_init")


def without_tail(src_path, out, tail=None, **manifest_fields):
    """The bundle at ``src_path`` with its tail taken out, re-hashed at ``out``: no tail files, no
    trunk activations in replay.npz, the manifest's ``tail`` section set to ``tail`` (``None``:
    removed) and ``manifest_fields`` (e.g. ``name``) replaced. The backbone and head are unchanged."""

    from edgetl.bundle._tail import REPLAY_KEY

    manifest = json.loads((src_path / "manifest.json").read_text())
    manifest.pop("signature", None)
    manifest.pop("tail", None)
    if tail is not None:
        manifest["tail"] = tail
    manifest.update(manifest_fields)
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["role"] not in TAIL_ROLES]
    files = {a["file"]: (src_path / a["file"]).read_bytes() for a in manifest["artifacts"]}
    replay = next((a["file"] for a in manifest["artifacts"] if a["role"] == "replay"), None)
    if replay is not None:
        files[replay] = npz_edited(lambda arrays: {k: v for k, v in arrays.items() if k != REPLAY_KEY})(files[replay])
    return write_bundle(out, manifest, files)
