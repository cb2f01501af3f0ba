"""The run's HTML report: plots as inline SVG (no plotting dependency), then the numbers.

- accuracy over the served records (rolling), marked where drift was injected, where it was
  detected and where the new champion started answering;
- per data window, each feature's PSI against the champion's reference (the threshold drawn),
  windows the monitor called drifted marked;
- per performance window (predictions joined to their delayed labels), accuracy against the
  champion's validation accuracy.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_html"]

WIDTH, HEIGHT, PAD = 860, 260, 46
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _scale(lo: float, hi: float, a: float, b: float) -> Any:
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _chart(
    title: str,
    series: dict[str, list[tuple[float, float]]],
    markers: Sequence[tuple[float, str]] = (),
    hlines: Sequence[tuple[float, str]] = (),
    y_range: tuple[float, float] | None = None,
    x_label: str = "",
) -> str:
    points = [p for s in series.values() for p in s]
    if not points:
        return f"<h3>{html.escape(title)}</h3><p>(no data)</p>"
    xs = [p[0] for p in points] + [m[0] for m in markers]
    ys = [p[1] for p in points] + [h[0] for h in hlines]
    lo_y, hi_y = y_range or (min(ys), max(ys))
    fx = _scale(min(xs), max(xs), PAD, WIDTH - 10)
    fy = _scale(lo_y, hi_y, HEIGHT - PAD, 10)
    parts = [
        f'<svg width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
        f'<rect x="{PAD}" y="10" width="{WIDTH - PAD - 10}" height="{HEIGHT - PAD - 10}" fill="#fafafa" '
        'stroke="#ccc"/>',
    ]
    for v in (lo_y, (lo_y + hi_y) / 2, hi_y):
        parts.append(f'<text x="4" y="{fy(v) + 4:.1f}">{v:.3g}</text>')
    for v in (min(xs), max(xs)):
        parts.append(f'<text x="{fx(v) - 10:.1f}" y="{HEIGHT - PAD + 16}">{v:.0f}</text>')
    parts.append(f'<text x="{WIDTH / 2 - 40}" y="{HEIGHT - 8}">{html.escape(x_label)}</text>')
    for y, label in hlines:
        parts.append(
            f'<line x1="{PAD}" x2="{WIDTH - 10}" y1="{fy(y):.1f}" y2="{fy(y):.1f}" stroke="#999" '
            f'stroke-dasharray="4 3"/><text x="{WIDTH - 200}" y="{fy(y) - 3:.1f}">{html.escape(label)}</text>'
        )
    for i, (x, label) in enumerate(markers):
        parts.append(
            f'<line x1="{fx(x):.1f}" x2="{fx(x):.1f}" y1="10" y2="{HEIGHT - PAD}" stroke="#d62728" '
            f'stroke-dasharray="2 2"/><text x="{fx(x) + 3:.1f}" y="{22 + 12 * i}" fill="#d62728">'
            f"{html.escape(label)}</text>"
        )
    for i, (name, values) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in values)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{path}"/>')
        parts.append(
            f'<text x="{PAD + 8 + 110 * (i % 7)}" y="{HEIGHT - PAD + 30 + 12 * (i // 7)}" '
            f'fill="{color}">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return f"<h3>{html.escape(title)}</h3>" + "".join(parts)


def _rolling(flags: Sequence[bool], width: int, base: int) -> list[tuple[float, float]]:
    out = []
    total = 0
    for i, f in enumerate(flags):
        total += f
        if i >= width:
            total -= flags[i - width]
        if i >= width - 1 and (i % max(width // 5, 1) == 0):
            out.append((float(base + i), total / width))
    return out


def write_html(
    path: Path,
    report: dict[str, Any],
    windows: Sequence[dict[str, Any]],
    correct: Sequence[bool],
    versions: Sequence[str],
    base: int,
) -> Path:
    """Write the report; `base` is the record number of the first served record."""
    markers: list[tuple[float, str]] = [(report["drift_injected_at_record"], "drift injected")]
    if report.get("drift_detected_at_record"):
        markers.append((report["drift_detected_at_record"], "drift detected"))
    new = report.get("promoted_version")
    if new and new in versions:
        markers.append((base + list(versions).index(new), f"v{new} serving"))
    accuracy = _chart(
        "Accuracy of served predictions (rolling, 250 records)",
        {"accuracy": _rolling(list(correct), 250, base)},
        markers,
        y_range=(0.0, 1.0),
        x_label="record",
    )
    data = [w for w in windows if w["kind"] == "data"]
    names = sorted({n for w in data for n in w["features"]})
    psi = {
        n: [(float(i), float(w["features"][n]["psi"])) for i, w in enumerate(data) if n in w["features"]] for n in names
    }
    drifted = [(float(i), "drifted") for i, w in enumerate(data) if w["drifted"]][:1]
    psi_chart = _chart(
        "PSI per feature and data window (vs the champion's reference)",
        psi,
        drifted,
        [(0.2, "PSI threshold")],
        x_label="data window",
    )
    perf = [w for w in windows if w["kind"] == "performance"]
    perf_chart = _chart(
        "Accuracy per performance window (predictions joined to delayed labels)",
        {
            "accuracy": [(float(i), w["accuracy"]) for i, w in enumerate(perf)],
            "champion's validation accuracy": [(float(i), w["expected_accuracy"]) for i, w in enumerate(perf)],
        },
        [(float(i), "drifted") for i, w in enumerate(perf) if w["drifted"]][:1],
        y_range=(0.0, 1.0),
        x_label="performance window",
    )
    rows = "".join(
        f"<tr><td>{html.escape(t['at'][11:23])}</td><td>{html.escape(t['event'])}</td>"
        f"<td>{html.escape(t['detail'])}</td></tr>"
        for t in report["timeline"]
    )
    numbers = {k: v for k, v in report.items() if k not in ("timeline", "jobs", "lineage")}
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>driftloop run</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:900px}}td{{padding:2px 8px;vertical-align:top}}
pre{{background:#f4f4f4;padding:8px;overflow-x:auto}}</style></head><body>
<h1>driftloop run: {html.escape(str(report["outcome"]))}</h1>
{accuracy}{psi_chart}{perf_chart}
<h3>Timeline</h3><table>{rows}</table>
<h3>Numbers</h3><pre>{html.escape(json.dumps(numbers, indent=2, default=str))}</pre>
<h3>Lineage of the new champion</h3><pre>{html.escape(json.dumps(report["lineage"], indent=2, default=str))}</pre>
</body></html>"""
    path.write_text(page, encoding="utf-8")
    return path
