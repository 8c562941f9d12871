"""The demo's report: one offline HTML page that tells the story in order.

Source task -> transfer vs from scratch -> export and parity -> int8 -> the new user before
and after -> migration, each section one sentence (derived from the numbers) and a picture
where a picture says it better; the settings last, collapsed. Like ``edgetl report``, it
embeds its images as base64 PNGs and has no script or external resource.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._glyphs import render_glyphs
from edgetl.bundle._manifest import Check
from edgetl.data import Splits, restyle_digits
from edgetl.host._demo_source import source_accuracy
from edgetl.host._report import _CSS, _fmt, _img, _ok, _table

USER_SHOTS = 10  # labelled examples per class the new user gives (the demo's story and its report)

_STYLE = _CSS + "details{margin-top:2em}summary{cursor:pointer;font-weight:bold}p.lead{font-size:1.05em}"


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mosaic(images: np.ndarray, columns: int) -> np.ndarray:
    """(n, h, w, 1) images as one grid with a 1-pixel grey border between them."""
    n, h, w = images.shape[:3]
    rows = -(-n // columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1), 96, np.uint8)
    for i, im in enumerate(images[..., 0]):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = im
    return grid


def _pictures(panels: list[tuple[str, np.ndarray]], columns: int) -> bytes:
    """Panels of small images, each a titled grid, sized to their content (no empty margins)."""
    plt = _plt()
    grids = [_mosaic(images, columns) for _, images in panels]
    width = 9.0
    heights = [width * g.shape[0] / g.shape[1] + 0.35 for g in grids]  # + the title
    fig, axes = plt.subplots(len(grids), 1, figsize=(width, sum(heights)), gridspec_kw={"height_ratios": heights})
    for ax, (title, _), grid in zip(np.atleast_1d(axes), panels, grids):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    return _png(fig)


def _source_section(result: dict[str, Any], recipe: Any, halves: Splits) -> list[str]:

    src, m = result["scenario"]["source"], result["source"]
    glyphs = render_glyphs(72, seed=recipe.seed + 1, characters=recipe.characters, image_size=recipe.image_size).x
    rng = np.random.default_rng(0)
    digits = halves.train.x[rng.permutation(len(halves.train))[:24]]
    sentence = (
        f"The backbone first learned {len(src['characters'])} printed characters from {src['images']:,} synthetic "
        f"images rendered from {src['fonts']} fonts ({source_accuracy(m)}); it never saw a handwritten digit."
    )
    picture = _pictures(
        [("source: synthetic glyphs (a sample)", glyphs), ("target: real handwritten digits (a sample)", digits)], 24
    )
    return ["<h2>1. The source task</h2>", f"<p>{html.escape(sentence)}</p>", _img(picture, "source glyphs")]


def _shots_x(rows: list[dict[str, Any]], all_x: float) -> list[float]:
    return [float(r["shots"]) if r["shots"] != "all" else all_x for r in rows]


def _learning_curve(rows: list[dict[str, Any]], all_examples: float) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = _shots_x(rows, all_examples)
    for key, label, color in (
        ("transfer", "transfer (head on the glyph backbone)", "C0"),
        ("scratch", "from scratch (whole CNN)", "C1"),
    ):
        mean = np.array([r[f"{key}_accuracy_mean"] for r in rows])
        sd = np.array([r[f"{key}_accuracy_std"] for r in rows])
        ax.plot(xs, mean, "o-", color=color, label=label)
        ax.fill_between(xs, mean - sd, mean + sd, color=color, alpha=0.2)
        for x, r in zip(xs, rows):
            seeds = r["per_seed"][f"{key}_accuracy"]
            ax.scatter([x] * len(seeds), seeds, color=color, s=10, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(r["shots"]) if r["shots"] != "all" else f"all\n(~{all_examples:.0f})" for r in rows])
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("accuracy on held-out digits")
    ax.set_title("mean, ±1 sd band and each seed (dots)", fontsize=9)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def interpret(rows: list[dict[str, Any]]) -> list[str]:
    """Plain-language reading of the table, derived from the numbers (not fixed text)."""
    diffs = [(r["shots"], r["transfer_accuracy_mean"] - r["scratch_accuracy_mean"]) for r in rows]
    wins = [str(s) for s, d in diffs if d > 0.01]
    losses = [str(s) for s, d in diffs if d < -0.01]
    ties = [str(s) for s, d in diffs if abs(d) <= 0.01]
    param_ratio = rows[0]["transfer_trainable_params"] / rows[0]["scratch_trainable_params"]
    time_ratio = float(np.mean([r["transfer_train_seconds_mean"] / r["scratch_train_seconds_mean"] for r in rows]))
    out = ["  Reading it (accuracy difference > 1 point counts as a win or a loss):"]
    out.append(
        f"    examples per class where transfer is more accurate: {', '.join(wins) or 'none'}; less accurate: "
        f"{', '.join(losses) or 'none'}; within 1 point: {', '.join(ties) or 'none'}."
    )
    out.append("    transfer minus scratch, points: " + ", ".join(f"{d * 100:+.1f} ({s})" for s, d in diffs) + ";")
    out.append(
        f"    transfer trains {param_ratio:.1%} of the parameters in {time_ratio:.0%} of the time (mean over shot "
        "counts);"
    )
    out.append("    a head that small trains on cached embeddings on the device, a from-scratch CNN does not.")
    return out


def _transfer_section(result: dict[str, Any], halves: Splits) -> list[str]:
    rows = result["rows"]
    reading = interpret(rows)[1].strip()
    table = [
        [
            str(r["shots"]),
            f"{r['transfer_accuracy_mean']:.3f} ± {r['transfer_accuracy_std']:.3f}",
            f"{r['scratch_accuracy_mean']:.3f} ± {r['scratch_accuracy_std']:.3f}",
            f"{(r['transfer_accuracy_mean'] - r['scratch_accuracy_mean']) * 100:+.1f}",
            f"{r['transfer_trainable_params']:,} / {r['scratch_trainable_params']:,}",
        ]
        for r in rows
    ]
    all_examples = len(halves.train) / halves.train.num_classes
    return [
        "<h2>2. Transfer vs from scratch on real handwriting</h2>",
        f"<p class='lead'>{html.escape(reading[0].upper() + reading[1:])}</p>",
        _img(_learning_curve(rows, all_examples), "learning curve: accuracy vs examples per class"),
        _table(
            ["examples per class", "transfer", "from scratch", "difference (points)", "trainable params"],
            table,
            "transfer_vs_scratch",
        ),
    ]


def _export_section(result: dict[str, Any]) -> list[str]:

    export = result["export"]
    checks = [Check.from_json(c) for c in export["checks"]]
    fused = [c for c in checks if c.role == "fused"]
    rows = [
        [
            c.file,
            c.role,
            c.extra.get("optimizer", ""),
            f"{export['sizes'][c.file]:,}",
            _fmt(c.extra.get("accuracy", "")),
        ]
        + [c.describe(), _ok(c.ok)]
        for c in checks
    ]
    sentence = (
        f"The transfer model was exported to {len(fused)} model files (TFLite and ONNX) plus the on-device head "
        f"graphs, and every file was run in its own runtime and checked against Keras: "
        f"{'all ' + str(len(checks)) + ' checks passed' if export['ok'] else 'some checks FAILED'}."
    )
    omitted = [
        f"<p class='bad'>left out {html.escape(', '.join(o['files']))}: {html.escape(str(o['reason']))}</p>"
        for o in export.get("omitted") or []
    ]
    return [
        "<h2>3. Export and parity</h2>",
        f"<p>{html.escape(sentence)}</p>",
        _table(["file", "role", "optimizer", "bytes", "accuracy", "parity with Keras", "ok"], rows, "parity"),
        *omitted,
    ]


def _int8_figure(fused: list[dict[str, Any]], sizes: dict[str, int], bench: dict[str, Any] | None) -> bytes:
    plt = _plt()
    panels = 3 if bench else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.2))
    names = [c["file"] for c in fused]
    labels = [n.removeprefix("model.").replace(".", "\n", 1) for n in names]
    axes[0].bar(labels, [sizes[n] / 1e3 for n in names], color="C2")
    axes[0].set_ylabel("file size (kB)")
    axes[1].bar(labels, [c.get("accuracy", 0.0) for c in fused], color="C0")
    low = min(c.get("accuracy", 1.0) for c in fused)
    axes[1].set_ylim(max(0.0, low - 0.05), 1.0)
    axes[1].set_ylabel("accuracy (held-out digits)")
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=7)
    if bench:
        rows = bench["rows"]
        axes[2].bar(
            [f"{r['backend']}\n{r['precision']}" for r in rows],
            [r["latency_ms"].get("50", r["latency_ms"].get(50)) for r in rows],
            color="C4",
        )
        axes[2].set_ylabel("p50 latency, batch 1 (ms)")
        axes[2].tick_params(axis="x", labelsize=7)
    return _png(fig)


def _int8_section(result: dict[str, Any]) -> list[str]:
    export, bench = result["export"], result.get("bench")
    fused = [c for c in export["checks"] if c["role"] == "fused" and c["format"] == "tflite"]
    by_precision = {c["precision"]: c for c in fused}
    sentence = "No post-training int8 TFLite model passed verification (see the export section)."
    if "fp32" in by_precision and "int8" in by_precision:
        fp32, int8 = by_precision["fp32"], by_precision["int8"]
        ratio = export["sizes"][int8["file"]] / export["sizes"][fp32["file"]]
        sentence = (
            f"Post-training int8 makes the TFLite model {ratio:.0%} of the fp32 file's size for "
            f"{(int8['accuracy'] - fp32['accuracy']) * 100:+.1f} points of accuracy"
        )
        if "qat" in by_precision:
            sentence += (
                f" (quantization-aware training: {(by_precision['qat']['accuracy'] - fp32['accuracy']) * 100:+.1f})"
            )
        elif any("model.qat.tflite" in o["files"] for o in export.get("omitted") or []):
            sentence += " (the quantization-aware model failed verification and was left out, see above)"
        sentence += _speed_clause(bench) + "."
    fused_all = [c for c in export["checks"] if c["role"] == "fused"]
    return [
        "<h2>4. int8</h2>",
        f"<p>{html.escape(sentence)}</p>",
        _img(_int8_figure(fused_all, export["sizes"], bench), "size, accuracy and latency per precision"),
    ]


def _speed_clause(bench: dict[str, Any] | None) -> str:
    if not bench:
        return ""
    p50 = {(r["backend"], r["precision"]): r["latency_ms"].get("50", r["latency_ms"].get(50)) for r in bench["rows"]}
    parts = [
        f"{backend} {p50[(backend, 'int8')] / p50[(backend, 'fp32')]:.2f}x"
        for backend in ("litert", "onnxruntime")
        if (backend, "fp32") in p50 and (backend, "int8") in p50
    ]
    return "; on this CPU int8's batch-1 latency is " + " and ".join(parts) + " fp32's" if parts else ""


def _bars(
    groups: list[str], series: dict[str, list[float]], ylabel: str, reference: tuple[str, float] | None = None
) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    if reference is not None:
        ax.axhline(reference[1], color="grey", linestyle="--", linewidth=1, label=reference[0])
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, [f"{v:.3f}" for v in values], fontsize=8)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylim(0, 1.3)  # room above the bars for the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    return _png(fig)


def _user_section(result: dict[str, Any], halves: Splits) -> list[str]:

    pers = result["personalization"]
    backends = [b for b in ("onnxruntime", "litert") if b in pers]
    sample = halves.test.x[:24]
    picture = _pictures(
        [("how most people write", sample), ("the new user (thicker, slanted)", restyle_digits(sample))], 24
    )
    gains = ", ".join(f"{b} {pers[b]['before']:.3f} → {pers[b]['after']:.3f}" for b in backends)
    sentence = (
        f"A new user writes differently; personalizing the head on the device with {USER_SHOTS} of their examples "
        f"per class raises their accuracy ({gains}), as far as Keras retraining the same head on the host "
        f"({pers['host_keras']['after']:.3f})."
    )
    series = {"before": [pers[b]["before"] for b in backends], "head only": [pers[b]["after"] for b in backends]}
    tails = [pers[b].get("tail") or {} for b in backends]
    if all(t.get("available") for t in tails):
        series["with the tail"] = [t["after"] for t in tails]
        sentence += (
            " Training the backbone's last layer with the head (the tail) on the same examples: "
            + ", ".join(
                f"{b} {t['after']:.3f} ({'accepted' if t['accepted'] else 'refused'} by the guard)"
                for b, t in zip(backends, tails)
            )
            + "."
        )
    chart = _bars(
        [f"on the device: {b}" for b in backends],
        series,
        "the new user's accuracy",
        reference=(
            f"host: Keras retraining the same head ({pers['host_keras']['after']:.3f})",
            pers["host_keras"]["after"],
        ),
    )
    return [
        "<h2>5. A new user, before and after personalizing</h2>",
        f"<p>{html.escape(sentence)}</p>",
        _img(picture, "the new user's digits"),
        _img(chart, "new user accuracy before and after"),
    ]


def _migration_section(result: dict[str, Any]) -> list[str]:
    mig = result["migration"]
    backends = list(mig)
    sentence = (
        "When a new bundle arrives, each device store carries the personalization over ("
        + "; ".join(
            f"{b}: new factory head {mig[b]['new_factory']:.3f} → {mig[b]['migrated']:.3f} ({mig[b]['kind']})"
            for b in backends
        )
        + ")."
    )
    chart = _bars(
        backends,
        {
            "old bundle, personalized": [mig[b]["personalized_old"] for b in backends],
            "new bundle, factory head": [mig[b]["new_factory"] for b in backends],
            "new bundle, migrated": [mig[b]["migrated"] for b in backends],
        },
        "the new user's accuracy",
    )
    return ["<h2>6. Migration to a new bundle</h2>", f"<p>{html.escape(sentence)}</p>", _img(chart, "migration")]


def _settings_section(result: dict[str, Any]) -> list[str]:
    scenario = result["scenario"]
    rows = [[f"source {k}", _fmt(v)] for k, v in scenario["source"].items()]
    rows += [[k, _fmt(v)] for k, v in scenario.items() if k != "source"]
    rows += [[f"source metric {k}", _fmt(v)] for k, v in result["source"].items() if not isinstance(v, (list, dict))]
    return [
        "<details><summary>Settings and source-task metrics</summary>",
        _table(["setting", "value"], rows, "settings"),
        "</details>",
    ]


def write_demo_report(path: Path, result: dict[str, Any], recipe: Any, halves: Splits) -> Path:
    """Write the demo's story page to ``path`` and return it."""
    sections = [
        *_source_section(result, recipe, halves),
        *_transfer_section(result, halves),
        *_export_section(result),
        *_int8_section(result),
        *_user_section(result, halves),
        *_migration_section(result),
        *_settings_section(result),
    ]
    title = "edgetl demo: learned on printed glyphs, transferred to real handwriting"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path
