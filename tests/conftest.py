"""Shared fixtures: TensorFlow work is expensive, so trained models are session-scoped."""

from __future__ import annotations

import os

# Must be set before TensorFlow is imported anywhere in the test process.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import atexit
import importlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from bundle_edits import TAIL_ROLES, without_tail  # noqa: F401  (TAIL_ROLES: imported from here by tests)

# Each test process (the suite runs two xdist workers) keeps edgetl's host cache (embeddings,
# advisor measurements) in its own directory: never the user's cache, never shared between workers.
os.environ["EDGETL_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="edgetl-test-cache-")
atexit.register(shutil.rmtree, _CACHE, True)


@pytest.fixture(scope="session")
def digits_source():
    from edgetl.data import load_digits_dataset

    return load_digits_dataset((0, 1, 2, 3, 4))


@pytest.fixture(scope="session")
def digits_target():
    from edgetl.data import load_digits_dataset

    return load_digits_dataset((5, 6, 7, 8, 9))


@pytest.fixture(scope="session")
def source_run(tmp_path_factory, digits_source):
    """edgetl_cnn pretrained on digits 0-4, saved as an `edgetl pretrain` run directory."""
    from edgetl.host._pretrain import pretrain
    from edgetl.host._run import save_run
    from edgetl.host._transfer import TrainConfig

    result = pretrain(digits_source, TrainConfig(backbone="edgetl_cnn", epochs=15, seed=0))
    path = save_run(result, tmp_path_factory.mktemp("runs") / "source", kind="pretrain")
    return path, result


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory, source_run, digits_target):
    """Target digits 5-9 transferred from the source run, exported fp32 + int8, both formats."""
    from edgetl.data import stratified_split
    from edgetl.host._export import export_bundle
    from edgetl.host._run import save_run
    from edgetl.host._transfer import TrainConfig, train_transfer

    halves = stratified_split(digits_target, val_fraction=0.0, test_fraction=0.5, seed=0)
    result = train_transfer(
        halves.train,
        TrainConfig(backbone=str(source_run[0]), epochs=60, learning_rate=1e-2, val_fraction=0.1, test_fraction=0.0),
    )
    base = tmp_path_factory.mktemp("device")
    run = save_run(result, base / "target")
    result = export_bundle(
        run, base / "digits.edgetl", quantize=["none", "int8"], calibration=halves.train, evaluation=halves.test
    )
    assert result.ok and not result.omitted, result.describe()
    bundle = result.bundle
    return bundle, halves


TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    """A script of ``tools/`` as a module: imported once and registered in ``sys.modules``
    (so its dataclasses resolve their annotations), like any other import."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


def informative_random_backbone(family: str, x: np.ndarray):
    """A keras.applications backbone with random weights whose BatchNorm statistics are
    estimated on ``x``: in inference mode with the initial statistics its embeddings
    vanish (~1e-13, refused by train_transfer), with estimated ones they are random but
    informative features, enough to exercise conversion and parity. No download needed."""
    from edgetl.host._backbones import create_backbone
    from edgetl.host._pretrain import recalibrate_batchnorm

    bb = create_backbone(family, x.shape[1:], weights=None)
    recalibrate_batchnorm(bb.model, x)
    return bb


@pytest.fixture(scope="session", autouse=True)
def manifests_follow_the_published_schema():
    """Every manifest the suite writes (through Manifest.to_json) validates against the
    JSON Schema shipped for integrators (edgetl/bundle/manifest.schema.json)."""
    import jsonschema

    import edgetl.bundle
    from edgetl.bundle import Manifest

    schema = json.loads((Path(edgetl.bundle.__file__).parent / "manifest.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    original = Manifest.to_json

    def checked(self):
        out = original(self)
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(out)]
        assert not errors, errors
        return out

    Manifest.to_json = checked
    yield validator
    Manifest.to_json = original


@pytest.fixture(scope="session")
def lifecycle_bundles(tmp_path_factory, digits_bundle, digits_source):
    """Bundles to migrate to (tests/device/test_lifecycle.py, tests/reliability/test_store_faults.py):
    v2 of the same run (same backbone) and a run on another backbone (edgetl_cnn pretrained on the
    same source digits with another seed). Fine-tuning the first backbone made one only while
    fine-tuning beat head-only on validation, which a change of the training split undid."""
    from edgetl import host
    from edgetl.host._pretrain import pretrain

    bundle, halves = digits_bundle
    base = tmp_path_factory.mktemp("lifecycle")
    run = bundle.manifest.producer["run"]
    same = host.export_bundle(run, base / "same_v2.edgetl", calibration=halves.train, version="2").bundle
    source = host.save_run(
        pretrain(digits_source, host.TrainConfig(backbone="edgetl_cnn", epochs=8, seed=1)),
        base / "source1",
        kind="pretrain",
    )
    config = host.TrainConfig(backbone=str(source), val_fraction=0.1, test_fraction=0.0)
    tuned = host.train(halves.train, config)
    tuned_run = host.save_run(tuned, base / "tuned")
    other = host.export_bundle(tuned_run, base / "tuned_v3.edgetl", calibration=halves.train, version="3").bundle
    assert same.manifest.backbone_id == bundle.manifest.backbone_id
    assert other.manifest.backbone_id != bundle.manifest.backbone_id
    return same, other


@pytest.fixture(scope="session")
def restyled_user(digits_bundle):
    """A new user whose digits are thicker and slanted: 50 to personalize with, the rest to test."""
    from edgetl.data import restyle_digits

    _, halves = digits_bundle
    x = restyle_digits(halves.test.x)
    labels = np.asarray([halves.test.class_names[i] for i in halves.test.y])
    order = np.random.default_rng(0).permutation(len(x))
    return (x[order[:50]], labels[order[:50]]), (x[order[50:]], labels[order[50:]])


@pytest.fixture(scope="session")
def tail_bundle(tmp_path_factory):
    """A bundle whose backbone ends in a user CNN's Dense(64, relu): it has a trainable tail
    (tools/tail_rates.py); with the guard tools' world of its digits (tools/guard_rates.py)."""
    path = load_tool("tail_rates").build_tail_bundle(tmp_path_factory.mktemp("tail"))
    from guard_rates import world

    return path, world(path)


