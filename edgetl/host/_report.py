"""``edgetl report``: one self-contained HTML page (works offline) for a run or a bundle.

Images are embedded as base64 PNGs and there is no script or external stylesheet, so the
file can be mailed, archived by CI or opened on a machine without network.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from edgetl.bundle import read_bundle
from edgetl.errors import InputError

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}.ok{color:#080}.bad{color:#b00;font-weight:bold}
img{max-width:100%;border:1px solid #eee}
"""


def _table(headers: list[str], rows: list[list[Any]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else html.escape(str(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """Trusted HTML built here (never from file contents)."""


def _ok(flag: bool) -> _Raw:
    return _Raw('<span class="ok">yes</span>' if flag else '<span class="bad">NO</span>')


def _img(path_or_bytes: Path | bytes, alt: str) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _run_section(run: Path) -> list[str]:
    info = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    out = [f"<h2>Training run <code>{html.escape(run.name)}</code></h2>"]
    keys = [k for k in metrics if k != "confusion_matrix" and not isinstance(metrics[k], (list, dict))]
    out.append(_table(["metric", "value"], [[k, _fmt(metrics[k])] for k in keys], "metrics"))
    cfg = info.get("config", {})
    out.append(_table(["setting", "value"], [[k, _fmt(v)] for k, v in cfg.items()], "config"))
    for name, alt in (("training_curves.png", "training curves"), ("confusion_matrix.png", "confusion matrix")):
        if (run / name).exists() and (name != "training_curves.png" or _has_curves(run)):
            out.append(_img(run / name, alt))
    return out


def _has_curves(run: Path) -> bool:
    """False when training has no epochs to draw: a head fitted by L-BFGS is one history
    point, and a plot of one point per axis is an empty plot."""
    path = run / "history.json"
    history = json.loads(path.read_text()) if path.is_file() else {}
    return any(len(v) > 1 for k, v in history.items() if k != "phase" and isinstance(v, list))


def _bundle_section(manifest: Any) -> list[str]:
    spec = manifest.input_spec
    out = [f"<h2>Bundle <code>{html.escape(manifest.name)}</code></h2>"]
    out.append(
        f"<p>labels: {html.escape(', '.join(manifest.labels))}; input {html.escape(str(list(spec.shape)))} "
        f"({html.escape(spec.preprocessing)}); head capacity {manifest.head.max_classes}</p>"
    )
    rows = [
        [a.file, a.role.value, a.format.value, a.precision.value, f"{a.size:,}", a.extra.get("int8_method", "")]
        for a in manifest.artifacts
    ]
    out.append(_table(["file", "role", "format", "precision", "bytes", "int8 method"], rows, "artifacts"))
    if manifest.parity:
        out.append("<h2>Quantization and parity (exported files run in their runtimes vs Keras)</h2>")
        rows = []
        for c in manifest.checks:
            acc, drop = c.extra.get("accuracy", ""), c.extra.get("accuracy_drop")
            rows.append(
                [
                    c.file,
                    c.role,
                    c.precision,
                    c.extra.get("optimizer", ""),
                    c.describe(),
                    _fmt(acc),
                    _fmt(drop * 100) + " pts" if drop is not None else "",
                    _ok(c.ok),
                ]
            )
        out.append(
            _table(
                ["file", "role", "precision", "optimizer", "check", "accuracy", "drop vs fp32", "ok"], rows, "parity"
            )
        )
        for o in manifest.parity.get("omitted") or []:
            out.append(
                f"<p class='bad'>left out {html.escape(', '.join(o.get('files', [])))}: "
                f"{html.escape(str(o.get('reason', '')))}</p>"
            )
    return out


def _bench_section(bench: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ["<h2>Benchmark (this machine)</h2>"]
    rows = [
        [
            r["backend"],
            r["precision"],
            f"{r['size_bytes']:,}",
            _fmt(r["latency_ms"]["50"] if "50" in r["latency_ms"] else r["latency_ms"][50]),
            _fmt(r["sdk_overhead_ratio_p50"]),
            _fmt(r["throughput_examples_per_s"]),
            _fmt(r["peak_rss_mb"]),
            _fmt(r["train_step_ms"]),
            _fmt(r.get("accuracy", "")),
        ]
        for r in bench["rows"]
    ]
    out.append(
        _table(
            [
                "backend",
                "precision",
                "bytes",
                "p50 ms",
                "SDK/raw",
                "examples/s",
                "peak RSS MB",
                "train step ms",
                "accuracy",
            ],
            rows,
            "bench",
        )
    )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in bench["rows"]:
        lat = r["latency_ms"].get("50", r["latency_ms"].get(50))
        ax.scatter(r["size_bytes"] / 1e3, lat, label=f"{r['backend']} {r['precision']}")
    ax.set_xlabel("file size (kB)")
    ax.set_ylabel("p50 latency, batch 1 (ms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    out.append(_img(buf.getvalue(), "latency vs size"))
    return out


def write_report(target: str | Path, out: str | Path | None = None, *, bench: dict[str, Any] | None = None) -> Path:
    """Write the report for a run directory or a bundle; returns the HTML path."""

    target = Path(target)
    sections: list[str] = []
    if (target / "manifest.json").is_file():
        manifest = read_bundle(target).manifest
        run = Path(manifest.producer.get("run", ""))
        if run.name and (run / "config.json").is_file():
            sections += _run_section(run)
        sections += _bundle_section(manifest)
        title = f"edgetl report: bundle {manifest.name}"
        default = target.with_name(target.name.removesuffix(".edgetl") + ".report.html")
    elif (target / "config.json").is_file():
        sections += _run_section(target)
        title = f"edgetl report: run {target.name}"
        default = target / "report.html"
    else:
        raise InputError(f"{str(target)!r} is neither a run directory (config.json) nor a bundle (manifest.json)")
    if bench is not None:
        sections += _bench_section(bench)
    page = (
        "<!doctype html><html><head><meta "
        f"charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>"
    )
    path = Path(out) if out else default
    path.write_text(page, encoding="utf-8")
    return path
