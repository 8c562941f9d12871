"""The tail's step plan (edgetl.bundle._tail.tail_step_plan): user rows every epoch, a walking
window of replay rows, class-balanced, in the head's shuffle."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from edgetl.bundle._tail import tail_step_plan


def _epochs(order, row_weight, steps_per_epoch):
    """The real rows (weight > 0) of each epoch."""
    rows = [i for step, w in zip(order, row_weight) for i, wi in zip(step, w) if wi > 0]
    per_epoch = len(rows) // (len(order) // steps_per_epoch)
    return [rows[k : k + per_epoch] for k in range(0, len(rows), per_epoch)]


def test_tail_plan_test_vector_of_the_docs():
    """The vector written in tail_step_plan's docstring and in docs/integration.md."""
    order, row_weight = tail_step_plan([[0], [1, 2]], [[3, 4, 5], []], epochs=2, batch_size=4, seed=0, replay_ratio=0.5)
    assert order == [[0, 1, 3, 2], [4, 1, 4, 4], [5, 2, 0, 1], [3, 1, 3, 3]]
    assert row_weight == [
        [3 / 16, 1 / 4, 9 / 32, 1 / 4],
        [9 / 16, 1 / 2, 0, 0],
        [9 / 32, 1 / 4, 3 / 16, 1 / 4],
        [9 / 16, 1 / 2, 0, 0],
    ]


@pytest.mark.parametrize("seed", [0, 7])
def test_every_epoch_has_all_user_rows_a_balanced_replay_window_and_the_run_covers_every_replay_row(seed):
    user = [list(range(0, 8)), list(range(8, 14)), []]  # class 2: the user gave none (replay only)
    replay = [list(range(100, 140)), list(range(200, 240)), list(range(300, 340))]
    label = {i: c for c, rows in enumerate(zip(user, replay)) for part in rows for i in part}
    epochs, batch = 10, 16
    order, row_weight = tail_step_plan(user, replay, epochs=epochs, batch_size=batch, seed=seed, replay_ratio=1.0)
    per_class = 8 + 8  # u = 8 user rows, ceil(1.0 * 8) replay rows
    steps = math.ceil(3 * per_class / batch)
    assert len(order) == epochs * steps
    epochs_rows = _epochs(order, row_weight, steps)
    for rows in epochs_rows:
        assert Counter(label[i] for i in rows) == {0: per_class, 1: per_class, 2: per_class}  # balanced
        assert set(user[0]) | set(user[1]) <= set(rows)  # every user row, every epoch
        assert len([i for i in rows if i >= 100]) == 3 * per_class - 14  # the rest: a replay window
    # the windows walk on: class 0 takes 8 a epoch, class 1 10 (fewer user rows), class 2 16
    used = Counter(i for rows in epochs_rows for i in rows if i >= 100)
    assert set(used) == set(replay[0]) | set(replay[1]) | set(replay[2])  # every replay row was trained on
    assert max(used[i] for i in replay[0]) - min(used[i] for i in replay[0]) <= 1  # evenly
    again = tail_step_plan(user, replay, epochs=epochs, batch_size=batch, seed=seed, replay_ratio=1.0)
    assert again == (order, row_weight)  # deterministic per seed
    other = tail_step_plan(user, replay, epochs=epochs, batch_size=batch, seed=seed + 1, replay_ratio=1.0)
    assert other[0] != order  # the seed orders the batches
    assert sorted(map(sorted, _epochs(*other, steps))) == sorted(map(sorted, epochs_rows))  # ... not the windows


def test_the_weights_make_a_window_stand_for_the_whole_replay_share():
    """Per epoch, every class weighs K and its user and replay rows weigh as u_c : r_c, as if every
    replay row were trained on (a window with replay rows at weight 1 tilted the tail to the user)."""
    user = [list(range(0, 8)), list(range(8, 10)), []]
    replay = [list(range(100, 140)), list(range(200, 230)), list(range(300, 320))]
    order, row_weight = tail_step_plan(user, replay, epochs=4, batch_size=16, seed=3, replay_ratio=1.0)
    batches = [sum(w > 0 for w in step) for step in row_weight]
    per_class = 16
    for epoch in range(4):
        steps = range(epoch * 3, epoch * 3 + 3)  # 48 slots: 3 batches of 16
        mass = Counter()
        for s in steps:
            for i, w in zip(order[s], row_weight[s]):
                mass[(i // 100 if i >= 100 else (0 if i < 8 else 1) + 1, i >= 100)] += w * batches[s]
        for c, (u, r) in enumerate(zip(user, replay), start=1):
            total = mass[(c, False)] + mass[(c, True)]
            assert total == pytest.approx(per_class)
            assert mass[(c, False)] / total == pytest.approx(len(u) / (len(u) + len(r)))


def test_a_large_ratio_trains_on_the_whole_replay_share_every_epoch():
    user, replay = [[0, 1], [2]], [[3, 4, 5, 6], [7, 8, 9]]
    order, row_weight = tail_step_plan(user, replay, epochs=3, batch_size=4, seed=0, replay_ratio=1000.0)
    for rows in _epochs(order, row_weight, 3):  # K = max(2 + 4, 1 + 3) = 6 rows per class: 3 steps
        assert len(rows) == 12 and set(rows) == set(range(10))  # class 1's 3 replay rows cycle to fill 5


def test_a_class_without_replay_repeats_its_user_rows_and_ratio_zero_trains_on_user_rows_only():
    order, row_weight = tail_step_plan([[0, 1, 2], [3]], [[], []], epochs=1, batch_size=8, seed=0, replay_ratio=2.0)
    assert Counter(order[0][: sum(w > 0 for w in row_weight[0])]) == {0: 1, 1: 1, 2: 1, 3: 3}
    order, row_weight = tail_step_plan([[0, 1]], [[2, 3, 4]], epochs=2, batch_size=8, seed=0, replay_ratio=0.0)
    assert {i for step in order for i in step} == {0, 1}


@pytest.mark.parametrize(
    "user, replay, kwargs, message",
    [
        ([[0]], [[1], [2]], {}, "one row list per class"),
        ([[]], [[]], {}, "some rows"),
        ([[0]], [[1]], {"replay_ratio": -1.0}, "replay_ratio must be a number >= 0"),
        ([[0]], [[1]], {"replay_ratio": float("nan")}, "replay_ratio must be a number >= 0"),
        ([[0]], [[1]], {"epochs": 0}, "epochs must be a positive integer"),
        ([[0]], [[1]], {"seed": -1}, "seed must be an integer"),
    ],
)
def test_tail_plan_refuses_bad_arguments(user, replay, kwargs, message):
    args = {"epochs": 1, "batch_size": 2, "seed": 0, "replay_ratio": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        tail_step_plan(user, replay, **args)
