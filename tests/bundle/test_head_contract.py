"""The head's training rule as a client without Python follows it: batch order, SGD step, defaults."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from edgetl.bundle._head import (
    SGD_LR_IN_GRAPH_SINCE_SCHEMA,
    TRAINING_DEFAULTS,
    graph_learning_rate,
    sgd_step_size,
    step_plan,
)


def test_step_plan_test_vector_of_the_docs():
    """The vector written in step_plan's docstring and in docs/integration.md."""
    order, row_weight = step_plan(5, 2, 2, 0)
    assert order == [[0, 1], [4, 2], [3, 3], [0, 4], [3, 2], [1, 1]]
    assert row_weight == [[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0]]


def xorshift_reference(n, epochs, batch_size, seed):
    """The docs' algorithm written again with numpy uint32 arithmetic (wrap-around), as C does."""
    state = np.uint32((seed * 2654435761 + 0x9E3779B9) % 2**32) or np.uint32(1)
    order, steps = np.arange(n), []
    with np.errstate(over="ignore"):
        for _ in range(epochs):
            for i in range(n - 1, 0, -1):
                state ^= np.uint32(state << np.uint32(13))
                state ^= np.uint32(state >> np.uint32(17))
                state ^= np.uint32(state << np.uint32(5))
                j = int(state % np.uint32(i + 1))
                order[[i, j]] = order[[j, i]]
            steps += [order[s : s + batch_size].tolist() for s in range(0, n, batch_size)]
    return steps


@pytest.mark.parametrize("n,epochs,batch,seed", [(11, 3, 4, 7), (3, 2, 16, 0), (40, 2, 16, 2**32 - 1), (1, 2, 3, 5)])
def test_step_plan_is_the_documented_shuffle_padded_with_weight_zero(n, epochs, batch, seed):
    order, row_weight = step_plan(n, epochs, batch, seed)
    want = xorshift_reference(n, epochs, batch, seed)
    width = min(batch, n)
    assert len(order) == len(row_weight) == epochs * -(-n // batch)
    for o, w, real in zip(order, row_weight, want):
        assert len(o) == len(w) == width
        assert o[: len(real)] == real and w[: len(real)] == [1.0 / len(real)] * len(real)
        assert o[len(real) :] == [real[0]] * (width - len(real)) and not any(w[len(real) :])
    for e in range(epochs):  # each epoch visits every example once
        per = -(-n // batch)
        seen = [i for o, w in zip(order[e * per : (e + 1) * per], row_weight[e * per :]) for i, x in zip(o, w) if x]
        assert sorted(seen) == list(range(n))
    assert step_plan(n, epochs, batch, seed) == (order, row_weight)  # deterministic


def test_step_plan_seeds_differ_and_bad_arguments_are_refused():
    assert step_plan(20, 1, 4, 0)[0] != step_plan(20, 1, 4, 1)[0]
    for args, message in (
        ((0, 1, 1, 0), "n must be a positive integer, received 0"),
        ((3, 0, 1, 0), "epochs must be a positive integer, received 0"),
        ((3, 1, 2.0, 0), "batch_size must be a positive integer, received 2.0"),
        ((3, 1, 1, -1), r"seed must be an integer in \[0, 2\^32\), received -1"),
        ((3, 1, 1, 2**32), r"seed must be an integer in \[0, 2\^32\), received 4294967296"),
    ):
        with pytest.raises(ValueError, match=message):
            step_plan(*args)


def test_sgd_step_size_and_what_each_schema_feeds_its_graphs():
    emb = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)  # squared norms 25 and 0: mean 12.5
    assert sgd_step_size(0.1, emb) == pytest.approx(0.1 / 13.5, rel=1e-15)
    assert sgd_step_size(0.1, emb[:0]) == 0.1
    assert SGD_LR_IN_GRAPH_SINCE_SCHEMA == 3
    assert graph_learning_rate("sgd", 0.1, emb, 3) == 0.1  # the graph normalizes it
    assert graph_learning_rate("sgd", 0.1, emb, 2) == pytest.approx(0.1 / 13.5)  # old graphs take it normalized
    assert graph_learning_rate("adam", 0.01, emb, 2) == graph_learning_rate("adam", 0.01, emb, 3) == 0.01


def test_training_defaults_are_the_device_defaults():
    from edgetl.device._head import TrainSettings

    s = TrainSettings()
    assert {k: getattr(s, k) for k in asdict(TRAINING_DEFAULTS)} == asdict(TRAINING_DEFAULTS)
    with pytest.raises(Exception, match=r"seed must be an integer in \[0, 2\^32\)"):
        TrainSettings(seed=-1)
