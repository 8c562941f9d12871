#!/usr/bin/env python
"""Which fine-tune learning rate moves a small CNN as well as a large backbone? (issue 9, item 3)

    python tools/fine_tune_lr.py --mobilenet-run RUN [--rates 1e-5 1e-4 1e-3] [--seeds 2]

Three transfer settings, each fine-tuned (Adam, 10 epochs, early stopping on validation
loss) at every rate, from the same converged head:
  digits-cnn       edgetl_cnn pretrained on digits 0-4 (8x8), target 5-9, top 2 layers
  user-dense-cnn   a user's .keras CNN (tools/user_models.py) on their thicker/slanted
                   digits, top 3 layers
  mobilenetv2_035  an `edgetl pretrain` run of MobileNetV2-0.35 on digits 0-4 at 96x96
                   (tools/pretrain_validation.py --out DIR makes one: pass DIR/source),
                   target 5-9, top 10 layers
Printed: validation accuracy head-only and after fine-tuning, whether the run kept the
fine-tuned weights, and test accuracy, averaged over seeds. The default
(edgetl.host._transfer.FINE_TUNE_LEARNING_RATE) is the rate that gains the most on
validation across all three.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def settings(base: Path, mobilenet_run: str | None) -> dict[str, tuple[object, str, int]]:
    import user_models as um

    from edgetl.data import Dataset, load_digits_dataset
    from edgetl.host._pretrain import pretrain
    from edgetl.host._run import save_run
    from edgetl.host._transfer import TrainConfig

    out = {}
    src = pretrain(load_digits_dataset((0, 1, 2, 3, 4)), TrainConfig(backbone="edgetl_cnn", epochs=15))
    out["digits-cnn"] = (load_digits_dataset((5, 6, 7, 8, 9)), str(save_run(src, base / "cnn", kind="pretrain")), 2)
    x, y = um.digit_images(tuple(range(10)), 32, 3, seed=1, restyle=True)
    out["user-dense-cnn"] = (
        Dataset(x, y, tuple("0123456789"), "image", "restyled"),
        str(um.dense_classifier_model(base / "user.keras")),
        3,
    )
    if mobilenet_run:
        x, y = um.digit_images((5, 6, 7, 8, 9), 96, 3, seed=1)
        out["mobilenetv2_035"] = (Dataset(x, y, tuple("56789"), "image", "digits 5-9"), mobilenet_run, 10)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fine-tune learning rates on three backbones")
    parser.add_argument(
        "--mobilenet-run", help="an `edgetl pretrain` run of mobilenetv2_035 at 96x96 (see the docstring)"
    )
    parser.add_argument("--rates", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args(argv)
    from edgetl.host._transfer import TrainConfig, train_transfer

    print(
        f"{'setting':<16} {'lr':>7} {'val head-only':>13} {'val fine-tuned':>14} {'gain (pts)':>10} {'kept':>5} "
        f"{'test':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        gains: dict[float, list[float]] = {r: [] for r in args.rates}
        for name, (data, backbone, layers) in settings(Path(tmp), args.mobilenet_run).items():
            for rate in args.rates:
                rows = []
                for seed in range(args.seeds):
                    cfg = TrainConfig(
                        backbone=backbone, fine_tune_layers=layers, fine_tune_learning_rate=rate, seed=seed
                    )
                    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                        warnings.simplefilter("ignore")
                        m = train_transfer(data, cfg).metrics
                    rows.append(
                        (
                            m["head_only_val_accuracy"],
                            m["fine_tuned_val_accuracy"],
                            m["fine_tune_kept"],
                            m["test_accuracy"],
                        )
                    )
                before, after, kept, test = (np.mean([r[i] for r in rows]) for i in range(4))
                gains[rate].append((after - before) * 100)
                print(
                    f"{name:<16} {rate:>7.0e} {before:>13.4f} {after:>14.4f} {(after - before) * 100:>+10.2f} "
                    f"{kept:>5.2f} {test:>6.4f}",
                    flush=True,
                )
    best = max(gains, key=lambda r: np.mean(gains[r]))
    print(
        f"mean validation gain per rate: {', '.join(f'{r:.0e}: {np.mean(g):+.2f} pts' for r, g in gains.items())}; "
        f"best: {best:.0e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
