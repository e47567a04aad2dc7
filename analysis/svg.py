"""A small static SVG renderer for this package's plotly figures (no kaleido, no browser).

It draws what :mod:`analysis.figures` uses and nothing more: line/marker ``Scatter`` traces and
``Heatmap`` traces (the visible one) on subplot grids, paper-space annotations (subplot titles),
horizontal reference lines, axis titles and a legend. Good enough for a README image; the HTML
pages stay the interactive version.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape
from typing import Any

import plotly.graph_objects as go
from plotly.colors import sample_colorscale

COLORWAY = ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880", "#FF97FF"]
MARGIN = {"left": 70, "right": 170, "top": 70, "bottom": 55}
DASHES = {"dash": "6,4", "dot": "2,3", "dashdot": "6,3,2,3"}

Box = tuple[float, float, float, float]
"""A subplot's pixel box: left, right, top, bottom."""


def _num(values: Any) -> list[float]:
    out = []
    for v in values if values is not None else []:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def nice_ticks(lo: float, hi: float, count: int = 5, step: float | None = None) -> list[float]:
    """Round tick values covering ``[lo, hi]`` (about ``count`` of them, or every ``step``)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    if step is None:
        raw = (hi - lo) / max(count, 1)
        power = 10 ** math.floor(math.log10(raw))
        step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    ticks = []
    value = math.ceil(lo / step - 1e-9) * step
    while value <= hi + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _axis_key(ref: str, letter: str) -> str:
    suffix = ref[1:] if ref and len(ref) > 1 else ""
    return f"{letter}axis{suffix}"


def _visible(trace: Any) -> bool:
    return trace.visible is None or trace.visible is True


def _dash(line: Any, default: str = "") -> str:
    return DASHES.get(str(line.dash), default) if line is not None and line.dash else default


def _ranges(fig: go.Figure) -> dict[str, tuple[float, float]]:
    """Data range of every numeric axis (axis ranges set in the layout win; matched axes share)."""
    spans: dict[str, list[float]] = {}
    for trace in fig.data:
        if trace.type != "scatter" or not _visible(trace):
            continue
        for letter, values in (("x", trace.x), ("y", trace.y)):
            key = _axis_key(getattr(trace, f"{letter}axis") or letter, letter)
            spans.setdefault(key, []).extend(v for v in _num(values) if math.isfinite(v))
    for shape in fig.layout.shapes or ():
        if shape.type == "line" and shape.y0 == shape.y1 and str(shape.yref or "y").startswith("y"):
            key = _axis_key(str(shape.yref or "y").split(" ")[0], "y")
            spans.setdefault(key, []).append(float(shape.y0))
    for key in list(spans):
        target = fig.layout[key].matches
        if target:
            spans.setdefault(_axis_key(target, key[0]), []).extend(spans[key])
    out: dict[str, tuple[float, float]] = {}
    for key, values in spans.items():
        axis = fig.layout[key]
        source = spans.get(_axis_key(axis.matches, key[0]), values) if axis.matches else values
        fixed = (
            axis.range
            if axis.range is not None
            else (fig.layout[_axis_key(axis.matches, key[0])].range if axis.matches else None)
        )
        if fixed is not None:
            out[key] = (float(fixed[0]), float(fixed[1]))
            continue
        lo, hi = (min(source), max(source)) if source else (0.0, 1.0)
        if axis.rangemode == "tozero":
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        pad = (hi - lo) * 0.06 or max(abs(hi) * 0.1, 0.5)
        out[key] = (lo - pad, hi + pad)
    return out


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.parts: list[str] = []

    def text(self, x: float, y: float, text: str, size: int = 12, anchor: str = "middle", **attrs: str) -> None:
        extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
        self.parts.append(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'
        )

    def line(self, x0: float, y0: float, x1: float, y1: float, color: str = "#444", dash: str = "") -> None:
        style = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" stroke="{color}"{style}/>')

    def svg(self) -> str:
        body = "\n".join(self.parts)
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
            f'viewBox="0 0 {self.width} {self.height}" font-family="sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n'
        )


def figure_to_svg(fig: go.Figure, width: int = 960, height: int | None = None) -> str:
    """Render ``fig`` (scatter and heatmap traces) as a standalone SVG document."""
    height = int(height or fig.layout.height or 480)
    canvas = _Canvas(width, height)
    plot_w = width - MARGIN["left"] - MARGIN["right"]
    plot_h = height - MARGIN["top"] - MARGIN["bottom"]

    def px(fx: float) -> float:
        return MARGIN["left"] + fx * plot_w

    def py(fy: float) -> float:
        return MARGIN["top"] + (1.0 - fy) * plot_h

    def box(xref: str, yref: str) -> Box:
        xd = fig.layout[_axis_key(xref, "x")].domain or (0.0, 1.0)
        yd = fig.layout[_axis_key(yref, "y")].domain or (0.0, 1.0)
        return px(xd[0]), px(xd[1]), py(yd[1]), py(yd[0])

    ranges = _ranges(fig)
    title = fig.layout.title.text if fig.layout.title else None
    if title:
        canvas.text(width / 2, 28, str(title), 16)
    shown = [(i, t, t.xaxis or "x", t.yaxis or "y") for i, t in enumerate(fig.data) if _visible(t)]
    heat_cells = {(x, y) for _, t, x, y in shown if t.type == "heatmap"}
    for xref, yref in dict.fromkeys((x, y) for _, t, x, y in shown if t.type == "scatter"):
        if (xref, yref) not in heat_cells:
            _axes(canvas, fig, ranges, xref, yref, box(xref, yref))
    for shape in fig.layout.shapes or ():
        _hline(canvas, shape, ranges, box)
    legend: dict[str, tuple[str, str]] = {}
    for index, trace, xref, yref in shown:
        if trace.type == "heatmap":
            _heatmap(canvas, trace, fig, box(xref, yref), yref)
        elif trace.type == "scatter":
            color = (trace.line.color if trace.line and trace.line.color else None) or COLORWAY[index % len(COLORWAY)]
            _scatter(canvas, trace, box(xref, yref), ranges, xref, yref, color)
            if trace.name and trace.showlegend is not False:
                legend.setdefault(str(trace.name), (color, _dash(trace.line)))
    for note in fig.layout.annotations or ():
        if note.xref == "paper" and note.yref == "paper" and note.text:
            y = py(float(note.y)) - (6 if note.yanchor == "bottom" else 0)
            canvas.text(px(float(note.x)), y, str(note.text), 13)
    for i, (name, (color, dash)) in enumerate(legend.items()):
        y = MARGIN["top"] + 14 + 18 * i
        x = width - MARGIN["right"] + 16
        canvas.line(x, y - 4, x + 22, y - 4, color, dash)
        canvas.text(x + 28, y, name, 12, "start")
    return canvas.svg()


def _scatter(
    canvas: _Canvas,
    trace: Any,
    area: Box,
    ranges: dict[str, tuple[float, float]],
    xref: str,
    yref: str,
    color: str,
) -> None:
    left, right, top, bottom = area
    (x0, x1), (y0, y1) = ranges[_axis_key(xref, "x")], ranges[_axis_key(yref, "y")]
    points = [
        (left + (x - x0) / (x1 - x0 or 1) * (right - left), bottom - (y - y0) / (y1 - y0 or 1) * (bottom - top))
        for x, y in zip(_num(trace.x), _num(trace.y), strict=False)
        if math.isfinite(x) and math.isfinite(y)
    ]
    mode = trace.mode or "lines+markers"
    dash = _dash(trace.line)
    if "lines" in mode and len(points) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        style = f' stroke-dasharray="{dash}"' if dash else ""
        canvas.parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{style}/>')
    if "markers" in mode or len(points) == 1:
        canvas.parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"/>' for x, y in points)


def _axes(
    canvas: _Canvas, fig: go.Figure, ranges: dict[str, tuple[float, float]], xref: str, yref: str, area: Box
) -> None:
    left, right, top, bottom = area
    canvas.line(left, bottom, right, bottom)
    canvas.line(left, top, left, bottom)
    for letter, ref in (("x", xref), ("y", yref)):
        key = _axis_key(ref, letter)
        axis = fig.layout[key]
        lo, hi = ranges.get(key, (0.0, 1.0))
        step = float(axis.dtick) if isinstance(axis.dtick, int | float) else None
        if step is not None and (hi - lo) / step > 12:
            step = None
        for tick in nice_ticks(lo, hi, 5, step):
            if letter == "x":
                x = left + (tick - lo) / (hi - lo or 1) * (right - left)
                canvas.line(x, bottom, x, bottom + 4)
                canvas.text(x, bottom + 16, _fmt(tick), 10)
            else:
                y = bottom - (tick - lo) / (hi - lo or 1) * (bottom - top)
                canvas.line(left - 4, y, left, y)
                canvas.line(left, y, right, y, "#e5e5e5")
                canvas.text(left - 7, y + 3, _fmt(tick), 10, "end")
        label = axis.title.text if axis.title else None
        if label and letter == "x":
            canvas.text((left + right) / 2, bottom + 34, str(label), 12)
        elif label:
            cx, cy = left - 45, (top + bottom) / 2
            canvas.text(cx, cy, str(label), 12, transform=f"rotate(-90 {cx:.1f} {cy:.1f})")


def _hline(canvas: _Canvas, shape: Any, ranges: dict[str, tuple[float, float]], box: Callable[[str, str], Box]) -> None:
    """A horizontal reference line (``fig.add_hline``) on one subplot."""
    if shape.type != "line" or shape.y0 != shape.y1:
        return
    xref, yref = str(shape.xref or "x").split(" ")[0], str(shape.yref or "y").split(" ")[0]
    key = _axis_key(yref, "y")
    if key not in ranges:
        return
    left, right, top, bottom = box(xref, yref)
    lo, hi = ranges[key]
    y = bottom - (float(shape.y0) - lo) / (hi - lo or 1) * (bottom - top)
    color = shape.line.color if shape.line and shape.line.color else "#888"
    canvas.line(left, y, right, y, color, _dash(shape.line, "2,3"))


def _heatmap(canvas: _Canvas, trace: Any, fig: go.Figure, area: Box, yref: str) -> None:
    left, right, top, bottom = area
    z = [_num(row) for row in trace.z]
    n_rows, n_cols = len(z), max((len(r) for r in z), default=0)
    finite = [v for r in z for v in r if math.isfinite(v)]
    if not n_rows or not n_cols or not finite:
        return
    xs = [str(v) for v in (trace.x if trace.x is not None else range(n_cols))]
    ys = [str(v) for v in (trace.y if trace.y is not None else range(n_rows))]
    lo = float(trace.zmin) if trace.zmin is not None else min(finite)
    hi = float(trace.zmax) if trace.zmax is not None else max(finite)
    reversed_y = fig.layout[_axis_key(yref, "y")].autorange == "reversed"
    cell = min(right - left, bottom - top) / max(n_rows, n_cols)  # square cells
    for i, row in enumerate(z):
        r = i if reversed_y else n_rows - 1 - i
        for j, value in enumerate(row):
            x, y = left + j * cell, top + r * cell
            fill = _color(value, lo, hi)
            canvas.parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" fill="{fill}" stroke="white"/>'
            )
            if math.isfinite(value) and max(n_rows, n_cols) <= 12:
                ink = "white" if abs((value - lo) / (hi - lo or 1) - 0.5) > 0.35 else "black"
                canvas.text(x + cell / 2, y + cell / 2 + 4, f"{value:.2f}", 11, fill=ink)
    step = max(1, math.ceil(max(n_rows, n_cols) / 16))
    for j in range(0, n_cols, step):
        canvas.text(left + (j + 0.5) * cell, top + n_rows * cell + 14, xs[j], 10)
    for i in range(0, n_rows, step):
        r = i if reversed_y else n_rows - 1 - i
        canvas.text(left - 6, top + (r + 0.5) * cell + 3, ys[i], 10, "end")
    _colorbar(canvas, left + n_cols * cell + 20, top, n_rows * cell, lo, hi)
    axis_x, axis_y = fig.layout.xaxis.title, fig.layout.yaxis.title
    if axis_x and axis_x.text:
        canvas.text(left + n_cols * cell / 2, top + n_rows * cell + 32, str(axis_x.text), 12)
    if axis_y and axis_y.text:
        cx, cy = left - 40, top + n_rows * cell / 2
        canvas.text(cx, cy, str(axis_y.text), 12, transform=f"rotate(-90 {cx:.1f} {cy:.1f})")
    canvas.text(left + n_cols * cell / 2, top - 8, str(trace.name or ""), 12)


def _colorbar(canvas: _Canvas, x: float, top: float, height: float, lo: float, hi: float, steps: int = 40) -> None:
    for k in range(steps):
        value = hi - (k + 0.5) / steps * (hi - lo)
        y, h = top + k * height / steps, height / steps + 0.5
        canvas.parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="14" height="{h:.1f}" fill="{_color(value, lo, hi)}"/>'
        )
    for tick in nice_ticks(lo, hi, 4):
        y = top + (hi - tick) / (hi - lo or 1) * height
        canvas.text(x + 18, y + 3, _fmt(tick), 10, "start")


def _color(value: float, lo: float, hi: float) -> str:
    if not math.isfinite(value):
        return "#dddddd"
    t = min(1.0, max(0.0, (value - lo) / (hi - lo or 1)))
    return str(sample_colorscale("RdBu", [t])[0])