@pytest.fixture(scope="session")
def tail_migration_bundles(tail_bundle, tmp_path_factory):
    """Bundles a store with a personalized tail migrates to, both with ``tail_bundle``'s
    backbone: v2 of the same run with its tail files, and v2 without them (its manifest and
    replay buffer as a bundle exported before tails existed, re-hashed)."""
    from guard_rates import digit_halves

    from edgetl.bundle import read_bundle
    from edgetl.device._store import bundle_identity
    from edgetl.host._export import export_bundle

    base = tmp_path_factory.mktemp("tail_migration")
    run = tail_bundle[0].parent / "tail_target_dense0"  # tools/tail_rates.build_tail_bundle's run
    with_tail = export_bundle(
        run, base / "tail_v2.edgetl", quantize=["none"], calibration=digit_halves().train, version="2"
    ).bundle
    head_only = without_tail(with_tail.path, base / "head_only_v2.edgetl", name="head_only_v2")
    old = read_bundle(tail_bundle[0])
    assert with_tail.manifest.backbone_id == head_only.manifest.backbone_id == old.manifest.backbone_id
    assert bundle_identity(with_tail) != bundle_identity(old), "a re-export is a new bundle to migrate to"
    return with_tail, read_bundle(head_only.path)


class Chromium:
    """Debian's headless Chromium, opening pages as a person would (tests of HTML reports)."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    )
    # Appended to a copy of the page only (reports themselves have no script): after the
    # load event, writes whether each <img> decoded ("ok": complete with a natural width).
    IMAGE_PROBE = (
        "<script>window.addEventListener('load',()=>{const p=document.createElement('pre');p.id='image-check';"
        "p.textContent=[...document.images].map(i=>i.complete&&i.naturalWidth>0?'ok':'broken').join(',');"
        "document.body.appendChild(p);});</script>"
    )

    def __init__(self, exe: str) -> None:
        self.exe = exe

    def _run(self, workdir: Path, *args: str) -> subprocess.CompletedProcess:
        profile = tempfile.mkdtemp(dir=workdir)
        return subprocess.run(
            [self.exe, *self.FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120
        )

    def dom(self, page: Path, workdir: Path) -> str:
        return self._run(workdir, "--dump-dom", page.as_uri()).stdout

    def image_states(self, page: Path, workdir: Path) -> list[str]:
        """'ok' or 'broken' for every <img> of ``page``, in order, as Chromium loaded them."""
        probe = workdir / f"probe-{page.name}"
        probe.write_text(page.read_text(encoding="utf-8").replace("</body>", self.IMAGE_PROBE + "</body>"))
        found = re.search(r'<pre id="image-check">([^<]*)</pre>', self.dom(probe, workdir))
        assert found, "the image probe did not run"
        return found.group(1).split(",") if found.group(1) else []

    def screenshot(self, page: Path, workdir: Path, size: str = "1200,1600") -> np.ndarray:
        shot = workdir / f"shot-{page.stem}.png"
        self._run(workdir, f"--window-size={size}", f"--screenshot={shot}", page.as_uri())
        from PIL import Image

        return np.asarray(Image.open(shot).convert("L"), dtype=np.float32)


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium; installed here when missing (root + Debian registry), else skip."""
    exe = shutil.which("chromium")
    if exe is None and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            capture_output=True,
            timeout=900,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed and could not be installed with apt-get")
    return Chromium(exe)
