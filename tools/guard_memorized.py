#!/usr/bin/env python
"""Does the guard judge forgetting on examples the factory head has memorized? (tuning family only)

    python tools/guard_memorized.py --bundle B [--bundle B2 ...] [--grid 28,40] [--seeds 2]

The guard's factory part is the replay buffer's held-out half, and ``replay.npz`` is drawn from
the run's TRAINING split: the factory head was fit on those very examples. This tool puts that
part beside factory digits the head never saw (the bundle's test half in tools/tail_rates.py's
bundles), for the tuning family's users: the factory head's accuracy on each, and for the
head-only candidate (default training) and tails trained with ``tools/tail_rates.py``'s
``TUNE_GRID`` entries, how many examples each candidate lost and gained per user on each set,
and how many the guard accepted. A candidate that only loses on the memorized part while it
loses and gains alike on unseen digits is refused for "forgetting" what it generalizes.
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


def changes(before: np.ndarray, after: np.ndarray) -> tuple[int, int]:
    """(lost, gained): examples right before and wrong after, and the reverse."""
    return int(np.sum(before & ~after)), int(np.sum(~before & after))


def candidates(w: Any, kind: str, seed: int, recipes: list[int]) -> list[dict[str, Any]]:
    """One user's head-only candidate and one tail per recipe: lost/gained on the guard's
    held-out factory part and on the unseen factory digits, and the guard's verdict."""
    from tail_rates import grid_entry, head_only

    from edgetl.device._tail import TailPersonalizer

    p, verdict = head_only(w, kind, 10, seed)
    head_ok = verdict.accepted
    held_emb, held_labels = p._held_out()["factory"]
    held_before = p._correct(w.clf.factory, held_emb, held_labels)
    unseen_before = p._correct(w.clf.factory, w.factory_emb, [str(v) for v in w.test_y])
    out = [
        {
            "what": "head-only",
            "held": changes(held_before, p._correct(p.candidate, held_emb, held_labels)),
            "unseen": changes(unseen_before, p._correct(p.candidate, w.factory_emb, [str(v) for v in w.test_y])),
            "accepted": head_ok,
            "held_before": float(held_before.mean()),
            "unseen_before": float(unseen_before.mean()),
        }
    ]
    unseen_trunk = None
    for index in recipes:
        settings, ratio, temperature, _ = grid_entry(index)
        tp = TailPersonalizer(p, replay_ratio=ratio, replay_temperature=temperature)
        tp.train(settings)
        verdict = tp.decide()
        parts = tp.held_out()
        before = p._correct(w.clf.factory, *parts["factory"])
        unseen_trunk = tp.runtime.trunk(w.test_x) if unseen_trunk is None else unseen_trunk
        unseen_after = tp.predict(tp.candidate.weights, unseen_trunk, w.clf.factory.labels) == w.test_y
        out.append(
            {
                "what": f"tail, TUNE_GRID[{index}]",
                "held": changes(before, tp.correct(tp.candidate.weights)["factory"]),
                "unseen": changes(unseen_before, unseen_after),
                "accepted": verdict.accepted,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    from guard_rates import families, world

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, action="append", required=True, help="a bundle with a tail, repeatable")
    ap.add_argument("--grid", default="28,40", help="TUNE_GRID indices of tail recipes (28: the default)")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args(argv)
    recipes = [int(i) for i in args.grid.split(",")]
    for path in args.bundle:
        w = world(path)
        users = [(kind, seed) for kind in families()["tuning"] for seed in range(args.seeds)]
        rows = [c for kind, seed in users for c in candidates(w, kind, seed, recipes)]
        head = [r for r in rows if r["what"] == "head-only"]
        print(
            f"{path.name}: the factory head gets {np.mean([r['held_before'] for r in head]):.3f} of the guard's "
            f"held-out factory part right (training-split examples) and {head[0]['unseen_before']:.3f} of unseen "
            f"factory digits; per user, mean examples lost / gained on each:"
        )
        for what in dict.fromkeys(r["what"] for r in rows):
            mine = [r for r in rows if r["what"] == what]
            held, unseen = (np.mean([r[k] for r in mine], axis=0) for k in ("held", "unseen"))
            print(
                f"  {what:<20} guard's part {held[0]:4.1f} / {held[1]:4.1f}   unseen digits {unseen[0]:4.1f} / "
                f"{unseen[1]:4.1f}   accepted {sum(r['accepted'] for r in mine)} of {len(mine)}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
