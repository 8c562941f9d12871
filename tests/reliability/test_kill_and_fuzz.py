"""Bounded runs of tools/kill_test.py and tools/fuzz_bundle.py (the long runs are the tools)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetl.bundle import unpack_bundle, validate_manifest
from edgetl.errors import BundleError

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_store_survives_sigkill_during_commits(tmp_path, digits_bundle):
    stats = _tool("kill_test").run(digits_bundle[0].path, tmp_path / "store", kills=25, seed=0)
    assert stats["survived"] == 25 and stats["versions_lost"] == 0
    assert stats["commits_seen"] > 25  # the kills landed among real commits


def test_fuzzed_bundles_and_archives_only_raise_bundle_errors(digits_bundle):
    stats = _tool("fuzz_bundle").run(digits_bundle[0].path, cases=220, seed=0)  # 20 per mutation kind
    outcomes = stats["outcomes"]
    for kind in (
        "truncate",
        "missing_file",
        "hostile_path",
        "symlink_outside",
        "deep_nesting",
        "zip_slip",
        "corrupt_archive",
    ):
        assert outcomes.get(f"{kind}:refused") == 20 and f"{kind}:opened" not in outcomes, kind
    assert outcomes.get("unknown_fields:opened") == 20  # forward compatible: ignored, not refused


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_manifest_validation_never_raises_anything_but_bundle_error(value):
    try:
        validate_manifest(value)
    except BundleError as exc:
        assert str(exc)


VALID = {
    "schema_version": 1,
    "name": "tiny",
    "labels": ["a", "b"],
    "input_spec": {"shape": [3], "dtype": "float32"},
    "embedding_size": 3,
    "head": {"max_classes": 4},
    "artifacts": [
        {"file": "w.npz", "role": "head_init", "format": "npz", "precision": "fp32", "sha256": "0" * 64, "size": 1}
    ],
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["schema_version", "name", "labels", "input_spec", "embedding_size", "head", "artifacts"]), JSON)
def test_each_manifest_field_with_any_json_value(field, value):
    manifest = json.loads(json.dumps(VALID))
    manifest[field] = value
    try:
        validate_manifest(manifest)
    except BundleError as exc:
        assert str(exc)


def test_zip_slip_entries_write_nothing_outside(tmp_path, digits_bundle):
    import zipfile

    from edgetl.bundle import pack_bundle

    archive = pack_bundle(digits_bundle[0].path, tmp_path / "b.zip")
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("../../escaped.txt", b"x")
    target = tmp_path / "deep" / "er" / "u.edgetl"
    with pytest.raises(BundleError, match="plain file names"):
        unpack_bundle(archive, target)
    assert not list(tmp_path.rglob("escaped.txt")) and not target.exists()
    clean = pack_bundle(digits_bundle[0].path, tmp_path / "clean.zip")
    assert unpack_bundle(clean, tmp_path / "ok.edgetl").labels == digits_bundle[0].labels


@pytest.mark.parametrize("value", [7, "abc", {"name": "x"}, None, [1] * 65])
def test_artifact_tensor_lists_of_the_wrong_type(value):
    """Regression: the long fuzz run found `inputs: 7` raising TypeError instead of BundleError."""
    manifest = json.loads(json.dumps(VALID))
    manifest["artifacts"][0]["inputs"] = value
    with pytest.raises(BundleError, match="inputs"):
        validate_manifest(manifest)
