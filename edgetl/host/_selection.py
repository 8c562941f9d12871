"""Which labelled data chooses between quantized candidates, and which data reports the
accuracy of the one chosen: never the same examples (issue 23).

The int8 remedy ladders (``_int8_onnx.py``, ``_int8_tflite.py``) climb until a candidate is
within 1 point of fp32, and QAT stays only when it is not below post-training int8. Measured
on the examples the export then reports on, such a choice keeps the candidate that happened
to do well on exactly those examples, and the reported figure is optimistic (the best of
several noisy measurements). So, decided here and nowhere else:

- the run's validation split chooses when there is one, and the held-out data (the run's test
  split, or the evaluation data given) reports;
- without a validation split, a deterministic stratified half of the held-out data chooses
  and the other half reports (the manifest's ``data.selection`` says so);
- the labelled calibration examples (a sample of the training split) choose too. A validation
  split is small (30 examples on a 300-image run): there, post-training int8 lost 1 and gained
  2 of them, where it lost 8 and gained 1 of the 60 test examples, and lost 11 and gained 4 of
  the 210 training examples. The training examples are not reported on; fp32 fits them better than
  unseen data, so they show less of the damage than held-out data would, and the gate on the
  reporting data still refuses what they let through.

The export's verification (the gates that refuse broken files, and the accuracy the manifest
records and the CLI prints) runs on the reporting data only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Seeds the stratified halving of a held-out split (without a validation split).
HALVES_SEED = 0

Labelled = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class HeldOutRoles:
    """The labelled data that chooses (``select``) and the data that reports (``report``)."""

    select: Labelled | None
    report: Labelled | None
    report_index: np.ndarray | None  # rows of the held-out data kept to report (None: all of them)
    record: dict[str, Any]  # the manifest's ``data.selection``


def assign_roles(
    held_out: Labelled | None, held_out_split: str | None, val: Labelled | None, calibration: Labelled | None = None
) -> HeldOutRoles:
    """Choose on ``val`` and report on ``held_out`` when both exist; else split ``held_out``
    in two stratified halves, one to choose and one to report. The labelled ``calibration``
    examples choose too.

    Args:
        held_out: the data the export reports on (the run's test split, or evaluation data).
        held_out_split: its name for the record (``test``, ``val``, ``evaluation``).
        val: the run's validation split, when it is not ``held_out`` itself.
        calibration: the calibration inputs with their labels (training examples).
    """
    parts: list[tuple[str, Labelled]] = []
    report, report_index = held_out, None
    if held_out is None or not len(held_out[1]):
        why = "no labelled held-out data: nothing is reported"
    elif val is not None and len(val[1]):
        parts.append(("val", val))
        why = f"the run's validation split chooses; the {held_out_split} split, which no choice looked at, reports"
    else:
        chosen, report_index = stratified_halves(held_out[1])
        parts.append((f"{held_out_split} (selection half)", (held_out[0][chosen], held_out[1][chosen])))
        report = (held_out[0][report_index], held_out[1][report_index])
        held_out_split = f"{held_out_split} (reporting half)"
        why = (
            f"no validation split: a stratified half of the held-out data (seed {HALVES_SEED}) chooses and the "
            "other half, which no choice looked at, reports"
        )
    if calibration is not None and len(calibration[1]):
        parts.append(("calibration (train split)", calibration))
        why += "; the labelled calibration examples (training split) choose too"
    parts = [(name, data) for name, data in parts if len(data[1])]
    select = _joined([data for _, data in parts])
    record = {
        "chooses": None if select is None else {"split": " + ".join(n for n, _ in parts), "examples": len(select[1])},
        "chooses_parts": [_named(name, data) for name, data in parts],
        "reports": _named(held_out_split, report),
        "why": why + " (ladder target, float fallback, QAT or PTQ)",
    }
    return HeldOutRoles(select, report, report_index, record)


def _joined(parts: list[Labelled]) -> Labelled | None:
    if not parts:
        return None
    x = np.concatenate([np.asarray(p[0], np.float32) for p in parts])
    return x, np.concatenate([np.asarray(p[1]) for p in parts])


def stratified_halves(y: np.ndarray, seed: int = HALVES_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted row indices ``(select, report)`` of ``y``: per class, a seeded
    permutation's first ``n // 2`` rows select and the rest report."""
    rng = np.random.default_rng(seed)
    select, report = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        select.append(rows[: len(rows) // 2])
        report.append(rows[len(rows) // 2 :])
    empty = np.zeros(0, np.int64)
    return np.sort(np.concatenate([empty, *select])), np.sort(np.concatenate([empty, *report]))


def _named(split: str | None, data: Labelled | None) -> dict[str, Any] | None:
    return None if data is None else {"split": split, "examples": int(len(data[1]))}


def file_record(roles: dict[str, Any], selection_drop: float | None, reported_drop: float | None) -> dict[str, Any]:
    """A quantized file's manifest ``selection`` entry: the split that chose it and its accuracy
    drop against fp32 there, and the split its reported drop is measured on."""
    rounded = lambda d: None if d is None else round(float(d), 4)  # noqa: E731
    return {
        "chosen_on": roles.get("chooses"),
        "selection_accuracy_drop": rounded(selection_drop),
        "reported_on": roles.get("reports"),
        "reported_accuracy_drop": rounded(reported_drop),
    }
