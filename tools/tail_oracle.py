#!/usr/bin/env python
"""How far the device's tail is from what host fine-tuning reaches, on the guard's TUNING family.

    python tools/tail_oracle.py --bundle B.edgetl --run RUN_DIR [--seeds 2] [--epochs 30]

``B`` is a bundle built by ``tools/tail_rates.py``'s :func:`build_tail_bundle` and ``RUN_DIR``
its transfer run (``tail_target_dense{seed}`` beside it: ``model.keras`` = backbone, seam
standardization, head). For every tuning-family user (10 examples per class, the same draws
as ``tail_rates.py``) it prints the user's test accuracy after

* the device's head-only and tail personalization (with the guard's verdict, and unguarded:
  the candidate whatever the guard said), and
* three host oracles in Keras, trained on the same user examples the device trains on (its
  held-out ones left out) plus 40 inputs per class of the bundle's training half as replay,
  Adam, no guard: the head alone (lr 1e-2), the head and the last embedding layer (1e-3),
  the whole CNN (1e-3).

Each also on the factory classes as they are (the bundle's test half, undrawn: ``factory:``
rows), which says how much of its gain an oracle would pay in forgetting. Means over all users,
over the low-gain users (head-only gain under 10 points with the
guard, tail_rates' target group) and over those who start above 0.85. A diagnosis, not a
target: the oracles see no guard and their rates are not tuned per user.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

ORACLES = (("keras head", 1e-2, "head"), ("keras head+layer", 1e-3, "layer"), ("keras whole CNN", 1e-3, "all"))
REPLAY_PER_CLASS = 40


def device(w: Any, kind: str, seed: int) -> tuple[dict[str, float], Any, np.ndarray]:
    """The device's figures for one user, its Personalizer and its examples."""
    from guard_rates import accuracy
    from tail_rates import head_only, user_test_images

    from edgetl.device._tail import TailPersonalizer

    p, verdict = head_only(w, kind, 10, seed)
    head_ok = verdict.accepted
    tp = TailPersonalizer(p)
    tail = tp.train()
    tail_ok = tp.decide().accepted
    test_x = user_test_images(w, kind, 10, seed)
    r = {"before": accuracy(w.clf, w.clf.factory, w.clf.embed(test_x), w.test_y)}
    r["device head, unguarded"] = accuracy(w.clf, p.candidate, w.clf.embed(test_x), w.test_y)
    r["device head"] = r["device head, unguarded"] if head_ok else r["before"]
    hits = tp.predict(tail.weights, tp.runtime.trunk(test_x), w.clf.factory.labels) == w.test_y
    r["device tail, unguarded"] = float(np.mean(hits))
    r["device tail"] = r["device tail, unguarded"] if tail_ok else r["before"]
    r["factory: device head, unguarded"] = accuracy(w.clf, p.candidate, w.factory_emb, w.test_y)
    factory_hits = tp.predict(tail.weights, tp.runtime.trunk(w.test_x), w.clf.factory.labels) == w.test_y
    r["factory: device tail, unguarded"] = float(np.mean(factory_hits))
    return r, p, test_x


def oracle(run: Path, layer: str, what: str, lr: float, epochs: int, x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    """The run's Keras model fine-tuned on ``x``, ``y``: ``what`` trains the head, the head and the
    tail's ``layer`` (with its BatchNormalization, named ``layer + "_bn"`` in tail_rates' CNNs), or
    everything but the seam standardization."""
    from edgetl.host._tf import keras

    k = keras()
    k.utils.set_random_seed(seed)
    model = k.models.load_model(run / "model.keras", compile=False)
    backbone = model.get_layer("features").get_layer("backbone")
    for each in backbone.layers:
        each.trainable = what == "all" or (what == "layer" and each.name.startswith(layer))
    model.get_layer("features").get_layer("embedding_standardize").trainable = False
    model.compile(k.optimizers.Adam(lr), "sparse_categorical_crossentropy")
    model.fit(x.astype(np.float32), y, epochs=epochs, batch_size=16, verbose=0, shuffle=True)
    return model


def user(w: Any, run: Path, kind: str, seed: int, epochs: int) -> dict[str, float]:
    r, p, test_x = device(w, kind, seed)
    labels = list(w.clf.factory.labels)
    train, _ = p._split()
    rng = np.random.default_rng(seed)
    replay = np.concatenate(
        [rng.choice(np.flatnonzero(w.pool_y == c), REPLAY_PER_CLASS, replace=False) for c in labels]
    )
    x = np.concatenate([np.concatenate([batch for batch, _ in p._raw])[train], w.pool_x[replay]])
    y = np.asarray([labels.index(v) for v in [p._labels[i] for i in train] + list(w.pool_y[replay])])
    truth = np.asarray([labels.index(v) for v in w.test_y])
    layer = w.clf.bundle.manifest.extra["tail"]["layer"]
    for name, lr, what in ORACLES:
        model = oracle(run, layer, what, lr, epochs, x, y, seed)
        r[name] = float(np.mean(model.predict(test_x.astype(np.float32), verbose=0).argmax(axis=1) == truth))
        factory = model.predict(w.test_x.astype(np.float32), verbose=0).argmax(axis=1)
        r[f"factory: {name}"] = float(np.mean(factory == truth))
    return r


def main(argv: list[str] | None = None) -> int:
    from guard_rates import families, world

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--run", type=Path, required=True, help="the bundle's transfer run (model.keras)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30, help="the oracles' epochs")
    args = ap.parse_args(argv)
    w = world(args.bundle)
    records = []
    for kind in families()["tuning"]:
        for seed in range(args.seeds):
            records.append(user(w, args.run, kind, seed, args.epochs))
            print(f"{kind:<12} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in records[-1].items()), flush=True)
    low = [r for r in records if r["device head"] - r["before"] < 0.10]
    high = [r for r in records if r["before"] > 0.85]
    print(
        f"{'mean user accuracy':<24} {'all ' + str(len(records)):>8} {'low-gain ' + str(len(low)):>12} "
        f"{'start > 0.85: ' + str(len(high)):>16}"
    )
    for key in records[0]:
        cells = [np.mean([r[key] for r in group]) if group else float("nan") for group in (records, low, high)]
        print(f"{key:<24} {cells[0]:>8.3f} {cells[1]:>12.3f} {cells[2]:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
