"""HTML report: a run's report.json, object table and slices as one self-contained page (inline SVG, base64 PNG)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .preview import class_colour_hex, render_output

WIDTH = 640  # of every figure, in px
BLUE = "#4a7bd0"
_L, _R, _T, _H = 56, 12, 8, 150  # plot area: left and right margins, top, height

STYLE = """body{font-family:sans-serif;margin:24px;max-width:1100px;color:#222}h1{font-size:22px}h2{font-size:17px;
margin-top:28px;border-bottom:1px solid #ccc}table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}figure{display:inline-block;
margin:6px 12px 6px 0}figcaption{font-size:12px;color:#555}.gallery img{width:420px;border:1px solid #ccc}
.pair figure{width:48%}.pair svg{width:100%;height:auto}"""


def _esc(value) -> str:
    return html.escape(str(value))


def _num(v: float) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _figure(body: list[str], height: int, title: str) -> str:
    svg = (f'<svg width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" '
           f'font-size="11" role="img" aria-label="{_esc(title)}">{"".join(body)}</svg>')  # fmt: skip
    return f"<figure>{svg}<figcaption>{_esc(title)}</figcaption></figure>"


def hbars(rows: list[tuple[str, float, float, str, str]], title: str, unit: str = "") -> str:
    """Horizontal bars, one per row of (label, start, end, text after the bar, colour), over an axis from 0 in
    ``unit``: stage spans, counts."""
    left, right, row = 140, 170, 20
    top = max((end for _, _, end, _, _ in rows), default=0) or 1
    scale = (WIDTH - left - right) / top
    base = 6 + len(rows) * row
    body = [f'<line x1="{left}" y1="{base}" x2="{WIDTH - right}" y2="{base}" stroke="#444"/>',
            f'<text x="{left}" y="{base + 13}">0</text>',
            f'<text x="{WIDTH - right}" y="{base + 13}" text-anchor="end">{_num(float(top))} {_esc(unit)}</text>']  # fmt: skip
    for k, (label, start, end, text, colour) in enumerate(rows):
        y = 4 + k * row
        body += [f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{_esc(label)}</text>',
                 f'<rect x="{left + start * scale:.1f}" y="{y + 3}" width="{max((end - start) * scale, 1):.1f}" '
                 f'height="{row - 6}" fill="{colour}"/>',
                 f'<text x="{left + end * scale + 4:.1f}" y="{y + 13}">{_esc(text)}</text>']  # fmt: skip
    return _figure(body, 26 + len(rows) * row, title)


def _plot(title: str, xlabel: str, ylabel: str, xrange: tuple[float, float], ymax: float, marks: list[str]) -> str:
    """Axes (x over ``xrange``, y from 0 to ``ymax``) around ``marks``, drawn in the plot area (_L, _R, _T, _H)."""
    body = [f'<line x1="{_L}" y1="{_T}" x2="{_L}" y2="{_T + _H}" stroke="#444"/>',
            f'<line x1="{_L}" y1="{_T + _H}" x2="{WIDTH - _R}" y2="{_T + _H}" stroke="#444"/>',
            f'<text x="{_L - 4}" y="{_T + 8}" text-anchor="end">{_num(ymax)}</text>',
            f'<text x="{_L - 4}" y="{_T + _H}" text-anchor="end">0</text>',
            f'<text x="{_L}" y="{_T + _H + 14}">{_num(xrange[0])}</text>',
            f'<text x="{WIDTH - _R}" y="{_T + _H + 14}" text-anchor="end">{_num(xrange[1])}</text>',
            f'<text x="{(_L + WIDTH - _R) / 2}" y="{_T + _H + 28}" text-anchor="middle">{_esc(xlabel)}</text>',
            f'<text x="12" y="{_T + _H / 2}" transform="rotate(-90 12 {_T + _H / 2})" text-anchor="middle">'
            f"{_esc(ylabel)}</text>", *marks]  # fmt: skip
    return _figure(body, _T + _H + 36, title)


def columns(values, title: str, xlabel: str, ylabel: str, xrange: tuple[float, float], colour: str = BLUE) -> str:
    """Vertical bars from 0, evenly over ``xrange``: a histogram, or a count per slice."""
    values = [float(v) for v in values]
    ymax = max(values, default=0) or 1
    width = (WIDTH - _L - _R) / max(len(values), 1)
    marks = [f'<rect x="{_L + k * width + 0.5:.1f}" y="{_T + _H * (1 - v / ymax):.1f}" width="{max(width - 1, 1):.1f}" '
             f'height="{_H * v / ymax:.1f}" fill="{colour}"><title>{_num(v)}</title></rect>'
             for k, v in enumerate(values)]  # fmt: skip
    return _plot(title, xlabel, ylabel, xrange, ymax, marks)


def curve(xs, ys, title: str, xlabel: str, ylabel: str) -> str:
    """A line through (xs, ys), y from 0."""
    x0, x1 = (min(xs), max(xs)) if len(xs) else (0.0, 1.0)
    ymax = max(ys, default=0) or 1
    points = " ".join(f"{_L + (WIDTH - _L - _R) * (x - x0) / ((x1 - x0) or 1):.1f},{_T + _H * (1 - y / ymax):.1f}"
                      for x, y in zip(xs, ys))  # fmt: skip
    return _plot(title, xlabel, ylabel, (x0, x1), ymax, [f'<polyline points="{points}" fill="none" stroke="{BLUE}" '
                                                        'stroke-width="2"/>'])  # fmt: skip


def histogram(values, title: str, xlabel: str, colour: str, log: bool = False) -> str:
    """Counts of ``values`` in up to 20 bins (log10 bins where ``log``); integer bins for small integer ranges."""
    v = np.asarray(values, dtype=np.float64)
    data = np.log10(np.maximum(v, 1)) if log else v
    lo, hi = (float(data.min()), float(data.max())) if len(data) else (0.0, 1.0)
    if not log and hi - lo < 20:  # one bin per integer
        edges, xrange = np.arange(lo, hi + 2) - 0.5, (lo, hi)
    else:
        edges = np.linspace(lo, hi if hi > lo else lo + 1, 21)
        xrange = (10 ** edges[0], 10 ** edges[-1]) if log else (edges[0], edges[-1])
    counts, _ = np.histogram(data, edges)
    return columns(counts, title, xlabel + (" (log scale)" if log else ""), "objects", xrange, colour)


def table(rows: dict) -> str:
    cells = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(json.dumps(v) if isinstance(v, (dict, list)) else v)}</td></tr>"
                    for k, v in rows.items())  # fmt: skip
    return f"<table>{cells}</table>"


def _rate_over_time(samples: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Tiles/s in equal intervals (up to 30, about 5 results each) from cumulative (seconds, tiles) samples."""
    bins = int(np.clip(len(samples) // 5, 2, 30))
    t = np.array([s[0] for s in samples], dtype=np.float64)
    tiles = np.diff(np.array([0] + [s[1] for s in samples], dtype=np.float64))
    edges = np.linspace(t.min(), t.max(), bins + 1)
    counts, _ = np.histogram(t, edges, weights=tiles)
    return (edges[:-1] + edges[1:]) / 2, counts / (edges[1] - edges[0])


def _stages(report: dict) -> str:
    rows, lines = [], []
    for s in report.get("stages", []):
        span = s.get("span_s") or [0.0, 0.0]
        rate = s["units"] / s["seconds"] if s.get("seconds") else None
        rows.append((s["name"], span[0], span[1], f"{s['seconds']:.2f} s, {s['units']} units"
                     + (f", {rate:.3g}/s" if rate else ""), BLUE))  # fmt: skip
        lines.append(f"<tr><td>{_esc(s['name'])}</td><td>{s['units']}</td><td>{s['seconds']:.2f}</td>"
                     f"<td>{_num(rate) if rate else ''}</td><td>{s.get('driver_cpu_s', '')}</td></tr>")  # fmt: skip
    head = "<tr><th>stage</th><th>units</th><th>seconds</th><th>units/s</th><th>driver CPU s</th></tr>"
    out = hbars(rows, "when each stage ran (stages overlap), and its throughput", "s from the start") if rows else ""
    out += f"<table>{head}{''.join(lines)}</table>" + table(report.get("time_s", {}))
    samples = report.get("throughput", {}).get("tiles_over_time") or []
    if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
        t, rate = _rate_over_time(samples)
        out += curve(t.tolist(), rate.tolist(), "tiles/s over the run", "seconds from the start", "tiles/s")
    else:
        out += "<p>tiles/s over the run: too few results to draw (a resumed run, or one batch).</p>"
    return out + table({k: v for k, v in report.get("throughput", {}).items() if k != "tiles_over_time"})


def _objects(output, classes: list[str]) -> str:
    path = output.meta_dir / "objects.parquet"
    if not path.exists():
        return "<p>no object table</p>"
    import pyarrow.parquet as pq

    # ParquetFile, not read_table: read_table imports pyarrow.dataset (0.16 s at the end of every run, measured)
    t = pq.ParquetFile(path).read(columns=["class", "voxels", "first_slice", "last_slice"]).to_pydict()
    cls = np.array(t["class"], dtype=object)
    voxels, extent = np.array(t["voxels"]), np.array(t["last_slice"]) - np.array(t["first_slice"]) + 1
    rows = [(c, 0, int((cls == c).sum()), str(int((cls == c).sum())), class_colour_hex(k)) for k, c in enumerate(classes)]
    out = hbars(rows, "objects per class", "objects")
    for k, c in enumerate(classes):
        mine = cls == c
        if mine.any():
            out += '<div class="pair">' + histogram(voxels[mine], f"{c}: size", "voxels", class_colour_hex(k), log=True)
            out += histogram(extent[mine], f"{c}: z-extent", "slices", class_colour_hex(k)) + "</div>"
    return out


def cleanup_text(counts: dict) -> str | None:
    """What the clean-up (--min-slices, --min-voxels) dropped, in words, for the console and the page: it can be
    half of a label stack's objects (ISBI's neurites linked one-to-one lie in one slice each)."""
    dropped = counts.get("dropped_by_cleanup") or {}
    if not dropped:
        return None
    auto = counts.get("min_slices_auto") or {}
    parts = [f"{d['objects']} {c}" + (" (--min-slices auto chose 2)" if (auto.get(c) or {}).get("min_slices") else "")
             for c, d in dropped.items()]  # fmt: skip
    objects, voxels = (sum(d[k] for d in dropped.values()) for k in ("objects", "voxels"))
    return (f"the clean-up dropped {objects} objects ({voxels} voxels): {', '.join(parts)}; --min-slices 0 "
            "--min-voxels 0 keep every object")


def _merge(report: dict) -> str:
    quality = dict(report.get("merge_quality", {}))
    per_slice = quality.pop("touching_unmatched_per_slice", None)
    counts = {k: v for k, v in report.get("counts", {}).items() if not isinstance(v, dict)}
    out = table(quality) + table(counts)
    if per_slice:
        z0 = report.get("input", {}).get("slices", [0])[0]
        step = -(-len(per_slice) // 300)  # at most 300 bars: sums over runs of slices
        sums = np.add.reduceat(np.asarray(per_slice), np.arange(0, len(per_slice), step))
        out += columns(sums, "touching_unmatched per slice (possible splits at tile borders)"
                       + (f", summed over {step} slices a bar" if step > 1 else ""),
                       "slice", "fragments", (z0, z0 + len(per_slice) - 1), "#d04a4a")  # fmt: skip
    return out


def gallery_slices(n_slices: int, touching: list[int] | None, most: int = 3) -> dict[int, str]:
    """slice -> why it is shown: the start, middle and end, and the ``most`` with the most touching_unmatched."""
    reasons = [(0, "start"), (n_slices // 2, "middle"), (n_slices - 1, "end")]
    if touching:
        most_first = sorted(range(len(touching)), key=lambda z: -touching[z])[:most]
        reasons += [(z, f"touching_unmatched {touching[z]}") for z in most_first if touching[z] > 0]
    chosen: dict[int, str] = {}
    for z, why in reasons:
        chosen[z] = f"{chosen[z]} {why}" if z in chosen else why
    return dict(sorted(chosen.items()))


def gallery_pictures(output, slices) -> list[str]:
    """The report's pictures of ``slices`` of ``output`` (512 px at most), base64 PNGs, drawn side by side on the
    cores (numpy and Pillow's encoder release the GIL)."""

    def png(z: int) -> str:
        buf = io.BytesIO()
        render_output(output, buf, z, max_size=512)
        return base64.b64encode(buf.getvalue()).decode()

    slices = list(slices)
    with ThreadPoolExecutor(max(1, min(len(slices), os.cpu_count() or 1))) as pool:
        return list(pool.map(png, slices))


def _gallery(output, report: dict, pictures: list[str] | None) -> str:
    n = output.info["shape"][0]
    z0 = report.get("input", {}).get("slices", [0])[0]
    chosen = gallery_slices(n, report.get("merge_quality", {}).get("touching_unmatched_per_slice"))
    if pictures is None:
        pictures = gallery_pictures(output, chosen)
    items = []
    for (z, why), data in zip(chosen.items(), pictures):
        items.append(f'<figure><img alt="slice {z}" src="data:image/png;base64,{data}"/>'
                     f"<figcaption>slice {z}{f' (volume slice {z0 + z})' if z0 else ''}: {_esc(why)}</figcaption>"
                     "</figure>")  # fmt: skip
    return f'<div class="gallery">{"".join(items)}</div>'


def render_html(output, report: dict, pictures: list[str] | None = None) -> str:
    """The page for ``output`` (a write.Output) and its ``report`` (report.json's content); ``pictures``: those of
    ``gallery_pictures`` for the slices ``gallery_slices`` chooses from the report, where already drawn."""
    classes = report.get("plan", {}).get("classes") or output.info.get("classes", [])
    counts = report.get("counts", {})
    summary = {"volume": report.get("input", {}).get("volume"), "shape": report.get("input", {}).get("shape"),
               "objects": counts.get("objects"), "objects per class": counts.get("objects_per_class"),
               "total s": report.get("time_s", {}).get("total"), "mode": report.get("mode"),
               "warnings": report.get("warnings")}  # fmt: skip
    if dropped := cleanup_text(counts):
        summary["dropped"] = dropped
    config = {k: v for k, v in report.get("config", {}).items() if v is not None}
    sections = [
        ("Summary", table(summary)),
        ("Configuration", table(config) + table(report.get("plan", {})) + table(report.get("input", {}))),
        ("Time and throughput", _stages(report)),
        ("Objects", _objects(output, classes)),
        ("Merge quality", _merge(report)),
        ("Slices", _gallery(output, report, pictures)),
        ("Versions", table(report.get("versions", {})) + table(report.get("cluster", {}))),
    ]
    body = "".join(f"<h2>{_esc(title)}</h2>{content}" for title, content in sections)
    title = f"cellseg-batch report: {output.path.name}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>{body}</body></html>\n")  # fmt: skip


def write_html(output, report: dict, pictures: list[str] | None = None) -> Path:
    """``cellseg/report.html`` beside report.json (``pictures``: as ``render_html``'s)."""
    path = output.meta_dir / "report.html"
    path.write_text(render_html(output, report, pictures), encoding="utf-8")
    return path
