"""Bundle reading refuses every malformed or tampered bundle with a clear BundleError."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgetl.bundle import read_bundle, validate_manifest, write_bundle
from edgetl.errors import BundleError


def _manifest():
    return {
        "name": "tiny",
        "labels": ["a", "b"],
        "input_spec": {"shape": [3], "dtype": "float32"},
        "embedding_size": 3,
        "head": {"max_classes": 4},
        "artifacts": [{"file": "head_init.npz", "role": "head_init", "format": "npz", "precision": "fp32"}],
    }


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "tiny.edgetl", _manifest(), {"head_init.npz": b"0123456789"})


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_round_trip(bundle):
    b = read_bundle(bundle.path)
    assert b.manifest == bundle.manifest and b.labels == ["a", "b"]
    assert b.artifact("head_init", "npz").read_bytes() == b"0123456789"
    assert oct(os.stat(bundle.path).st_mode)[-3:] == "755"


def test_hash_mismatch(bundle):
    (bundle.path / "head_init.npz").write_bytes(b"0123456780")  # same size, one byte flipped
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(bundle.path)


def test_truncated_file(bundle):
    (bundle.path / "head_init.npz").write_bytes(b"01234")
    with pytest.raises(BundleError, match="truncated"):
        read_bundle(bundle.path)


def test_missing_file(bundle):
    (bundle.path / "head_init.npz").unlink()
    with pytest.raises(BundleError, match="missing"):
        read_bundle(bundle.path)


@pytest.mark.parametrize("bad", ["../evil.npz", "/etc/passwd", "sub/dir.npz", ".hidden", "..", ""])
def test_path_leaving_the_bundle(bundle, bad):
    _edit_manifest(bundle.path, lambda m: m["artifacts"][0].update(file=bad))
    with pytest.raises(BundleError, match="plain file names"):
        read_bundle(bundle.path)


def test_symlink_pointing_outside(bundle, tmp_path):
    outside = tmp_path / "outside.npz"
    outside.write_bytes(b"0123456789")
    (bundle.path / "head_init.npz").unlink()
    (bundle.path / "head_init.npz").symlink_to(outside)
    with pytest.raises(BundleError, match="symlink"):
        read_bundle(bundle.path)


def test_unknown_schema_version(bundle):
    _edit_manifest(bundle.path, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        read_bundle(bundle.path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(labels=["a"]), "labels"),
        (lambda m: m.update(labels="ab"), "labels must be list"),
        (lambda m: m["artifacts"][0].update(role="virus"), "role must be one of"),
        (lambda m: m["artifacts"][0].update(size=True), "size must be int"),
        (lambda m: m["input_spec"].update(shape=[10**9]), "input_spec.shape"),
        (lambda m: m["head"].update(max_classes=1), "max_classes"),
        (lambda m: m.pop("artifacts"), "artifacts is missing"),
    ],
)
def test_invalid_manifest_fields(bundle, edit, message):
    _edit_manifest(bundle.path, edit)
    with pytest.raises(BundleError, match=message):
        read_bundle(bundle.path)


def test_not_json_and_not_a_bundle(bundle, tmp_path):
    (bundle.path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(bundle.path)
    with pytest.raises(BundleError, match="not a directory"):
        read_bundle(tmp_path / "nope.edgetl")


def test_existing_output_is_not_overwritten(bundle):
    before = (bundle.path / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(bundle.path, _manifest(), {"head_init.npz": b"other"})
    assert (bundle.path / "manifest.json").read_bytes() == before
    assert not [p for p in bundle.path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_schema_1_bundles_still_load_and_unknown_versions_are_refused_clearly(bundle):
    """Bundles written by edgetl 0.1 (schema 1) load; a newer schema says what to do."""
    m = json.loads((bundle.path / "manifest.json").read_text())
    m["schema_version"] = 1
    (bundle.path / "manifest.json").write_text(json.dumps(m))
    assert read_bundle(bundle.path).manifest.schema_version == 1
    m["schema_version"] = 7
    (bundle.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"schema_version 7 is not supported; this edgetl reads versions \[1, 2, 3\]"):
        read_bundle(bundle.path)


def test_the_published_json_schema_accepts_what_edgetl_writes_and_refuses_what_it_refuses(bundle):
    """The schema integrators validate with agrees with edgetl's own validator on a real
    manifest and on broken ones (the check can fail)."""
    import jsonschema

    import edgetl.bundle

    schema = json.loads((Path(edgetl.bundle.__file__).parent / "manifest.schema.json").read_text())
    good = json.loads((bundle.path / "manifest.json").read_text())
    jsonschema.validate(good, schema)
    for field, value in (("labels", ["only"]), ("schema_version", 9), ("embedding_size", 0)):
        broken = {**good, field: value}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
        with pytest.raises(BundleError):
            validate_manifest(broken)
    broken = json.loads(json.dumps(good))
    broken["artifacts"][0]["file"] = "../escape.onnx"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_a_failed_rows_table_says_what_failed_when_its_measure_passed():
    """issue 22: `verify --data` printed `top-1 agreement 1.000 >= 0.9  0.7667  NO` for a file
    that failed on its accuracy drop: the row now names the failure beside the passing measure."""
    from edgetl.bundle import Check, format_checks

    base = dict(file="model.int8.tflite", role="fused", format="tflite", precision="int8", measure="top1_agreement")
    dropped = Check(**base, ok=False, value=1.0, limit=0.9, extra={"accuracy_drop": 0.047, "max_accuracy_drop": 0.01})
    gated = Check(**base, ok=False, value=0.99, limit=0.9, extra={"outcome": "fail", "gate": "fidelity: 40 lost"})
    low = Check(**base, ok=False, value=0.5, limit=0.9)  # its own measure failed: the row says so already
    passed = Check(**base, ok=True, value=1.0, limit=0.9, extra={"accuracy_drop": 0.0, "max_accuracy_drop": 0.01})
    rows = format_checks([dropped, gated, low, passed]).splitlines()[1:]
    assert "top-1 agreement 1.000 >= 0.9; accuracy 4.7 points below fp32 > 1" in rows[0] and rows[0].endswith("NO")
    assert "; evidence gate: fail" in rows[1]
    assert "top-1 agreement 0.500 < 0.9 " in rows[2] + " " and ";" not in rows[2]
    assert ";" not in rows[3] and rows[3].endswith("yes")
