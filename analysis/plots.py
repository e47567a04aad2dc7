"""Plot helpers the figure modules share: colours, labels, empty figures, dropdowns, heatmaps, lines.

Used by the run figures (:mod:`analysis.figures`, :mod:`analysis.observed_figures`), the ablation
figures (:mod:`analysis.ablation_figures`) and the evaluation report (:mod:`analysis.eval_report`).
"""

from __future__ import annotations

import html
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from sims_lens.steering.functions import layer_of

COSINE_SCALE = "RdBu"
COLORWAY = [
    "#636efa",
    "#EF553B",
    "#00cc96",
    "#ab63fa",
    "#FFA15A",
    "#19d3f3",
    "#FF6692",
    "#B6E880",
    "#FF97FF",
    "#FECB52",
]

MAX_TEXT_ROWS = 12
"""Heatmaps with more rows (layers) than this carry no per-cell text (hover shows the values)."""


def color(index: int) -> str:
    """The ``index``-th colour of plotly's default colourway (so one layer keeps its colour across subplots)."""
    return COLORWAY[index % len(COLORWAY)]


def hook_label(hook: str) -> str:
    """``layer L`` for a layer's hook (``blocks.L.*``), else the hook name itself."""
    layer = layer_of(hook)
    return f"layer {layer}" if layer is not None else hook


def empty_figure(title: str, message: str) -> go.Figure:
    """A figure with no data: its ``title`` and ``message`` in the middle (e.g. "no finished iteration yet")."""
    fig = go.Figure()
    fig.update_layout(title=title)
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    return fig


def selector(fig: go.Figure, labels: list[str], active: int) -> None:
    """A dropdown that shows one trace (heatmap) at a time."""
    if len(labels) < 2:
        return
    buttons = [
        {"label": label, "method": "update", "args": [{"visible": [j == i for j in range(len(labels))]}]}
        for i, label in enumerate(labels)
    ]
    fig.update_layout(updatemenus=[{"buttons": buttons, "active": active, "x": 1.0, "y": 1.15, "xanchor": "right"}])


def cosine_heatmap(frame: pd.DataFrame, name: str, visible: bool) -> go.Heatmap:
    """A square cosine table as a heatmap on [-1, 1] (rows against columns; cell text while it is small)."""
    labels_x = [str(c) for c in frame.columns]
    labels_y = [str(i) for i in frame.index]
    return go.Heatmap(
        z=frame.to_numpy(),
        x=labels_x,
        y=labels_y,
        zmin=-1.0,
        zmax=1.0,
        colorscale=COSINE_SCALE,
        texttemplate=cell_text(len(frame)),
        name=name,
        visible=visible,
        hovertemplate="%{y} vs %{x}: %{z:.3f}<extra>" + html.escape(name) + "</extra>",
    )


def grouped_line(x: Any, y: Any, name: str, group: str, show_legend: bool, color_index: int) -> go.Scatter:
    """A line with markers in legend group ``group``; subplots after the first hide its legend entry."""
    return go.Scatter(
        x=x,
        y=y,
        mode="lines+markers",
        name=name,
        legendgroup=group,
        showlegend=show_legend,
        line={"color": color(color_index)},
    )


def band_trace(x: list[Any], low: list[float], high: list[float], name: str, **style: Any) -> go.Scatter:
    """A filled interval from ``low`` to ``high`` along ``x`` (no legend entry, no hover), grouped with the
    line called ``name``; ``style`` sets its colour (``fillcolor``, ``opacity``)."""
    return go.Scatter(
        x=x + x[::-1],
        y=high + low[::-1],
        fill="toself",
        line={"width": 0},
        mode="lines",
        name=f"{name} interval",
        legendgroup=name,
        showlegend=False,
        hoverinfo="skip",
        **style,
    )


def grid_height(n_rows: int, low: int = 420, high: int = 1100) -> int:
    """A heatmap height that gives each of ``n_rows`` rows about 20 px, within [low, high]."""
    return int(min(high, max(low, 170 + 20 * n_rows)))


def cell_text(n_rows: int) -> str | None:
    """The heatmap cell text template: the value while there are at most :data:`MAX_TEXT_ROWS` rows, else none."""
    return "%{z:.2f}" if n_rows <= MAX_TEXT_ROWS else None
