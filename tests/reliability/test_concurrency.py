"""Predictions from several threads while personalization commits: every prediction must
come from one whole head version, never a mix of two."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from edgetl.device._classifier import Classifier
from edgetl.device._head import HeadState
from edgetl.device._store import HeadStore

THREADS, COMMITS = 4, 30


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
def test_predictions_during_commits_each_use_one_whole_head(tmp_path, digits_bundle, backend):
    bundle, halves = digits_bundle
    clf = Classifier.open(bundle.path, backend=backend)
    store = HeadStore(tmp_path / "store", bundle)
    x = halves.test.x[:8]
    emb = clf.embed(x)
    factory = HeadState.factory(bundle)
    # Version v shifts every weight by v * 0.01: any mix of two versions is detectable.
    heads = {0: factory}
    for v in range(1, COMMITS + 1):
        heads[v] = replace(
            factory, W=factory.W + np.float32(0.01 * v) * np.sign(factory.W), b=factory.b + np.float32(0.01 * v)
        )
    expected = {v: clf.head_runtime.probabilities(h, emb)[:, :5] for v, h in heads.items()}
    expected[0] = clf.predict(x).probabilities  # version 0 answers through the fused model

    seen: list[tuple[int, np.ndarray]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                result = clf.predict(x)
                seen.append((result.head_version, result.probabilities))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for v in range(1, COMMITS + 1):
        number = store.commit(heads[v])
        clf.set_head(heads[v], number)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(seen) > THREADS * 2
    versions = {v for v, _ in seen}
    assert len(versions) > 2  # predictions really overlapped several commits
    for version, probs in seen:
        np.testing.assert_allclose(probs, expected[version], atol=1e-5)
    print(
        f"{backend}: {len(seen)} predictions from {THREADS} threads across {len(versions)} head versions, each from "
        "one whole version"
    )
